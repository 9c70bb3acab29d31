"""Past one machine (docs/DESIGN.md section 8): tensor-parallel models through transformers' own
DistributedConfig, and research sweeps split over processes.

Every test starts real processes (gloo on the CPU) with headops.testing.run_ranks, which gives
each one torchrun's environment: transformers' from_pretrained(distributed_config=...) and the
sweeps join the process group from it exactly as under torchrun. Each process runs one torch
thread, and so does this one while it computes the single-process references: a sweep is then
bitwise the single process's.
"""

import dataclasses
import datetime
import os
import time

import pytest
import torch

import headops
from headops import _distributed, discover, tasks
from headops.research import per_row_causal_lm_loss
from headops.testing import (CharTokenizer, planted_copy_llama, run_ranks, tiny_gpt_neox, tiny_latent_attention,
                              tiny_llama, tiny_per_layer_shapes, tiny_qwen2)

transformers = pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(7))
FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(autouse=True)
def one_thread():
    """The references run on one thread, as every rank does (the same reductions, the same bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: folder} of the tiny models saved for from_pretrained, loaded once here so that the
    forked ranks find transformers' model modules imported already."""
    folders = {}
    for name, make in [*FAMILIES.items(), ("cut_group", lambda: tiny_llama(6, 3)), ("odd", lambda: tiny_llama(3, 3)),
                       ("minicpm3", lambda: tiny_latent_attention("minicpm3")), ("gemma4", tiny_gemma4),
                       ("gemma4_shared", lambda: tiny_gemma4(shared=True)), ("gpt_neox", tiny_gpt_neox)]:
        folder = str(tmp_path_factory.mktemp(name))
        make()[0].save_pretrained(folder)
        AutoModelForCausalLM.from_pretrained(folder)
        folders[name] = folder
    import torch.distributed.tensor  # noqa: F401  (imported before the fork, not in every rank)
    return folders


def load_tp(folder, size=2):
    return AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=size)).eval()


# ------------------------------------------------------------------------------ tensor parallelism

def specs(model):
    """Whole-model specs: dense, heads masked, streaming KV heads on both ranks, per-batch gates."""
    dense = headops.HeadSpec.dense(model)
    per_batch = headops.HeadSpec.dense(model)
    gate = torch.ones(2, dense.num_layers, dense.num_heads)
    gate[0, 0, 1] = gate[0, 1, 3] = gate[1, 1, 0] = 0.0
    gate[1, :, 2] = 0.5
    per_batch.gate = gate
    return {"dense": dense, "masked": dense.mask_heads({0: [1], 1: [2, 3]}),
            "streaming": headops.HeadSpec.streaming(model, {0: [1], 1: [0]}, window=3, sinks=2),
            "per_batch": per_batch}


def measure(model, head_sparse_cache=True):
    """What a patched model computes: logits under each spec (switched by set_spec), probe
    statistics, greedy tokens through a HeadSparseCache (or, without, transformers' cache) and
    what that cache holds, and the gradient importance of every head."""
    out, all_specs = {}, specs(model)
    headops.patch(model, all_specs["dense"])
    shard = model._headops_shard
    out["shard"] = None if shard is None else (shard.rank, shard.size)
    with torch.no_grad():
        for name, spec in all_specs.items():
            headops.set_spec(model, spec)
            out[name] = model(IDS).logits
        headops.set_spec(model, all_specs["masked"])
        with headops.probe(model, topk=1, entropy=True, pattern_rows=[-1]) as recording:
            model(IDS)
    out["probe"] = [(recording[layer][0].topk_index, recording[layer][0].entropy, recording[layer][0].pattern)
                    for layer in range(2)]
    headops.set_spec(model, all_specs["streaming"])
    if not head_sparse_cache:
        out["tokens"] = model.generate(IDS[:1], max_new_tokens=10, do_sample=False, pad_token_id=2)
        out["importance"] = headops.importance(model, [IDS], normalize=False)
        return out
    cache = headops.HeadSparseCache(model, all_specs["streaming"])
    out["tokens"] = model.generate(IDS[:1], max_new_tokens=10, do_sample=False, cache=cache,
                                   pad_token_id=2)
    out["cache"] = {"kv_heads": cache.num_kv_heads, "ideal": cache.ideal_nbytes(), "dense": cache.dense_nbytes(),
                    "view": cache.whole_model_view()}
    out["importance"] = headops.importance(model, [IDS], normalize=False)  # every head's gate gradient
    return out


def test_tensor_parallel_llama_and_qwen2_compute_what_one_process_computes(saved):
    want = {name: measure(make()[0]) for name, make in FAMILIES.items()}
    ranks = run_ranks(lambda rank: {name: measure(load_tp(saved[name])) for name in FAMILIES}, 2)
    for name in FAMILIES:
        one = want[name]
        assert_ranks_measure_as_one([r[name] for r in ranks], one)
        # each rank's cache holds its own KV heads: half the model's, and exactly their tokens
        whole = one["cache"]["view"]
        per_token = whole.ideal_nbytes // whole.kept_tokens()
        for rank, got in enumerate(r[name]["cache"] for r in ranks):
            assert got["kv_heads"] == 1
            mine = sum(len(row[rank]) for layer in whole.kept_positions for row in layer)
            assert got["ideal"] == mine * per_token
            assert got["dense"] == one["cache"]["dense"] // 2
        view, nothing = ranks[0][name]["cache"]["view"], ranks[1][name]["cache"]["view"]
        assert nothing is None  # the whole view is rank 0's
        assert view.kept_positions == whole.kept_positions
        assert (view.ideal_nbytes, view.dense_nbytes) == (whole.ideal_nbytes, whole.dense_nbytes)
        assert view.rank_nbytes == [ranks[0][name]["cache"]["view"].rank_nbytes[0], view.rank_nbytes[1]]
        assert view.nbytes == sum(view.rank_nbytes)


def test_tensor_parallel_latent_attention_computes_what_one_process_computes(saved):
    """MiniCPM3 (multi-head latent attention: keys of 24 dims, values of 12, padded in each rank's
    calls) split over two ranks by transformers' plan: logits under every spec, probes, greedy
    tokens through transformers' cache (HeadSparseCache is refused for a latent cache) and head
    importance as one process."""
    one = measure(tiny_latent_attention("minicpm3")[0], head_sparse_cache=False)
    ranks = run_ranks(lambda rank: measure(load_tp(saved["minicpm3"]), head_sparse_cache=False), 2)
    assert_ranks_measure_as_one(ranks, one)


def assert_ranks_measure_as_one(ranks, one):
    """Each rank's measure() of a tensor-parallel model, its own shard, against one process's:
    logits under every spec, probes, tokens and importance."""
    for rank, got in enumerate(ranks):
        assert got["shard"] == (rank, 2)  # (each rank computes its own heads)
        # up to the all-reduce's rounding: each layer's output projection sums its heads in two halves and
        # adds them, one process in one product. Through the 8 layers of the Gemma 4 with shared keys that
        # reached 3.6e-6 on logits of size 0.5 on an AVX2-only EPYC (BLAS sums in its own order there)
        for spec in ("dense", "masked", "streaming", "per_batch"):
            torch.testing.assert_close(got[spec], one[spec], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {spec}")
        for (index, entropy, rows), (want_index, want_entropy, want_rows) in zip(got["probe"], one["probe"]):
            assert index.shape == want_index.shape and rows.shape == want_rows.shape  # every head, gathered
            assert torch.equal(index, want_index)
            torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rows, want_rows, atol=1e-6, rtol=1e-5)  # (pattern_rows=[-1])
        assert torch.equal(got["tokens"], one["tokens"]), f"rank {rank}"
        torch.testing.assert_close(got["importance"], one["importance"], atol=1e-7, rtol=1e-4)


def tiny_gemma4(shared=False):
    """Gemma 4 of 8 query heads: 4 KV heads of 16 dims in the sliding layers, 2 of 32 (keys as
    values: no v_proj) in the full-attention layer; `shared`: 8 layers alternating, the last 4
    reading layers 2 and 3's keys and values (num_kv_shared_layers: no k/v projections)."""
    layers = dict(num_hidden_layers=8, num_kv_shared_layers=4,
                  layer_types=["sliding_attention", "full_attention"] * 4) if shared else {}
    return tiny_per_layer_shapes(num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=2, **layers)


def test_tensor_parallel_layers_of_other_shapes_compute_what_one_process_computes(saved):
    """Gemma 4 (layers of other head dims and KV heads, the full-attention layer without v_proj)
    split over two ranks by transformers' plan: logits under every spec, probes, greedy tokens
    through a HeadSparseCache holding each rank's half of every layer's KV heads, and head
    importance as one process (before 2026-12-07 such models were refused, and a layer without
    v_proj read as not sharded by heads)."""
    one = measure(tiny_gemma4()[0])
    ranks = run_ranks(lambda rank: measure(load_tp(saved["gemma4"])), 2)
    assert_ranks_measure_as_one(ranks, one)
    for got in ranks:
        assert got["cache"]["kv_heads"] == (2, 2, 2, 2, 2, 1) and one["cache"]["kv_heads"] == (4, 4, 4, 4, 4, 2)
        assert got["cache"]["dense"] == one["cache"]["dense"] // 2
    view = ranks[0]["cache"]["view"]
    assert view.kept_positions == one["cache"]["view"].kept_positions
    assert (view.ideal_nbytes, view.dense_nbytes) == (one["cache"]["view"].ideal_nbytes, one["cache"]["dense"])


def test_tensor_parallel_layers_reading_other_layers_keys_compute_what_one_process_computes(saved):
    """Gemma 4 whose last 4 layers read layers 2 and 3's keys and values (no k/v projections: before
    2026-12-07 tensor parallelism read them as not sharded by heads) over two ranks: logits, probes,
    greedy tokens through a HeadSparseCache (each rank's half of the 4 storing layers' KV heads,
    the reading layers on their sources' storages) and importance as one process."""
    one = measure(tiny_gemma4(shared=True)[0])
    ranks = run_ranks(lambda rank: measure(load_tp(saved["gemma4_shared"])), 2)
    assert_ranks_measure_as_one(ranks, one)
    for got in ranks:
        assert got["cache"]["dense"] == one["cache"]["dense"] // 2
        assert got["cache"]["view"] is None or got["cache"]["view"].kept_positions == \
            one["cache"]["view"].kept_positions


def test_tensor_parallel_gpt_neox_computes_what_one_process_computes(saved):
    """GPT-NeoX (Pythia) over two ranks by transformers' plan, which shards its one query_key_value
    projection by rows (each head's q, k and v rows together: whole heads a rank; before 2026-12-07
    read as not sharded by heads): logits, probes, greedy tokens through a HeadSparseCache (its
    attention gets no kwargs from update: the cache found by its keys on every rank) and head
    importance as one process."""
    one = measure(tiny_gpt_neox()[0])
    ranks = run_ranks(lambda rank: measure(load_tp(saved["gpt_neox"])), 2)
    assert_ranks_measure_as_one(ranks, one)
    for got in ranks:
        assert got["shard"] is not None and got["cache"]["dense"] == one["cache"]["dense"] // 2


def test_tensor_parallel_shards_that_cut_heads_or_gqa_groups_are_refused_naming_the_heads(saved):
    def attempt(rank):
        messages = {}
        for name in ("cut_group", "odd"):
            model = load_tp(saved[name])
            before = model.config._attn_implementation
            spec = headops.HeadSpec.dense(model)
            for what, call in (("patch", lambda: headops.patch(model, spec)),
                               ("cache", lambda: headops.HeadSparseCache(model, spec))):
                with pytest.raises(ValueError) as refused:
                    call()
                messages[name, what] = str(refused.value)
            assert not hasattr(model, "_headops_previous") and model.config._attn_implementation == before
        return messages

    for messages in run_ranks(attempt, 2):
        assert messages["cut_group", "patch"].startswith("headops.patch: ")
        assert "query heads 2 and 3 share KV head 1 but would be on ranks 0 and 1" in messages["cut_group", "patch"]
        assert "do not divide its 3 query heads" in messages["odd", "patch"]
        assert messages["odd", "cache"].startswith("headops.HeadSparseCache: ")


def compressed_tokens(model):
    """Greedy tokens through each compression method's cache (docs/cache.md); AdaKV's refusal."""
    methods = {"razor": headops.HeadSpec.razor(model, [(0, 1)], window=4, sinks=1),
               "snapkv": headops.HeadSpec.budget(model, budget=6, observation_window=3),
               "headkv": headops.HeadSpec.headkv(model, torch.tensor([[0.9, 0.1], [0.3, 0.5]]), budget=6, beta=1.5,
                                                 observation_window=3)}
    out = {}
    headops.patch(model, methods["razor"])
    try:
        for name, spec in methods.items():
            headops.set_spec(model, spec)
            out[name] = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=2,
                                       cache=headops.HeadSparseCache(model, spec, budget_recent=1))
        try:
            headops.HeadSparseCache(model, headops.HeadSpec.budget(model, budget=6, allocation="adakv"), budget_recent=1)
            out["adakv"] = "built"
        except NotImplementedError as e:
            out["adakv"] = str(e)
    finally:
        headops.unpatch(model)
    return out


def test_the_compression_methods_on_a_tensor_parallel_model_decode_what_one_process_decodes(saved):
    one = compressed_tokens(tiny_llama()[0])
    assert one["adakv"] == "built"  # one process holds every KV head of a layer
    for rank, got in enumerate(run_ranks(lambda rank: compressed_tokens(load_tp(saved["llama"])), 2)):
        for name in ("razor", "snapkv", "headkv"):
            assert torch.equal(got[name], one[name]), (name, rank)
        assert got["adakv"].startswith("headops.HeadSparseCache: allocation='adakv' shares each layer's budget")


def test_a_model_sharded_after_patch_is_a_clear_error_not_a_shape_error():
    model, _ = tiny_llama()
    headops.patch(model, headops.HeadSpec.dense(model))
    model.model.layers[0].self_attn._headops_spec = headops.HeadSpec.dense(model).slice_heads(range(0, 2))
    with pytest.raises(RuntimeError, match="layer 0's attention got 4 query heads, its spec has 2"):
        model(IDS)


def test_cache_view_of_one_process_lists_every_head():
    model, _ = tiny_llama()
    spec = headops.HeadSpec.streaming(model, {1: [0]}, window=2, sinks=1)
    headops.patch(model, spec)
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    with torch.no_grad():
        model(IDS[:1, :6], cache=cache)
    view = cache.whole_model_view()
    assert dataclasses.asdict(view)["rank_nbytes"] == [cache.nbytes()]
    assert view.kept_positions[0][0] == [list(range(6))] * 2
    assert view.kept_positions[1][0] == [[0, 4, 5], list(range(6))]  # sink 0, then the ring (window + max_step - 1)
    assert view.kept_tokens() * 2 * 16 * 4 == cache.ideal_nbytes()
    assert headops.patched_spec(model) is spec  # the whole-model spec (what research.with_spec restores)
    headops.unpatch(model)
    with pytest.raises(RuntimeError, match="headops.patched_spec: the model is not patched"):
        headops.patched_spec(model)


# ------------------------------------------------------------------------------ sweeps

def sweeps(model):
    """Every sweep of the library on the tiny model, with the default group (torchrun's processes
    when there are several, else this one)."""
    order = [(layer, h) for layer in (1, 0) for h in (3, 0, 2, 1)]
    curve = headops.pruning_curve(model, IDS, order, [0.0, 0.25, 0.5, 0.75, 1.0], repeats=1, max_batch_tokens=40)
    tok = CharTokenizer()
    # (the planted copying head's answers recall some needles, not others: both kinds of test)
    copier = planted_copy_llama()
    samples = [tasks.make_sample(tok, "niah_single", 400, depth, seed, haystack="repeat")
               for depth in (0.0, 1.0) for seed in (0, 6)]
    prompts = [tasks.multi_passkey(tok, 360, passkeys=2, words=2, seed=seed) for seed in range(2)]
    batches = []

    def value_fn(m, batch):
        batches.append(batch.shape[0])
        return -per_row_causal_lm_loss(m, batch)

    return {"shapley": headops.shapley(model, IDS, permutations=3, batch_size=4, value_fn=value_fn),
            "shapley_batches": batches,
            "curve": (curve["metric"], len(curve["forward_seconds"])),
            "retrieval": discover.retrieval_scores(copier, samples, min_recall=0.25, batch_size=1),
            "reasoning": discover.retrieval_reasoning_scores(copier, samples, batch_size=1),
            "ablation": discover.duo_ablation(model, prompts, sinks=2, window=8, max_batch_tokens=720).values}


def test_sweeps_split_over_two_processes_are_bitwise_the_single_process_result():
    model, _ = tiny_llama()
    want = sweeps(model)
    ranks = run_ranks(lambda rank: sweeps(model), 2)
    # 3 permutations x 9 coalitions in batches of 4 coalitions (2 rows each): ranks 0 and 1 take turns
    assert want["shapley_batches"] == [8] * 6 + [6]
    assert [got["shapley_batches"] for got in ranks] == [[8, 8, 8, 6], [8, 8, 8]]
    for got in ranks:
        assert torch.equal(got["shapley"], want["shapley"])
        assert got["curve"] == want["curve"]
        assert want["reasoning"].info["counted"] == 2 and float(want["retrieval"].values.sum()) > 0
        for method in ("retrieval", "reasoning"):
            assert torch.equal(got[method].values, want[method].values)
            assert got[method].info == want[method].info
        assert torch.equal(got["ablation"], want["ablation"])


def test_a_failing_rank_fails_every_rank_with_its_error_and_different_inputs_are_refused():
    model, _ = tiny_llama()

    def run(rank):
        def value_fn(m, batch):
            if rank == 1:
                raise ValueError("no value on rank 1")
            return -per_row_causal_lm_loss(m, batch)

        with pytest.raises(_distributed.RankFailed) as failed:
            headops.shapley(model, IDS, permutations=2, value_fn=value_fn)
        with pytest.raises(ValueError) as different:
            headops.shapley(model, IDS + rank, permutations=2)
        return str(failed.value), str(different.value)

    for failed, different in run_ranks(run, 2):
        assert failed.startswith("headops.shapley: rank 1 of 2 failed: ValueError: no value on rank 1")
        assert "value_fn" in failed  # the failing rank's traceback
        assert "were given different inputs (rank 1 differs from rank 0)" in different


def test_a_rank_that_dies_or_stalls_ends_the_sweep_with_an_error_not_a_hang():
    model, _ = tiny_llama()

    def run(rank, stall):
        _distributed.init_from_torchrun()
        group = torch.distributed.new_group(timeout=datetime.timedelta(seconds=2))  # (every rank joins it)
        if rank == 1:  # then never comes to the sweep
            time.sleep(4 if stall else 0.2)  # without a stall its process ends, as a crash would end it
            return None
        with pytest.raises(RuntimeError) as failed:
            headops.shapley(model, IDS, permutations=1, group=group)
        return str(failed.value)

    run_ranks(run, 2, False, timeout=60)  # (a hang would be a RuntimeError here, after 60 s)
    assert "Timed out" in run_ranks(run, 2, True, timeout=60)[0]


def test_the_timeout_of_the_processes_torchrun_starts_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(_distributed.TIMEOUT_VARIABLE, "2.5")
    assert _distributed.timeout() == datetime.timedelta(seconds=2.5)
    monkeypatch.delenv(_distributed.TIMEOUT_VARIABLE)
    assert _distributed.timeout() == datetime.timedelta(seconds=_distributed.DEFAULT_TIMEOUT_SECONDS)
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(_distributed.TIMEOUT_VARIABLE, bad)
        with pytest.raises(ValueError, match="HEADOPS_DISTRIBUTED_TIMEOUT must be a number of seconds > 0"):
            _distributed.timeout()


def test_sweep_group_takes_a_process_group_none_or_false():
    model, _ = tiny_llama()
    assert _distributed.sweep_group(None, model, "f") is None  # not under torchrun
    assert _distributed.sweep_group(False, model, "f") is None
    with pytest.raises(TypeError, match="headops.shapley: group must be a torch.distributed ProcessGroup"):
        headops.shapley(model, IDS, permutations=1, group="world")
    with pytest.raises(TypeError, match="group must be"):
        _distributed.sweep_group(2, model, "f")


# ------------------------------------------------------------------------------ the command line

def test_the_evaluation_split_over_two_processes_gives_the_single_process_rows(tmp_path):
    from headops import evaluate

    tok = CharTokenizer()
    samples = [tasks.make_sample(tok, "passkey", 400, j / 4, j) for j in range(5)]
    methods = ["dense", "streaming_llm:window=16"]
    kw = dict(batch_size=1, max_new_tokens=4, show_progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    one = strip(evaluate.evaluate(tiny_llama()[0], tok, samples, methods, group=False, **kw))
    out = str(tmp_path / "rows.csv")
    for rows in run_ranks(lambda rank: evaluate.evaluate(tiny_llama()[0], tok, samples, methods, out=out, **kw), 2):
        assert strip(rows) == one  # every rank gets every row, in the single process's order
    assert strip(evaluate.read_rows(out)) == one  # written once, by rank 0
    again = run_ranks(lambda rank: evaluate.evaluate(tiny_llama()[0], tok, samples, methods, out=out, **kw), 2)
    assert all(strip(rows) == one for rows in again) and strip(evaluate.read_rows(out)) == one  # resumed: nothing new


def test_the_commands_under_torchrun_write_once_what_one_process_writes(tmp_path):
    from headops.cli import main

    options = {"shapley": ["--tokens", "16", "--permutations", "3"], "prune": ["--tokens", "16", "--steps", "4",
                                                                             "--repeats", "1"],
               "discover": ["--method", "retrieval", "--lengths", "400", "--depths", "0", "1", "--needles", "1",
                            "--batch-size", "1"],
               "evaluate": ["--tasks", "passkey", "--lengths", "400", "--samples", "3", "--methods", "dense",
                            "streaming_llm:window=16", "--batch-size", "1", "--max-new-tokens", "4"]}

    def run_all(suffix):
        return [main([name, "--model", "tiny", "--no-plot", "--quiet", "--out", str(tmp_path / f"{name}_{suffix}"),
                      *extra]) for name, extra in options.items()]

    assert run_all("one") == [0] * 4
    assert run_ranks(lambda rank: run_all("two"), 2) == [[0] * 4] * 2
    assert sorted(os.listdir(tmp_path)) == sorted([f"{name}_{n}.csv" for name in options for n in ("one", "two")] +
                                                  ["evaluate_one_summary.csv", "evaluate_two_summary.csv"])
    rows = lambda n: [line.rsplit(",", 1)[0] for line in (tmp_path / f"evaluate_{n}.csv").read_text().splitlines()]  # noqa: E731
    assert rows("two") == rows("one")  # (not the seconds)
    for name in ("shapley", "discover"):
        assert (tmp_path / f"{name}_two.csv").read_text() == (tmp_path / f"{name}_one.csv").read_text()
    curve = [line.split(",")[:3] for line in (tmp_path / "prune_one.csv").read_text().splitlines()]  # (not the times)
    assert [line.split(",")[:3] for line in (tmp_path / "prune_two.csv").read_text().splitlines()] == curve
