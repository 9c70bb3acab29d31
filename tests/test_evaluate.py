"""The accuracy-vs-memory harness (headops.evaluate, `python -m headops evaluate`) on a tiny model."""

import csv
import os

import pytest
import torch

import headops
from headops import evaluate as harness
from headops import tasks
from headops.testing import CharTokenizer, tiny_llama

TOK = CharTokenizer()
LENGTH = 400  # tokens (characters): the frame, instructions, needle and question, and some filler


def _samples(task="passkey", count=3, length=LENGTH):
    return [tasks.make_sample(TOK, task, length, j / max(1, count - 1), j) for j in range(count)]


def _strip(rows):
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows),
                  key=lambda r: (r["task"], r["length"], r["depth"], r["seed"], r["method"]))


# ------------------------------------------------------------------------------ methods


def test_method_strings_are_normalised_with_their_defaults():
    m = harness.parse_method(" duo:full=0.5,scores=retrieval ")
    assert m.family == "duo" and dict(m.params) == {"scores": "retrieval", "full": 0.5, "window": 256, "sinks": 64}
    assert m.name == "duo:full=0.5,scores=retrieval"
    assert harness.parse_method(m.name) == m
    assert harness.parse_method("streaming_llm").name == "streaming_llm"
    assert harness.parse_method("streaming_llm:window=256").name == "streaming_llm"  # the default
    assert harness.parse_method("streaming_llm:window=512,sinks=4").name == "streaming_llm:window=512"
    assert harness.parse_method("razor:scores=r,full=0.25,weighted=0").param("weighted") == 0
    aware = harness.parse_method("adakv:question=1,budget=64")
    assert aware.name == "adakv:budget=64,question=1" and aware.question_aware
    assert not harness.parse_method("adakv:budget=64,question=0").question_aware
    assert harness.parse_method("adakv:budget=64,question=0").name == "adakv:budget=64"  # the default
    kvpress_like = harness.parse_method("snapkv:keep_window=1,budget=64,pooling=avg")
    assert kvpress_like.name == "snapkv:budget=64,keep_window=1,pooling=avg"
    assert harness.parse_method("snapkv:budget=64,keep_window=0,pooling=max").name == "snapkv:budget=64"


@pytest.mark.parametrize("text, words", [
    ("", "non-empty"), ("nope", "family must be one of"), ("duo:full=0.5", "needs scores"),
    ("snapkv:budget=x", "budget must be an int"), ("adakv:budget=8,alpha=high", "alpha must be a number"),
    ("duo:scores=r,full=1.5", "full must be a fraction"), ("dense:window=4", "is not key=value with a key of dense"),
    ("snapkv:budget", "is not key=value"), ("headkv:scores=,budget=4", "must name a score table"),
    ("snapkv:budget=8,question=2", "question must be 0"), ("adakv:budget=8,keep_window=2", "keep_window must be 0"),
    ("headkv:scores=r,budget=8,pooling=mean", "pooling must be max or avg"), ("snapkv:budget=8,pooling=", "not be empty"), ("duo:scores=r,full=0.5,question=1", "is not key=value"),
])
def test_bad_method_strings_are_refused_by_name(text, words):
    with pytest.raises(ValueError, match=words):
        harness.parse_method(text)


def test_the_standard_grid_has_every_family_and_distinct_names():
    grid = harness.standard_methods(["retrieval", "duo"])
    names = [m.name for m in grid]
    assert len(set(names)) == len(names)
    assert {m.family for m in grid} == set(harness.FAMILIES)
    assert sum(m.family == "duo" for m in grid) == 6 and sum(m.family == "random" for m in grid) == 3
    assert {m.family for m in harness.standard_methods()} == set(harness.FAMILIES) - {"duo", "razor", "headkv"}
    assert sum(m.family == "headkv" for m in grid) == 12  # each score table's, query-agnostic and question-aware
    aware = [m.name for m in grid if m.question_aware]
    assert len(aware) == 15 and all(m.family in ("snapkv", "adakv", "pyramidkv", "headkv")
                                    for m in grid if m.question_aware)
    assert not any(m.question_aware for m in harness.standard_methods(["r"], question_aware=False))


def test_each_method_builds_the_spec_it_names():
    model, _ = tiny_llama()
    scores = {"r": torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.3, 0.4, 0.5, 0.6]], dtype=torch.float64)}  # [L, Hq]
    kinds = lambda s: [list(r) for r in s.cache_kind]  # noqa: E731
    assert kinds(harness.parse_method("dense").spec(model)) == [["full", "full"]] * 2
    assert kinds(harness.parse_method("streaming_llm").spec(model)) == [["streaming", "streaming"]] * 2
    duo = harness.parse_method("duo:scores=r,full=0.5,window=8,sinks=2").spec(model, scores)
    assert kinds(duo) == [["full", "full"], ["streaming", "streaming"]]  # KV heads pooled by max: 0.9, 0.8 top
    assert int(duo.window[1, 0]) == 8 and int(duo.sinks[1, 0]) == 2
    razor = harness.parse_method("razor:scores=r,full=0.25,window=8,weighted=0").spec(model, scores)
    assert kinds(razor) == [["full", "streaming"], ["streaming", "streaming"]]
    assert razor.cache_compensation[1] == ["unweighted", "unweighted"]
    a = harness.parse_method("random:full=0.5,seed=3").spec(model)
    assert kinds(a) == kinds(harness.parse_method("random:full=0.5,seed=3").spec(model))
    assert sum(k == "full" for r in kinds(a) for k in r) == 2
    assert harness.parse_method("adakv:budget=16").spec(model).cache_options["allocation"] == "adakv"
    for text in ("snapkv:budget=16", "adakv:budget=16", "headkv:scores=r,budget=16"):
        plain = harness.parse_method(text).spec(model, scores).cache_options
        assert (plain["pooling"], plain["keep_observation_window"]) == ("max", False)
        like = harness.parse_method(text + ",keep_window=1,pooling=avg").spec(model, scores).cache_options
        assert (like["pooling"], like["keep_observation_window"]) == ("avg", True)
    pyramid = harness.parse_method("pyramidkv:budget=16,beta=4").spec(model, scores)
    assert pyramid.cache_budget == [[22, 22], [10, 10]]  # the latest 8 and 8 on average: 12 and 2 (beta 4)
    headkv = harness.parse_method("headkv:scores=r,budget=16,beta=2").spec(model, scores)
    assert 4 * 16 - 4 <= sum(b for r in headkv.cache_budget for b in r) <= 4 * 16  # shares rounded down per head
    with pytest.raises(ValueError, match="reads the scores 'r'.*none"):
        harness.parse_method("duo:scores=r,full=0.5").spec(model)


# ------------------------------------------------------------------------------ the harness


def test_the_dense_method_answers_as_plain_generate():
    """The harness's dense method (one prefill captured, the cache built from it, the question
    decoded through headops) gives the tokens of transformers' own generate on the same prompts."""
    model, _ = tiny_llama()
    samples = _samples(count=3) + _samples("niah_single", count=2)
    rows = harness.evaluate(model, TOK, samples, ["dense"], batch_size=2, max_new_tokens=8, show_progress=False)
    assert len(rows) == len(samples)
    by_seed = {(r["task"], int(r["seed"])): r for r in rows}
    for s in samples:
        new = tasks.generate(model, s.ids[None], 8)[0]
        want = TOK.decode(tasks.until_eos(model, new), skip_special_tokens=True)
        r = by_seed[(s.task, s.seed)]
        assert r["answer"] == want, (s.task, s.seed)
        assert int(r["correct"]) == tasks.exact_match(s, want)
        assert int(r["bytes"]) >= int(r["ideal_bytes"]) > 0
    assert not hasattr(model, "_headops_previous")  # unpatched after the run


def test_the_dense_method_in_bfloat16_answers_as_plain_generate():
    """`evaluate --dtype bfloat16`: the cache, its kernels and the prefill capture in bfloat16
    give the first tokens of transformers' own generate of the bfloat16 model (later ones may
    differ: two attention kernels round differently in bfloat16, and this random model's logits
    have near-ties; sample 1 flips at its 7th token)."""
    model, _ = tiny_llama()
    model = model.to(torch.bfloat16)
    samples = _samples(count=3)
    rows = harness.evaluate(model, TOK, samples, ["dense", "snapkv:budget=40"], batch_size=3, max_new_tokens=8,
                            show_progress=False)
    assert len(rows) == 2 * len(samples)
    for s in samples:
        new = tasks.generate(model, s.ids[None], 8)[0]
        want = TOK.decode(tasks.until_eos(model, new), skip_special_tokens=True)
        dense = [r for r in rows if r["method"] == "dense" and int(r["seed"]) == s.seed][0]
        assert len(dense["answer"]) == len(want) and dense["answer"][:4] == want[:4], s.seed


def test_question_aware_methods_build_their_cache_after_the_question():
    """question=1: the cache is built from the prefill of the whole prompt but its last token
    (the budget heads' observation window: the prompt's last queries, the question's), then the
    last token is decoded - the tokens of that flow run by hand. Every row is the same whichever
    other methods run in the same call (one prefill serves them all)."""
    model, _ = tiny_llama()
    samples = _samples(count=2) + _samples("niah_single", count=1)
    methods = ["snapkv:budget=40,question=1", "adakv:budget=40,question=1,observation_window=8"]
    rows = harness.evaluate(model, TOK, samples, methods, batch_size=2, max_new_tokens=6, show_progress=False)
    spec = {m: harness.parse_method(m).spec(model) for m in methods}
    headops.patch(model, headops.HeadSpec.dense(model))
    try:
        for s in samples:
            ids = s.ids[None]
            for m in methods:
                prefill = headops.capture_prefill(model, ids[:, :-1], observation_window=32)
                headops.set_spec(model, spec[m])
                cache = headops.HeadSparseCache.from_prefill(model, spec[m], prefill, max_step=1,
                                                             append_room=1 + 6)
                new = harness.answer_from_cache(model, ids, cache, 6)[0]
                want = TOK.decode(tasks.until_eos(model, new), skip_special_tokens=True)
                (row,) = [r for r in rows if r["method"] == harness.parse_method(m).name and int(r["seed"]) == s.seed
                          and r["task"] == s.task]
                assert row["answer"] == want, (m, s.task, s.seed)
    finally:
        headops.unpatch(model)
    together = harness.evaluate(model, TOK, samples, methods + ["dense", "snapkv:budget=40"], batch_size=2,
                                max_new_tokens=6, show_progress=False)
    alone = harness.evaluate(model, TOK, samples, ["snapkv:budget=40"], batch_size=2, max_new_tokens=6,
                             show_progress=False)
    assert _strip([r for r in together if r["method"] in (harness.parse_method(m).name for m in methods)]) == \
        _strip(rows)
    assert _strip([r for r in together if r["method"] == "snapkv:budget=40"]) == _strip(alone)


def test_query_agnostic_budgets_compress_the_context_once_and_keep_what_follows():
    """A query-agnostic budget method compresses the context only: its budget heads keep the
    prefill's selection of the context and, after answering, every token of the question and of
    the answer (kvpress's measure); the rows are that flow run by hand."""
    model, _ = tiny_llama()
    samples = _samples(count=2)
    methods = ["snapkv:budget=40", "adakv:budget=40", "headkv:budget=40,scores=r", "pyramidkv:budget=40"]
    scores = {"r": torch.rand(2, 4, generator=torch.Generator().manual_seed(3))}
    new_tokens = 6
    rows = harness.evaluate(model, TOK, samples, methods, scores=scores, batch_size=1, max_new_tokens=new_tokens,
                            show_progress=False)
    headops.patch(model, headops.HeadSpec.dense(model))
    try:
        for s in samples:
            ids, start = s.ids[None], s.question_start
            prefills = harness.prompt_prefill(model, ids, start, 32)
            for name in methods:
                method = harness.parse_method(name)
                spec = method.spec(model, scores)
                cache = harness.method_cache(model, method, spec, prefills, ids, start, new_tokens)
                selected = [[layer.kept_positions(0, h).tolist() for h in range(layer.Hkv)] for layer in cache._layers]
                assert all(p < start for heads in selected for kept in heads for p in kept)
                assert any(len(kept) < start for heads in selected for kept in heads)  # it did compress
                new = harness.answer_from_cache(model, ids, cache, new_tokens)[0]
                total = ids.shape[1] + len(tasks.until_eos(model, new)) - 1  # the last new token is not cached
                for layer, heads in zip(cache._layers, selected):
                    for h, kept in enumerate(heads):
                        assert layer.kept_positions(0, h).tolist() == kept + list(range(start, total)), (name, h)
                want = TOK.decode(tasks.until_eos(model, new), skip_special_tokens=True)
                (row,) = [r for r in rows if r["method"] == method.name and int(r["seed"]) == s.seed]
                assert row["answer"] == want, (name, s.seed)
    finally:
        headops.unpatch(model)


def test_the_bytes_are_what_each_cache_held():
    model, _ = tiny_llama()
    samples = _samples(count=2)
    rows = harness.evaluate(model, TOK, samples, ["dense", "streaming_llm:window=32,sinks=4", "snapkv:budget=40"],
                            batch_size=2, max_new_tokens=4, show_progress=False)
    held = {r["method"]: int(r["bytes"]) for r in rows}
    dense = {int(r["dense_bytes"]) for r in rows}
    assert len(dense) == 1
    (dense,) = dense
    # what the dense cache would hold: 2 layers x 2 KV heads x (K and V) x D = 16 x fp32 per token
    per_token = 2 * 2 * 2 * 16 * 4
    assert dense % per_token == 0 and LENGTH <= dense // per_token <= LENGTH + 3  # the prompt and all but the last new token
    assert held["streaming_llm:window=32"] < 0.5 * dense
    assert held["snapkv:budget=40"] < 0.5 * dense
    assert held["dense"] >= dense


def test_a_killed_run_resumes_without_losing_or_duplicating_rows(tmp_path, monkeypatch):
    model, _ = tiny_llama()
    samples = _samples(count=3)
    methods = ["dense", "streaming_llm:window=16", "random:full=0.5,window=16,sinks=2"]
    whole = harness.evaluate(model, TOK, samples, methods, batch_size=2, max_new_tokens=4, show_progress=False,
                             out=str(tmp_path / "whole.csv"))
    assert len(whole) == 9
    out = str(tmp_path / "killed.csv")
    calls = {"n": 0}
    decode = CharTokenizer.decode

    def dies_on_the_fifth(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return decode(self, *a, **k)

    monkeypatch.setattr(CharTokenizer, "decode", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(model, TOK, samples, methods, batch_size=2, max_new_tokens=4, show_progress=False, out=out)
    monkeypatch.setattr(CharTokenizer, "decode", decode)
    assert not hasattr(model, "_headops_previous")
    assert len(harness.read_rows(out)) == 4
    with open(out, "a") as f:
        f.write("passkey,400,0,0,dense,dense,1")  # a row cut off by the kill: dropped and done again
    resumed = harness.evaluate(model, TOK, samples, methods, batch_size=2, max_new_tokens=4, show_progress=False,
                               out=out)
    assert _strip(resumed) == _strip(whole)
    assert _strip(harness.read_rows(out)) == _strip(whole)
    with open(out) as f:
        assert sum(1 for _ in f) == 1 + 9
    again = harness.evaluate(model, TOK, samples, methods, batch_size=2, max_new_tokens=4, show_progress=False,
                             out=out)  # everything done: nothing runs, nothing is added
    assert _strip(again) == _strip(whole)


def test_the_harness_refuses_bad_input_before_any_work(tmp_path):
    model, _ = tiny_llama()
    out = str(tmp_path / "r.csv")
    with pytest.raises(ValueError, match="distinct"):
        harness.evaluate(model, TOK, _samples(count=1), ["dense", "dense"], out=out)
    with pytest.raises(ValueError, match="samples must not be empty"):
        harness.evaluate(model, TOK, [], ["dense"], out=out)
    with pytest.raises(ValueError, match="reads the scores"):
        harness.evaluate(model, TOK, _samples(count=1), ["headkv:scores=x,budget=8"], out=out)
    assert not os.path.exists(out) and not hasattr(model, "_headops_previous")
    with open(out, "w") as f:
        f.write("layer,head,kv_head,score\n")
    with pytest.raises(ValueError, match="not a headops evaluate CSV"):
        harness.evaluate(model, TOK, _samples(count=1), ["dense"], out=out)


# ------------------------------------------------------------------------------ summaries


def test_wilson_interval_known_values():
    low, high = harness.wilson_interval(5, 10)
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4
    low, high = harness.wilson_interval(0, 10)
    assert low == 0.0 and abs(high - 0.2775) < 1e-4
    low, high = harness.wilson_interval(50, 50)
    assert abs(low - 0.9287) < 1e-4 and high == 1.0


def test_batches_share_one_length_and_come_longest_first():
    from types import SimpleNamespace

    lengths = [200, 400, 200, 400, 400, 300]  # prompts of several tasks and lengths, as the command makes them
    samples = [SimpleNamespace(ids=torch.zeros(n, dtype=torch.long), question_start=n - 5) for n in lengths]
    batches = harness._batches(samples, 2)
    assert batches == [[1, 3], [4], [5], [0, 2]]  # 400s, then 300, then 200: a round of 2 ranks pairs equals
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))


def test_paired_comparison_counts_discordant_prompts_and_gives_the_exact_p_value():
    def row(method, seed, correct, task="passkey"):
        return dict(task=task, length="100", depth="0.5", seed=str(seed), method=method, correct=str(correct))

    # 10 prompts: a right on 0-8, b right on 0-1 and 9: a alone 7, b alone 1, both 2
    rows = [row("a", s, int(s < 9)) for s in range(10)] + [row("b", s, int(s < 2 or s == 9)) for s in range(10)]
    rows += [row("a", 0, 0, task="niah_single"), row("b", 0, 1, task="niah_single")]  # another task
    got = harness.paired_comparison(rows, "a", "b", task="passkey")
    assert (got["prompts"], got["only_first"], got["only_second"], got["both"]) == (10, 7, 1, 2)
    assert abs(got["p_value"] - 2 * (1 + 8) / 2**8) < 1e-12  # two-sided binomial(8, 1/2), k <= 1
    swapped = harness.paired_comparison(rows, "b", "a", task="passkey")
    assert (swapped["only_first"], swapped["only_second"], swapped["p_value"]) == (1, 7, got["p_value"])
    assert harness.paired_comparison(rows, "a", "b")["prompts"] == 11
    assert harness.paired_comparison(rows, "a", "a")["p_value"] == 1.0  # no discordant prompt
    with pytest.raises(ValueError, match="no prompt has rows of both"):
        harness.paired_comparison(rows, "a", "c")


def test_summaries_count_each_group():
    rows = [dict(task="passkey", length="100", method="dense", family="dense", correct=c, recall=c, bytes=100,
                 dense_bytes=100) for c in (1, 1, 0, 1)]
    rows += [dict(task="passkey", length="100", method="snapkv:budget=8", family="snapkv", correct=0, recall=0.5,
                  bytes=25, dense_bytes=100)]
    dense, snap = harness.summarize(rows)
    assert (dense["samples"], dense["accuracy"], dense["bytes_fraction"]) == (4, 0.75, 1.0)
    assert (snap["samples"], snap["accuracy"], snap["recall"], snap["bytes_fraction"]) == (1, 0.0, 0.5, 0.25)


def test_the_command_writes_rows_summary_and_plot(tmp_path, capsys):
    from headops.cli import main

    scores = tmp_path / "s.csv"
    with open(scores, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "kv_head", "score"])
        w.writerows([layer, h, h // 2, (layer * 4 + h) / 8] for layer in range(2) for h in range(4))
    out = str(tmp_path / "ev")
    argv = ["evaluate", "--model", "tiny", "--tasks", "passkey", "--lengths", "400", "--samples", "2",
            "--methods", "dense", "duo:scores=s,full=0.5,window=16,sinks=2", "snapkv:budget=40,question=1",
            "--scores", f"s={scores}", "--max-new-tokens", "4", "--quiet", "--out", out]
    pytest.importorskip("matplotlib")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "duo:full=0.5,scores=s,sinks=2,window=16" in printed and "accuracy (95% CI)" in printed
    assert len(harness.read_rows(out + ".csv")) == 6
    with open(out + "_summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert os.path.getsize(out + ".png") > 0
    assert main(argv) == 0  # resumed: nothing to do
    assert "6 rows already in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--scores"):
        main(argv[:-7] + ["--scores", "nofile", "--out", out])
    assert main(argv[:-1] + [out + "_bf16", "--dtype", "bfloat16", "--no-plot"]) == 0
    assert len(harness.read_rows(out + "_bf16.csv")) == 6
