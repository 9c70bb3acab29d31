"""headops.discover: the scores computed through probes equal the same formulas computed here,
independently, from eager attention patterns (output_attentions=True) on the same prompts and
the same decoding; the DuoAttention methods find a planted head; bad input is named."""

import collections

import pytest
import torch

pytest.importorskip("transformers")

import headops  # noqa: E402
from headops import discover, tasks  # noqa: E402
from headops.testing import CharTokenizer, planted_copy_llama, tiny_llama  # noqa: E402

TOK = CharTokenizer()


def eager(model):
    """The model with transformers' eager attention (the only one that returns patterns)."""
    model.set_attn_implementation("eager")
    return model


# ---------------------------------------------------------------------------------------------
# retrieval score: the formula of Wu et al., from eager patterns


def eager_answer(model, sample, budget):
    """transformers' greedy decoding of one prompt with output_attentions: (its output, the new
    tokens up to EOS as a list)."""
    out = model.generate(sample.ids[None], attention_mask=torch.ones(1, len(sample.ids), dtype=torch.int64),
                         max_new_tokens=budget, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True, pad_token_id=TOK.eos_token_id)
    answer = out.sequences[0, len(sample.ids):].tolist()
    return out, answer[:answer.index(TOK.eos_token_id)] if TOK.eos_token_id in answer else answer


def eager_retrieval_scores(model, samples, min_recall):
    """Greedy decoding one prompt at a time with output_attentions; at each step, each head's
    most attended key (argmax: the lowest position among equals); a head scores 1/|needle| when
    that key lies in the needle and holds the generated token; tests whose answer recalls less
    than min_recall of the needle's tokens do not count."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    total, counted = torch.zeros(L, H, dtype=torch.float64), 0
    for s in samples:
        start, end = s.answer_spans()[0]
        out, answer = eager_answer(model, s, s.answer_tokens() + 4)
        sequence = out.sequences[0]
        needle = s.ids[start:end].tolist()
        unused, recalled = list(answer), 0
        for t in needle:
            if t in unused:
                unused.remove(t)
                recalled += 1
        if recalled / len(needle) < min_recall or not answer:
            continue
        counted += 1
        for step, token in enumerate(answer):
            for layer in range(L):
                top = out.attentions[step][layer][0, :, -1].argmax(dim=-1)
                for h in range(H):
                    j = int(top[h])
                    if start <= j < end and int(sequence[j]) == token:
                        total[layer, h] += 1 / len(needle)
    return total / max(counted, 1), counted


@pytest.mark.usefixtures("probe_path")  # the CPU probe kernel, and the CUDA path
def test_retrieval_scores_equal_the_formula_on_eager_patterns_and_find_the_planted_head():
    model = planted_copy_llama()
    # the passkey filler has no digits: the needle's number is the only thing the planted head can copy
    samples = [tasks.make_sample(TOK, "niah_single", length, depth, seed, haystack="repeat")
               for length in (400, 460) for depth in (0.0, 1.0) for seed in (0, 3, 6)]
    # it answers 7s: the needles of seeds 0, 3 and 6 hold two, one and four of their seven digits
    result = discover.retrieval_scores(model, samples, min_recall=0.25, batch_size=4)
    expected, counted = eager_retrieval_scores(eager(model), samples, 0.25)
    assert 0 < counted < len(samples) and result.info["counted"] == counted  # the recall rule excluded some
    torch.testing.assert_close(result.values, expected, atol=1e-12, rtol=0)
    assert result.values[0, 0] > 0 and result.values.flatten().argmax() == 0  # the planted head copies
    strict = discover.retrieval_scores(model, samples[:3], min_recall=1.0)
    assert strict.info["counted"] == 0 and bool((strict.values == 0).all())


def recomputed_top_positions(model, samples):
    """Per sample, each layer's and head's most attended position [L, H, steps] at each step of
    transformers' own greedy decoding, from eager patterns recomputed without a cache over the
    whole sequence so far (where a model's cache drops keys past a sliding window, or layers read
    another layer's keys, patterns through a cache would not index positions)."""
    tops = []
    for s in samples:
        answer = tasks.until_eos(model, tasks.generate(model, s.ids[None], s.answer_tokens() + 4)[0]).tolist()
        sequence = s.ids.tolist() + answer
        steps = []
        for step in range(len(answer)):
            with torch.no_grad():
                out = model(torch.tensor([sequence[:len(s.ids) + step]]), use_cache=False, output_attentions=True)
            steps.append(torch.stack([a[0, :, -1].argmax(dim=-1) for a in out.attentions]))
        tops.append(torch.stack(steps, -1))
    return tops


def test_retrieval_scores_on_sliding_windows_and_layers_reading_others_keys(monkeypatch):
    """A Gemma 4 with sliding-window layers and layers reading earlier layers' keys (float64): the
    top-1 positions the scores are computed from equal eager patterns' recomputed over each step's
    whole sequence (before 2026-12-07 the probes were refused there: transformers' cache keeps
    only the window's keys, so the decoding now runs through a dense HeadSparseCache, whose probes
    name kept positions)."""
    from headops.testing import tiny_per_layer_shapes

    model = tiny_per_layer_shapes(False, num_hidden_layers=8, num_kv_shared_layers=4,
                                  layer_types=["sliding_attention", "full_attention"] * 4)[0].double()
    samples = [tasks.make_sample(TOK, "niah_single", 400, depth, seed) for seed, depth in enumerate((0.1, 0.9))]
    expected = recomputed_top_positions(eager(model), samples)
    seen, copy_scores = [], discover.copy_scores
    monkeypatch.setattr(discover, "copy_scores", lambda top1, *rest: seen.append(top1) or copy_scores(top1, *rest))
    result = discover.retrieval_scores(model, samples, min_recall=0.0, batch_size=1)
    assert result.info["counted"] == len(samples) and len(seen) == len(samples)
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)
    assert all(int(t[layer].min()) >= len(s.ids) - 8 for t, s in zip(seen, samples) for layer in (0, 2, 4, 6))


# ---------------------------------------------------------------------------------------------
# retrieval-reasoning score: HeadKV's R2 formula, from eager patterns


def eager_reasoning_scores(model, samples, min_f1):
    """Greedy decoding one prompt at a time with output_attentions, as many new tokens as the
    expected answers have (plus 4 per further answer); a test counts when the F1 of its answer's
    tokens against the expected answer's (bags of ids) is above min_f1; at each step each head's
    k most attended keys (k: the asked needles' size) that lie in an asked needle add their
    probability; the sum is scaled by 10 / (needles' size x expected answer's tokens)."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    total, counted = torch.zeros(L, H, dtype=torch.float64), 0
    for s in samples:
        expected = [t for a, b in s.answer_spans() for t in s.ids[a:b].tolist()]
        budget = len(expected) + 4 * (len(s.answers) - 1)
        out, answer = eager_answer(model, s, budget)
        common = sum((collections.Counter(expected) & collections.Counter(answer)).values())
        f1 = 0.0 if common == 0 else 2 * common / (len(expected) + len(answer))
        if f1 <= min_f1:
            continue
        counted += 1
        spans = [s.needles[i].span for i in s.asked]
        size = sum(b - a for a, b in spans)
        for step in range(len(answer)):
            for layer in range(L):
                for h in range(H):
                    row = out.attentions[step][layer][0, h, -1]
                    values, index = row.topk(min(size, row.numel()))
                    for v, j in zip(values.tolist(), index.tolist()):
                        if any(a <= j < b for a, b in spans):
                            total[layer, h] += 10 * v / (size * len(expected))
    return total / max(counted, 1), counted


@pytest.mark.usefixtures("probe_path")  # the CPU probe kernel, and the CUDA path
def test_retrieval_reasoning_scores_equal_headkv_formula_on_eager_patterns_and_find_the_planted_head():
    model = planted_copy_llama()
    # it answers 7s: the needles of seeds 0, 3 and 6 hold two, one and four of their seven digits
    # (F1 2/7, 1/7, 4/7: only seed 6 counts); a multi-value prompt batched beside them decodes
    # its longer budget (its 4 numbers' 28 digits and 12 more tokens)
    samples = [tasks.make_sample(TOK, "niah_single", length, depth, seed, haystack="repeat")
               for length in (400, 600) for depth in (0.0, 1.0) for seed in (0, 3, 6)]
    samples.insert(8, tasks.make_sample(TOK, "niah_multivalue", 600, 0.5, 1, haystack="repeat"))
    result = discover.retrieval_reasoning_scores(model, samples, batch_size=4)
    expected, counted = eager_reasoning_scores(eager(model), samples, 0.5)
    assert 0 < counted < len(samples) and result.info["counted"] == counted  # the F1 rule excluded some
    # (the rows are float32, as probes are, and eager attention takes its softmax in float32)
    torch.testing.assert_close(result.values, expected, atol=1e-12, rtol=1e-6)
    assert result.values[0, 0] > 0 and result.values.flatten().argmax() == 0  # the planted head reads the needle
    # every answer with a right digit counts, the multi-value one too (over its 40 steps)
    lenient = discover.retrieval_reasoning_scores(model, samples, min_f1=0.0, batch_size=4)
    torch.testing.assert_close(lenient.values, eager_reasoning_scores(model, samples, 0.0)[0], atol=1e-12, rtol=1e-6)
    assert lenient.info["counted"] == len(samples)
    # an F1 equal to min_f1 does not count (HeadKV: F1 > 0.5): seed 0's 2/7 here
    seed0 = discover.answer_f1(samples[0].ids[slice(*samples[0].answer_spans()[0])], torch.tensor(TOK.encode("7" * 7)))
    assert discover.retrieval_reasoning_scores(model, samples[:3], min_f1=seed0).info["counted"] == 1
    capped = discover.retrieval_reasoning_scores(model, samples[:3], max_new_tokens=2, min_f1=0.0)
    assert capped.info["counted"] == 3  # two 7s against seven digits holding some 7s


def test_reasoning_scores_count_only_the_top_keys_inside_the_needles():
    # one step, one layer, two heads over 6 keys; the needle is keys 2..4 (k = 2)
    rows = [torch.tensor([[[0.1, 0.1, 0.4, 0.3, 0.1, 0.0], [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]]])]
    got = discover.reasoning_scores(rows, [(2, 4)], answer_tokens=5)
    # head 0: its top 2 (keys 2 and 3) both in the needle; head 1: its top 2 (keys 0 and 1) outside it
    torch.testing.assert_close(got, torch.tensor([[10 * 0.7 / (2 * 5), 0.0]], dtype=torch.float64))
    assert discover.answer_f1(torch.tensor([1, 2, 3, 3]), torch.tensor([3, 9])) == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert discover.answer_f1(torch.tensor([1]), torch.tensor([2])) == 0.0


def test_retrieval_reasoning_rows_on_sliding_windows_and_layers_reading_others_keys(monkeypatch):
    """The rows the scores are computed from, on a Gemma 4 with sliding-window layers and layers
    reading earlier layers' keys (float64), equal eager patterns' rows recomputed over each
    step's whole sequence (the decoding runs through a dense HeadSparseCache there, whose rows
    stand at the keys' original positions, 0 past a sliding window)."""
    from headops.testing import tiny_per_layer_shapes

    model = tiny_per_layer_shapes(False, num_hidden_layers=8, num_kv_shared_layers=4,
                                  layer_types=["sliding_attention", "full_attention"] * 4)[0].double()
    samples = [tasks.make_sample(TOK, "niah_single", 400, depth, seed) for seed, depth in enumerate((0.1, 0.9))]
    seen, top_keys_mass = [], discover.top_keys_mass
    monkeypatch.setattr(discover, "answer_f1", lambda expected, answer: 1.0)  # every test counts
    # (each call's row is reduced as soon as it is made: seen in call order, layer by layer)
    monkeypatch.setattr(discover, "top_keys_mass", lambda row, spans: seen.append(row) or top_keys_mass(row, spans))
    result = discover.retrieval_reasoning_scores(model, samples, batch_size=1)
    assert result.info["counted"] == len(samples)
    eager(model)
    calls = 0
    for s in samples:
        new = tasks.generate(model, s.ids[None], s.answer_tokens())[0]  # (one call per new token, EOS too)
        answer = tasks.until_eos(model, new).tolist()
        rows = [torch.stack(seen[calls + 8 * t:calls + 8 * (t + 1)]) for t in range(len(answer))]  # [L, Hq, Sk]
        calls += 8 * new.numel()
        sequence = s.ids.tolist() + answer
        for step, got in enumerate(rows):
            with torch.no_grad():
                out = model(torch.tensor([sequence[:len(s.ids) + step]]), use_cache=False, output_attentions=True)
            want = torch.stack([a[0, :, -1] for a in out.attentions])  # (probes are float32)
            # (eager attention's softmax is float32: its error grows layer by layer, 1e-7 at layer 0 to
            # ~4e-6 at layer 7 here; a key at a wrong position would be off by its whole probability)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
        assert float(rows[-1][0, :, :len(sequence) - 16].abs().max()) == 0.0  # layer 0 slides (window 8)
    assert calls == len(seen)


def test_retrieval_grid_is_a_niah_grid_with_one_needle_per_seed():
    samples = discover.retrieval_samples(TOK, lengths=[400, 500], depths=[0.0, 1.0], needles=3)
    assert len(samples) == 12 and {s.task for s in samples} == {"niah_single"}
    assert len({s.answers for s in samples}) == 3  # each needle moves through the grid


# ---------------------------------------------------------------------------------------------
# echo, induction and sink scores


@pytest.mark.usefixtures("probe_path")  # the CPU probe kernel, and the CUDA path
def test_echo_and_induction_scores_equal_the_eager_masses_at_distance_period():
    model, _ = tiny_llama()
    model = model.double()
    period = 7
    ids = discover.repeated_tokens(model, TOK, period=period, rows=3, seed=5)
    assert ids.shape == (3, 1 + 4 * period) and bool((ids[:, 0] == TOK.bos_token_id).all())
    assert torch.equal(ids[:, 1:1 + period], ids[:, 1 + 3 * period:])  # four repetitions
    assert all(len(set(row[1:1 + period].tolist())) == period for row in ids)
    echo, induction = discover.echo_induction_scores(model, ids, period)
    with torch.no_grad():
        patterns = eager(model)(ids, output_attentions=True).attentions  # [B, H, S, S] per layer
    for layer, A in enumerate(patterns):
        rows = torch.arange(1 + period, ids.shape[1])  # repetitions 2..4
        torch.testing.assert_close(echo.values[layer], A[:, :, rows, rows - period].mean(dim=(0, 2)),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(induction.values[layer], A[:, :, rows, rows - period + 1].mean(dim=(0, 2)),
                                   atol=1e-6, rtol=0)
    assert bool((echo.values > 0).all()) and not torch.allclose(echo.values, induction.values)


@pytest.mark.usefixtures("probe_path")  # the CPU probe kernel, and the CUDA path
def test_sink_scores_equal_the_eager_mass_on_the_first_token():
    model, _ = tiny_llama()
    model = model.double()
    ids = discover.text_rows(TOK, rows=2, tokens=60)
    assert bool((ids[:, 0] == TOK.bos_token_id).all())
    sink = discover.sink_scores(model, ids)
    with torch.no_grad():
        patterns = eager(model)(ids, output_attentions=True).attentions
    expected = torch.stack([A[:, :, 1:, 0].mean(dim=(0, 2)) for A in patterns])
    torch.testing.assert_close(sink.values, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# DuoAttention


def training_prompts():
    # the planted head reads digits: the pass keys' numbers lie far from the answers, in the needles
    return [tasks.multi_passkey(TOK, 360, passkeys=2, words=2, seed=seed) for seed in range(3)]


def test_duo_attention_lowers_its_loss_and_keeps_only_the_planted_head_full(tmp_path):
    model = planted_copy_llama().float()
    result = discover.duo_attention(model, training_prompts(), sinks=2, window=8, steps=30, lr=0.05)
    kv_alpha = result.info["kv_alpha"]
    losses = result.info["loss"]
    # alpha = 1: the full model (up to rounding: the targets' dense calls may tile differently)
    assert losses[-1] < 0.5 * losses[0] and result.info["distillation"][0] < 1e-10
    assert kv_alpha[0, 0] > 0.8 and float(kv_alpha.flatten()[1:].max()) == 0.0
    torch.testing.assert_close(result.values, kv_alpha.repeat_interleave(2, dim=1).double())  # tied per KV head
    path = tmp_path / "full_attention_heads.tsv"
    discover.write_full_attention_heads(path, kv_alpha)
    spec = headops.HeadSpec.from_duo_attention(model, path, sinks=2, window=8)
    assert spec.cache_kind == [["full", "streaming"], ["streaming", "streaming"]]


def test_duo_ablation_finds_the_planted_head_in_batched_forwards():
    model = planted_copy_llama()
    prompts = training_prompts()
    whole = discover.duo_ablation(model, prompts, sinks=2, window=8)
    one_by_one = discover.duo_ablation(model, prompts, sinks=2, window=8, max_batch_tokens=1)  # one head a batch
    kv_loss = whole.info["kv_loss"]
    assert kv_loss[0, 0] > 0 and float(kv_loss.flatten()[1:].abs().max()) == 0.0
    torch.testing.assert_close(whole.values, one_by_one.values, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("call, match", [
    (lambda m: discover.retrieval_scores(m, [], min_recall=0.5), "samples must hold at least one prompt"),
    (lambda m: discover.retrieval_scores(m, discover.retrieval_samples(TOK, lengths=[400], depths=[0],
                                                                       needles=1), min_recall=1.5),
     r"min_recall must be in \[0, 1\]"),
    (lambda m: discover.retrieval_reasoning_scores(m, [], min_f1=0.5), "samples must hold at least one prompt"),
    (lambda m: discover.retrieval_reasoning_scores(m, discover.retrieval_samples(TOK, lengths=[400], depths=[0],
                                                                                 needles=1), min_f1=1.0),
     r"retrieval_reasoning_scores: min_f1 must be in \[0, 1\)"),
    (lambda m: discover.retrieval_reasoning_scores(m, discover.retrieval_samples(TOK, lengths=[400], depths=[0],
                                                                                 needles=1), max_new_tokens=0),
     "max_new_tokens must be an int >= 1"),
    (lambda m: discover.retrieval_reasoning_scores(m, discover.retrieval_samples(TOK, lengths=[400], depths=[0],
                                                                                 needles=1), batch_size=0),
     "retrieval_reasoning_scores: batch_size must be an int >= 1"),
    (lambda m: discover.retrieval_samples(TOK, lengths=[400], depths=[0], needles=0), "needles must be an int >= 1"),
    (lambda m: discover.repeated_tokens(m, TOK, period=1), "period must be an int >= 2"),
    (lambda m: discover.repeated_tokens(m, TOK, period=200), "period must be at most 95"),
    (lambda m: discover.echo_induction_scores(m, torch.zeros(1, 10, dtype=torch.int64), 7), "ids must be"),
    (lambda m: discover.sink_scores(m, torch.zeros(10, dtype=torch.int64)), r"ids must be \[rows, S\]"),
    (lambda m: discover.text_rows(TOK, rows=0, tokens=10), "rows must be an int >= 1"),
    (lambda m: discover.duo_attention(m, [tasks.make_sample(TOK, "passkey", 400, 0.5, 0)], sinks=2, window=8,
                                      steps=1), "samples must be training prompts"),
    (lambda m: discover.duo_attention(m, training_prompts(), sinks=-1, window=8, steps=1), "sinks must be an int >= 0"),
    (lambda m: discover.duo_ablation(m, training_prompts(), sinks=2, window=0), "window must be an int >= 1"),
    (lambda m: discover.duo_attention(m, training_prompts(), sinks=2, window=8, steps=0), "steps must be an int >= 1"),
])
def test_bad_input_is_named(call, match):
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match=match):
        call(model)
    assert not hasattr(model, "_headops_previous")  # nothing left patched


def test_a_patched_model_gets_its_spec_back():
    model, _ = tiny_llama()
    spec = headops.HeadSpec.dense(model).mask_heads({0: [1]})
    headops.patch(model, spec)
    try:
        discover.sink_scores(model, discover.text_rows(TOK, rows=1, tokens=20))
        assert all(m._headops_spec is spec for m in model.modules() if hasattr(m, "_headops_spec"))
    finally:
        headops.unpatch(model)
