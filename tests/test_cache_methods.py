"""The head-level compression methods of the cache (docs/DESIGN.md section 6): full prefill,
RazorAttention's compensation token, SnapKV / AdaKV / HeadKV budgets, the HeadSpec constructors
of each method, and building a cache from a dense prefill.

Oracles: ``headops.attention`` and ``headops.reference.attention`` over what each head keeps;
plain-PyTorch transcriptions of the allocation formulas in this file.
"""

import math

import pytest
import torch

import headops
from headops import reference

from conftest import assert_close, make_qkv

F64 = torch.float64


def keyword_cache(Hq=4, Hkv=2, D=8, *, kinds, window=None, sinks=None, B=2, L=1, max_step=2, **options):
    return headops.HeadSparseCache(num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds=kinds,
                                   window=window, sinks=sinks, batch_size=B, dtype=F64, max_step=max_step, **options)


# ------------------------------------------------------------------------------ prefill="full"


@pytest.mark.parametrize("lengths", [None, [9, 5]])
def test_full_prefill_reads_the_whole_prompt_then_keeps_each_kind(lengths):
    B, S, Hq, Hkv, D = 2, 9, 6, 3, 8
    window, sinks = [2, 3, -1, 4, 1, 2], [1, 0, 0, 2, 0, 1]
    cache = keyword_cache(Hq, Hkv, D, kinds=["streaming", "full", "streaming"], window=window, sinks=sinks, B=B,
                          max_step=1, prefill="full")
    assert cache.options["prefill"] == "full"
    steps = 7
    q, k, v = make_qkv(B, S + steps, S + steps, Hq, Hkv, D, F64)
    gate = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, -1.0], dtype=F64)
    out = cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, gate=gate)
    rows = lengths or [S] * B
    for b, n in enumerate(rows):
        # every head: full causal attention over the prompt (window and sinks do not apply)
        want = reference.attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], gate=gate)
        assert_close(out[b:b + 1, :n], want, 1e-12, 1e-12)
        assert bool((out[b, n:] == 0).all())
    # then decode: each head sees what its kind keeps, exactly as after a "spec" prefill
    spec_cache = keyword_cache(Hq, Hkv, D, kinds=["streaming", "full", "streaming"], window=window, sinks=sinks, B=B,
                               max_step=1)
    spec_cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, gate=gate)
    for i in range(steps):
        new = [torch.stack([t[b, n + i:n + i + 1] for b, n in enumerate(rows)]) for t in (q, k, v)]
        got = cache.attention(0, *new, gate=gate)
        assert torch.equal(got, spec_cache.attention(0, *new, gate=gate))
        for b, n in enumerate(rows):
            p = n + i + 1
            want = headops.attention(q[b:b + 1, :p], k[b:b + 1, :p], v[b:b + 1, :p], gate=gate,
                                     window=torch.tensor(window), sinks=torch.tensor(sinks))[:, -1:]
            assert_close(got[b:b + 1], want, 1e-12, 1e-12)
    for b, n in enumerate(rows):
        layer = cache._layers[0]
        p = n + steps
        assert layer.kept_positions(b, 1).tolist() == list(range(p))  # the full KV head
        assert layer.kept_positions(b, 0).tolist() == [0] + list(range(p - 3, p))  # sinks 1 + ring 3
    assert cache.ideal_nbytes() == spec_cache.ideal_nbytes()


def test_prefill_option_from_the_spec_and_overridden():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    spec = headops.HeadSpec.streaming(model, {0: [1]}, window=3, sinks=1)
    assert headops.HeadSparseCache(model, spec).options["prefill"] == "spec"
    spec.cache_options = {"prefill": "full"}
    spec.validate()
    assert headops.HeadSparseCache(model, spec).options["prefill"] == "full"
    assert headops.HeadSparseCache(model, spec, prefill="spec").options["prefill"] == "spec"
    again = headops.HeadSpec.from_dict(spec.to_dict())
    assert again.cache_options == {"prefill": "full"}
    assert spec.slice_heads(range(0, 2)).cache_options == {"prefill": "full"}
    assert spec.to("cpu").cache_options == {"prefill": "full"}


@pytest.mark.parametrize("bad, word", [
    (dict(prefill="dense"), "prefill"),
    (dict(prefill=None), "prefill"),
])
def test_bad_cache_options(bad, word):
    with pytest.raises(ValueError, match=word):
        keyword_cache(kinds="full", **bad)


def test_bad_spec_cache_options():
    spec = headops.HeadSpec(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    spec.cache_options = {"prefil": "full"}
    with pytest.raises(ValueError, match="prefil"):
        spec.validate()
    spec.cache_options = {"prefill": "everything"}
    with pytest.raises(ValueError, match="prefill"):
        spec.validate()
    spec.cache_options = ["prefill"]
    with pytest.raises(TypeError, match="cache_options"):
        spec.validate()


def test_full_prefill_generation_through_a_patched_model():
    """A patched model generating through a cache with prefill="full": the prompt's logits are
    the dense model's (every head reads the whole prompt); each later token equals recomputing
    the whole sequence with full attention on the prompt rows and each head's own window and
    sinks on the generated rows."""
    from transformers import AttentionInterface

    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    S, new = 12, 6
    ids = torch.randint(0, 97, (1, S))
    dense_logits = model(ids).logits.double()
    spec = headops.HeadSpec.streaming(model, {0: [1], 1: [0, 1]}, window=3, sinks=1)

    def oracle(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        args = spec.layer_args(module.layer_idx)
        out = headops.attention(q, k, v, layout="bhsd", softmax_scale=scaling)
        if q.shape[2] > S:  # the generated rows see what their heads keep
            out[:, :, S:] = headops.attention(q[:, :, S:], k, v, layout="bhsd", softmax_scale=scaling, **args)[:, :, :]
        return out.transpose(1, 2), None

    AttentionInterface.register("headops_full_prefill_oracle", oracle)
    model.set_attn_implementation("headops_full_prefill_oracle")
    want = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=False)
    model.set_attn_implementation("sdpa")
    headops.patch(model, spec)
    try:
        cache = headops.HeadSparseCache(model, spec, prefill="full", max_step=1)
        assert_close(model(ids, cache=cache, use_cache=True).logits.double(), dense_logits, 1e-5, 1e-5)
        spec_cache = headops.HeadSparseCache(model, spec, max_step=1)
        assert not torch.allclose(model(ids, cache=spec_cache, use_cache=True).logits.double(), dense_logits,
                                  atol=1e-3)  # (the windows do change the prompt's outputs)
        got = model.generate(ids, max_new_tokens=new, do_sample=False,
                             cache=headops.HeadSparseCache(model, spec, prefill="full", max_step=1))
        assert torch.equal(got, want)
    finally:
        headops.unpatch(model)


# ------------------------------------------------------------------------------ constructors


def test_streaming_llm_makes_every_kv_head_streaming():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    spec = headops.HeadSpec.streaming_llm(model, window=16, sinks=2)
    assert all(k == "streaming" for row in spec.cache_kind for k in row)
    assert bool((spec.window == 16).all()) and bool((spec.sinks == 2).all())
    cache = headops.HeadSparseCache(model, spec)
    assert cache.kinds == spec.cache_kind
    with pytest.raises(ValueError, match="window"):
        headops.HeadSpec.streaming_llm(model, window=0)
    with pytest.raises(ValueError, match="sinks"):
        headops.HeadSpec.streaming_llm(model, window=4, sinks=-1)


# ------------------------------------------------------------------------------ budgets: the formulas


def adakv_transcription(scores, budget, alpha, floors):
    """AdaKV as kvpress's AdaKVPress writes it, in plain Python: each head's top int(alpha *
    budget) scores (here at least its floor) are raised to +inf, then the layer's H * budget best
    scores are kept; ties: lower head, then lower position. Returns (counts, kept sets)."""
    H, n = scores.shape
    if n <= budget:
        return [n] * H, [list(range(n)) for _ in range(H)]
    s = [[float(x) for x in row] for row in scores]
    for h in range(H):
        safe = min(budget, max(int(alpha * budget), floors[h]))
        for j in sorted(range(n), key=lambda j: (-s[h][j], j))[:safe]:
            s[h][j] = math.inf
    order = sorted(((h, j) for h in range(H) for j in range(n)), key=lambda hj: (-s[hj[0]][hj[1]], hj[0], hj[1]))
    chosen = order[:H * budget]
    return ([sum(1 for h2, _ in chosen if h2 == h) for h in range(H)],
            [sorted(j for h2, j in chosen if h2 == h) for h in range(H)])


def headkv_transcription(scores, budget, beta):
    """HeadKV's ReasonSnapKVCluster: score / sum, a pool of (budget // beta) * L * H tokens shared
    by score on top of budget - budget // beta per head, rounded half to even."""
    L, H = len(scores), len(scores[0])
    total = sum(sum(r) for r in scores)
    pool = (budget // beta) * L * H
    floor = budget - budget // beta
    return [[round(x / total * pool + floor) for x in r] for r in scores]


def pyramid_transcription(L, budget, beta, window):
    """PyramidKV's layer budgets as kvpress's PyramidKVPress.get_layer_budget computes them (with its
    max_capacity_prompt - window_size = budget - window: the average share beyond the window), the
    window added as KVCache-Factory's PyramidKV keeps it."""
    shared = budget - window
    min_num = shared / beta
    max_num = shared * 2 - min_num
    steps = (max_num - min_num) / (L - 1)
    return [window + round(max_num - layer * steps) for layer in range(L)]


@pytest.mark.parametrize("L, budget, beta, window", [(30, 128, 20, 8), (30, 512, 20, 8), (7, 64, 2.5, 0),
                                                     (2, 40, 20, 8), (12, 33, 1, 4), (5, 9, 20, 8)])
def test_pyramid_budgets_equal_the_formula(L, budget, beta, window):
    """Each layer's budget falls in equal steps from the first to the last (beta = 1: flat), as
    kvpress and PyramidKV compute it, and they sum to L x budget (each rounded)."""
    from headops import budgets

    got = budgets.pyramid_budgets(L, budget, beta, kept=window)
    assert got == pyramid_transcription(L, budget, beta, window)
    assert abs(sum(got) - L * budget) <= L // 2 and got == sorted(got, reverse=True)
    assert beta != 1 or got == [budget] * L
    assert budgets.pyramid_budgets(1, budget, beta, kept=window) == [budget]


@pytest.mark.parametrize("bad, word", [(dict(num_layers=0), "num_layers"), (dict(beta=0.5), "beta"),
                                       (dict(budget=8), "budget must be an int > kept"), (dict(kept=-1), "kept")])
def test_pyramid_bad_arguments(bad, word):
    from headops import budgets

    kw = dict(num_layers=4, budget=32, beta=20, kept=8)
    kw.update(bad)
    with pytest.raises(ValueError, match=word):
        budgets.pyramid_budgets(**kw)


def test_pyramid_spec_holds_the_bytes_of_uniform_budgets():
    """HeadSpec.pyramid: every KV head a budget head of its layer's pyramid budget (AdaKV within a
    layer too); through a patched tiny Llama a prompt longer than every budget leaves exactly the
    bytes of HeadSpec.budget at the same average, the first layer holding more, and generation
    runs on; what cannot make a pyramid is refused by name."""
    from headops import budgets
    from headops.testing import tiny_llama

    model, _ = tiny_llama()  # 2 layers, 4 query / 2 KV heads
    spec = headops.HeadSpec.pyramid(model, budget=24, beta=4, observation_window=4)
    want = budgets.pyramid_budgets(2, 24, 4, kept=8)
    assert want == [36, 12] and spec.cache_budget == [[36, 36], [12, 12]]
    assert spec.cache_kind == [["budget"] * 2] * 2
    assert spec.cache_options == {"allocation": "uniform", "observation_window": 4}
    assert headops.HeadSpec.from_dict(spec.to_dict()).cache_budget == spec.cache_budget
    ada = headops.HeadSpec.pyramid(model, budget=24, beta=4, allocation="adakv", alpha=0.5)
    assert ada.cache_options == {"allocation": "adakv", "adakv_alpha": 0.5}
    ids = torch.randint(3, 97, (1, 50), generator=torch.Generator().manual_seed(0))
    held = {}
    for name, s in (("pyramid", spec), ("uniform", headops.HeadSpec.budget(model, budget=24)), ("ada", ada)):
        headops.patch(model, s)
        cache = headops.HeadSparseCache(model, s)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, cache=cache, pad_token_id=0)
        assert out.shape == (1, 53)
        held[name] = (cache.ideal_nbytes(), [len(layer.kept_positions(0, 0)) for layer in cache._layers])
        headops.unpatch(model)
    assert held["pyramid"][0] == held["uniform"][0] == held["ada"][0]
    assert held["pyramid"][1] == [36, 12] and held["uniform"][1] == [24, 24]
    with pytest.raises(ValueError, match="budget must be an int > window"):
        headops.HeadSpec.pyramid(model, budget=8)
    with pytest.raises(ValueError, match="beta must be small enough"):
        headops.HeadSpec.pyramid(model, budget=9, beta=20)
    with pytest.raises(ValueError, match="allocation"):
        headops.HeadSpec.pyramid(model, budget=24, allocation="headkv")


@pytest.mark.parametrize("case", range(40))
def test_adakv_counts_and_sets_equal_the_transcription(case):
    from headops import budgets

    g = torch.Generator().manual_seed(case)
    H = int(torch.randint(1, 5, (1,), generator=g))
    n = int(torch.randint(1, 30, (1,), generator=g))
    budget = int(torch.randint(1, 25, (1,), generator=g))  # sometimes larger than the prompt
    alpha = [0.0, 0.2, 0.5, 1.0, 0.35][case % 5]
    if case % 3 == 0:  # many ties
        scores = torch.randint(0, 3, (H, n), generator=g).double()
    elif case % 3 == 1:  # one head takes everything (the others' floors bind)
        scores = torch.rand(H, n, generator=g, dtype=F64) * 1e-3
        scores[0] += 10
    else:
        scores = torch.rand(H, n, generator=g, dtype=F64)
    floors = [int(x) for x in torch.randint(1, max(2, budget + 1), (H,), generator=g)]
    counts, kept = adakv_transcription(scores, budget, alpha, floors)
    assert budgets.adakv_counts(scores, budget, alpha, floors) == counts
    if n > budget:
        assert sum(counts) == H * budget
        assert all(c >= min(budget, max(int(alpha * budget), f)) for c, f in zip(counts, floors))
    for h in range(H):
        assert budgets.top_positions(scores[h], counts[h]).tolist() == kept[h]


def test_adakv_floor_binds():
    from headops import budgets

    scores = torch.tensor([[9.0] * 20, [0.0] * 20])  # head 0 outscores head 1 everywhere
    assert budgets.adakv_counts(scores, 10, 0.2, [1, 1]) == [18, 2]  # head 1 gets exactly its floor int(0.2 * 10)
    assert budgets.adakv_counts(scores, 10, 0.0, [3, 3]) == [17, 3]
    assert budgets.adakv_counts(scores, 10, 1.0, [1, 1]) == [10, 10]  # alpha 1: uniform
    assert budgets.adakv_counts(scores, 30, 0.2, [1, 1]) == [20, 20]  # the budget exceeds the prompt


@pytest.mark.parametrize("beta", [1.0, 1.005, 1.2, 2.0, 20.0])
def test_headkv_budgets_equal_the_formula(beta):
    from headops import budgets

    g = torch.Generator().manual_seed(int(beta * 1000))
    scores = torch.rand(3, 4, generator=g, dtype=F64)
    scores[1, 2] = 0.0
    got = budgets.headkv_budgets(scores, 128, beta)
    assert got.tolist() == headkv_transcription(scores.tolist(), 128, beta)
    assert abs(int(got.sum()) - 128 * 12) <= 12  # (rounding)
    if beta == 20.0:
        assert int(got.min()) >= 128 - 128 // 20


@pytest.mark.parametrize("beta", [1.0, 1.2, 2.0])
def test_headkv_budgets_keep_a_floor_and_the_total(beta):
    """A floor (a budget head's sinks + budget_recent + 1): heads whose share falls below get it and
    the others share the rest by their scores (water-filling: repeated while more fall below), the
    total as without; above every head's base it changes nothing. Before 2026-12-07 a head of a
    small score got budget - budget // beta = 8 at a budget of 48, which a cache of budget_recent 8
    refused (the evaluation's headkv at small budgets, depending on the scores)."""
    from headops import budgets

    g = torch.Generator().manual_seed(int(beta * 10))
    scores = torch.rand(3, 4, generator=g, dtype=F64) ** 4  # (several small)
    scores[1, 2] = 0.0
    plain = budgets.headkv_budgets(scores, 48, beta)
    floored = budgets.headkv_budgets(scores, 48, beta, floor=30)
    assert int(floored.min()) >= 30 and int(plain.min()) < 30
    assert abs(int(floored.sum()) - 48 * 12) <= 12  # (rounding)
    high = floored > 30  # the heads above the floor keep their order by score
    order = scores[high].argsort()
    assert bool((floored[high][order].diff() >= 0).all())
    base = int(48 - 48 // beta)
    assert torch.equal(budgets.headkv_budgets(scores, 48, beta, floor=base), plain)  # at most the base: unchanged
    with pytest.raises(ValueError, match="floor"):
        budgets.headkv_budgets(scores, 48, beta, floor=49)


def test_headkv_spec_window_keeps_every_head_above_budget_recent():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    scores = torch.tensor([[1.0, 1e-6], [0.5, 0.7]], dtype=F64)
    spec = headops.HeadSpec.headkv(model, scores, budget=20, beta=1.2, window=8)
    assert min(min(row) for row in spec.cache_budget) >= 9
    assert min(min(row) for row in headops.HeadSpec.headkv(model, scores, budget=20, beta=1.2).cache_budget) < 9
    headops.HeadSparseCache(model, spec)  # (budget_recent 8: every head has room)
    with pytest.raises(ValueError, match="window"):
        headops.HeadSpec.headkv(model, scores, budget=8, beta=1.2, window=8)


@pytest.mark.parametrize("bad, word", [
    (dict(scores=torch.ones(3)), "scores"),
    (dict(scores=-torch.ones(2, 2)), "scores"),
    (dict(scores=torch.zeros(2, 2)), "scores"),
    (dict(scores=torch.tensor([[1.0, math.nan]])), "scores"),
    (dict(beta=0.5), "beta"),
    (dict(beta=math.inf), "beta"),
    (dict(budget=0), "budget"),
])
def test_headkv_bad_arguments(bad, word):
    from headops import budgets

    kw = dict(scores=torch.ones(2, 2), budget=16, beta=1.5)
    kw.update(bad)
    with pytest.raises(ValueError, match=word):
        budgets.headkv_budgets(**kw)


def snapkv_reference(q_obs, k, scale, group, pool_kernel=None, sink_logit=None, key_bias=None, pooling="max",
                     scored_keys=None):
    """[Hkv, n] in float64: the window's softmax attention on each key, summed over the window,
    pooled per query head over the first scored_keys keys (max, or the kernel's mean with zeros
    past the ends), summed over each KV head's group."""
    w, Hq, D = q_obs.shape
    n = k.shape[0]
    kk = k.double().repeat_interleave(group, dim=1)
    logits = torch.einsum("ihd,jhd->hij", q_obs.double(), kk) * scale
    if key_bias is not None:
        logits = logits + key_bias.view(Hq, 1, n)
    logits = logits.masked_fill(torch.arange(n).view(1, 1, n) > torch.arange(n - w, n).view(1, w, 1), -math.inf)
    if sink_logit is not None:
        logits = torch.cat([logits, sink_logit.view(Hq, 1, 1).expand(Hq, w, 1).double()], dim=-1)
    mass = torch.softmax(logits, dim=-1)[..., :n].sum(dim=1)
    m = n if scored_keys is None else scored_keys
    if pool_kernel and m > 0:
        r = pool_kernel // 2
        pool = (lambda x: x.amax(dim=1)) if pooling == "max" else (lambda x: x.sum(dim=1) / pool_kernel)
        mass = torch.cat([torch.stack([pool(mass[:, max(0, j - r):min(m, j + r + 1)]) for j in range(m)], dim=1),
                          mass[:, m:]], dim=1)
    return mass.view(-1, group, n).sum(dim=1)


@pytest.mark.parametrize("pool_kernel, pooling, scored_keys", [
    (None, "max", None), (1, "max", None), (3, "max", None), (7, "max", None), (3, "avg", None), (7, "avg", None),
    (7, "max", 31), (5, "avg", 31), (5, "avg", 0), (None, "avg", 20)])
@pytest.mark.usefixtures("probe_path")  # the CPU probe kernel's key mass, and the CUDA path's
def test_snapkv_scores_equal_the_reference(pool_kernel, pooling, scored_keys):
    from headops import budgets
    from headops._args import HeadShapes, head_args

    n, w, Hq, Hkv, D = 37, 6, 6, 3, 8
    q, k, v = make_qkv(1, n, n, Hq, Hkv, D, F64)
    sink_logit = torch.randn(Hq, dtype=F64)
    key_bias = torch.randn(Hq, n, dtype=F64)
    args = head_args("test", HeadShapes(1, Hq, n, D, D), q.device, sink_logit=sink_logit, key_bias=key_bias,
                     softmax_scale=0.4)
    options = dict(pool_kernel=pool_kernel, pooling=pooling, scored_keys=scored_keys)
    got = budgets.snapkv_scores(q[:, -w:], k, v, args, Hq // Hkv, **options)
    want = snapkv_reference(q[0, -w:], k[0], 0.4, Hq // Hkv, pool_kernel, sink_logit, key_bias, pooling, scored_keys)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    only = budgets.snapkv_scores(q[:, -w:], k, v, args, Hq // Hkv, heads=[1], **options)
    assert bool((only[[0, 2]] == 0).all()) and torch.equal(only[1], got[1])


# ------------------------------------------------------------------------------ budgets: the cache


def budget_layer(Hq, Hkv, kinds, sinks, budget, recent, B=2, max_step=2, **options):
    window = [-1] * Hq
    return headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=8, kinds=kinds,
                                   window=window, sinks=sinks, budget=budget, budget_recent=recent, batch_size=B,
                                   dtype=F64, max_step=max_step, **options)


def kept_bias(cache, b, Hq, Hkv, p):
    """[1, Hq, p]: 0 on the positions row b's KV heads keep, -inf elsewhere."""
    group = Hq // Hkv
    kb = torch.full((1, Hq, p), -math.inf, dtype=F64)
    for h in range(Hkv):
        kb[0, h * group:(h + 1) * group, cache._layers[0].kept_positions(b, h)] = 0.0
    return kb


@pytest.mark.parametrize("allocation", ["adakv", "uniform", "headkv"])
@pytest.mark.parametrize("lengths", [None, [40, 23]])
@pytest.mark.parametrize("window_kept, pooling", [(False, "max"), (True, "avg")])
def test_budget_allocation_keeps_the_top_scored_positions(allocation, lengths, window_kept, pooling):
    from headops import budgets
    from headops._args import HeadShapes, head_args

    B, S, Hq, Hkv, D = 2, 40, 6, 3, 8
    kinds = ["budget", "full", "budget"]
    sinks = [1, 0, 0, 0, 2, 1]  # KV heads 0 and 2 keep 1 and 2 sinks
    budget, recent, w, pool = 10, 2, 5, 3
    if window_kept:  # a window larger than the smallest head can keep: the latest of it first
        w = 9
    per_head_budget = [budget, None, budget] if allocation != "headkv" else [8, None, 12]
    cache = budget_layer(Hq, Hkv, kinds, sinks, per_head_budget, recent, B=B, allocation=allocation,
                         adakv_alpha=0.2, observation_window=w, pool_kernel=pool, pooling=pooling,
                         keep_observation_window=window_kept)
    steps = 6
    q, k, v = make_qkv(B, S + steps, S + steps, Hq, Hkv, D, F64)
    scale = torch.tensor([0.3, 0.5, 0.2, 0.1, 0.9, 0.4], dtype=F64)
    out = cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, softmax_scale=scale)
    rows = lengths or [S] * B
    st = cache._layers[0]
    bpt = 2 * D * 8
    for b, n in enumerate(rows):
        assert_close(out[b:b + 1, :n], reference.attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n],
                                                           softmax_scale=scale), 1e-12, 1e-12)
        args = head_args("test", HeadShapes(1, Hq, n, D, D), q.device, softmax_scale=scale[None])
        scores = budgets.snapkv_scores(q[b:b + 1, n - w:n], k[b:b + 1, :n], v[b:b + 1, :n], args, 2,
                                       pool_kernel=pool, pooling=pooling,
                                       scored_keys=n - w if window_kept else None)[[0, 2]].double()
        forced = scores.clone()
        for i, s in enumerate([1, 2]):
            if window_kept:  # above every score, the latest highest
                forced[i, n - w:] = 1e6 + torch.arange(w, dtype=F64)
            forced[i, :s] = math.inf
            forced[i, n - recent:] = math.inf
        if allocation == "adakv":
            counts, kept = adakv_transcription(forced, budget, 0.2, [1 + recent + 1, 2 + recent + 1])
        else:
            counts = [min(n, x) for x in (per_head_budget[0], per_head_budget[2])]
            kept = [sorted(sorted(range(n), key=lambda j: (-float(forced[i, j]), j))[:counts[i]]) for i in range(2)]
        assert st.kept_positions(b, 0).tolist() == kept[0]
        assert st.kept_positions(b, 2).tolist() == kept[1]
        if allocation == "adakv":
            assert st.budget_sizes(b) == counts and sum(counts) == 2 * budget
        if window_kept:  # each head's window: all of it, or its latest tokens as far as its size goes
            for h, s in ((0, 1), (2, 2)):
                held = set(st.kept_positions(b, h).tolist())
                in_window = [j for j in range(n - w, n) if j in held]
                assert in_window == list(range(n - len(in_window), n))
                assert len(in_window) == min(w, st.budget_sizes(b)[h // 2] - s)
    # storage holds exactly what each row and head keeps: the budget slots are all used
    assert cache.ideal_nbytes() == sum(n + sum(st.budget_sizes(b)) for b, n in enumerate(rows)) * bpt
    assert (st.ring_k.numel() + st.ring_v.numel()) * 8 == B * sum(st.budget_sizes(0)) * bpt
    # decode: one call per layer over every row's own layout; equal to attention over the kept set
    for i in range(steps):
        new = [torch.stack([t[b, n + i:n + i + 1] for b, n in enumerate(rows)]) for t in (q, k, v)]
        got = cache.attention(0, *new, softmax_scale=scale)
        for b, n in enumerate(rows):
            p = n + i + 1
            kb = kept_bias(cache, b, Hq, Hkv, p)
            want = reference.attention(q[b:b + 1, p - 1:p], k[b:b + 1, :p], v[b:b + 1, :p], key_bias=kb,
                                       softmax_scale=scale)
            assert_close(got[b:b + 1], want, 1e-12, 1e-12)
            for h in (0, 2):
                kept = st.kept_positions(b, h)
                assert kept.numel() == min(p, st.budget_sizes(b)[h // 2])
                assert p - 1 in kept.tolist()


def kvpress_snapkv_transcription(q_win, k, group, kernel):
    """kvpress 0.5.5's SnapKVPress.score in float64 (q_win [w, Hq, D], k [n, Hkv, D]): the last w
    queries' softmax (causal, 1/sqrt(D)) on the keys before the window, averaged over the window,
    avg-pooled (zeros past the ends), averaged over each KV head's group; the window's keys get
    the maximum + 1, so that they are kept. [Hkv, n]."""
    import torch.nn.functional as F

    w, Hq, D = q_win.shape
    n = k.shape[0]
    logits = torch.einsum("ihd,jhd->hij", q_win.double(), k.double().repeat_interleave(group, dim=1)) / math.sqrt(D)
    logits = logits.masked_fill(torch.arange(n).view(1, 1, n) > torch.arange(n - w, n).view(1, w, 1), -math.inf)
    scores = torch.softmax(logits, dim=-1)[..., :n - w].mean(dim=1)
    scores = F.avg_pool1d(scores[None], kernel, padding=kernel // 2, stride=1)[0]
    scores = scores.view(-1, group, n - w).mean(dim=1)
    return F.pad(scores, (0, w), value=float(scores.max()) + 1)


@pytest.mark.parametrize("allocation", ["uniform", "adakv"])
def test_kvpress_options_select_what_kvpress_selects(allocation):
    """pooling="avg" and keep_observation_window=True with no sinks and no budget_recent: each
    budget head keeps what kvpress's SnapKVPress (and AdaKVPress around it) keeps at the same
    budget, transcribed here (scores near the cut, within float32 rounding, may swap)."""
    Hq, Hkv, D, n, w, kernel, budget, alpha = 6, 3, 8, 57, 7, 5, 19, 0.2
    cache = budget_layer(Hq, Hkv, "budget", [0] * Hq, budget, 0, B=1, allocation=allocation, adakv_alpha=alpha,
                         observation_window=w, pool_kernel=kernel, pooling="avg", keep_observation_window=True)
    q, k, v = make_qkv(1, n, n, Hq, Hkv, D, F64)
    cache.attention(0, q, k, v)
    scores = kvpress_snapkv_transcription(q[0, -w:], k[0], Hq // Hkv, kernel)
    if allocation == "uniform":
        ranked = scores
        kept = [set(torch.topk(scores[h], budget).indices.tolist()) for h in range(Hkv)]
    else:  # AdaKVPress: each head's top max(1, int(alpha * budget)) raised, then the layer's top Hkv * budget
        ranked = scores.clone()
        for h in range(Hkv):
            ranked[h, torch.topk(scores[h], max(1, int(budget * alpha))).indices] = torch.finfo(F64).max
        chosen = torch.topk(ranked.reshape(-1), Hkv * budget).indices
        kept = [set((chosen[chosen // n == h] % n).tolist()) for h in range(Hkv)]
    cut = torch.sort(ranked.reshape(-1) if allocation == "adakv" else ranked, descending=True).values
    st = cache._layers[0]
    for h in range(Hkv):
        got = set(st.kept_positions(0, h).tolist())
        threshold = float(cut[Hkv * budget - 1] if allocation == "adakv" else cut[h, budget - 1])
        for j in got ^ kept[h]:
            assert abs(float(ranked[h, j]) - threshold) <= 1e-6, (h, j, got ^ kept[h])
        assert set(range(n - w, n)) <= got  # the whole observation window


@pytest.mark.parametrize("allocation", ["uniform", "adakv", "headkv"])
def test_append_room_keeps_appended_tokens_until_it_is_full(allocation):
    """append_room: the prefill selects as without it; the next `room` appended tokens fill free
    slots and evict nothing (the prompt compressed once); past the room eviction resumes. Decode
    stays attention over the kept set; ideal bytes count the slots filled, nbytes the slots held."""
    B, S, Hq, Hkv, D, room = 2, 40, 6, 3, 8, 5
    kinds, sinks = ["budget", "full", "budget"], [1, 0, 0, 0, 2, 1]
    per_head_budget = [10, None, 10] if allocation != "headkv" else [8, None, 12]
    options = dict(allocation=allocation, observation_window=5, pool_kernel=3)
    without = budget_layer(Hq, Hkv, kinds, sinks, per_head_budget, 2, B=B, max_step=1, **options)
    cache = budget_layer(Hq, Hkv, kinds, sinks, per_head_budget, 2, B=B, max_step=1, append_room=room, **options)
    steps = room + 3
    q, k, v = make_qkv(B, S + steps, S + steps, Hq, Hkv, D, F64)
    lengths = [S, 31]
    for c in (without, cache):
        c.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths)
    st, ref = cache._layers[0], without._layers[0]
    bpt = 2 * D * 8
    for b in range(B):
        assert st.budget_sizes(b) == [n + room for n in ref.budget_sizes(b)]
        for h in (0, 2):  # the same selection
            assert torch.equal(st.kept_positions(b, h), ref.kept_positions(b, h))
    selected = {(b, h): st.kept_positions(b, h).tolist() for b in range(B) for h in (0, 2)}
    assert cache.ideal_nbytes() == without.ideal_nbytes()
    assert cache.nbytes() - without.nbytes() == B * 2 * room * (bpt + 12)  # K, V; position, mass
    for i in range(steps):
        new = [torch.stack([t[b, n + i:n + i + 1] for b, n in enumerate(lengths)]) for t in (q, k, v)]
        got = cache.attention(0, *new)
        for b, n in enumerate(lengths):
            p = n + i + 1
            want = reference.attention(q[b:b + 1, p - 1:p], k[b:b + 1, :p], v[b:b + 1, :p],
                                       key_bias=kept_bias(cache, b, Hq, Hkv, p))
            assert_close(got[b:b + 1], want, 1e-12, 1e-12)
            for h in (0, 2):
                kept = st.kept_positions(b, h).tolist()
                if i < room:  # nothing evicted: the selection and every appended token
                    assert kept == selected[b, h] + list(range(n, p))
                else:  # full: one token evicted per step, never the newest
                    assert len(kept) == len(selected[b, h]) + room and p - 1 in kept
    assert cache.ideal_nbytes() == sum(n + steps + sum(st.budget_sizes(b)) for b, n in enumerate(lengths)) * bpt


def test_adakv_budgets_larger_than_the_prompt_keep_everything():
    cache = budget_layer(4, 2, "budget", [0] * 4, 30, 2, allocation="adakv")
    q, k, v = make_qkv(2, 12, 12, 4, 2, 8, F64)
    cache.attention(0, q, k, v)
    st = cache._layers[0]
    for b in range(2):
        assert st.budget_sizes(b) == [30, 30]
        assert st.kept_positions(b, 0).tolist() == list(range(12)) == st.kept_positions(b, 1).tolist()


@pytest.mark.parametrize("bad, word", [
    (dict(allocation="snapkv"), "allocation"),
    (dict(allocation="adakv", adakv_alpha=1.5), "adakv_alpha"),
    (dict(allocation="adakv", adakv_alpha=-0.1), "adakv_alpha"),
    (dict(adakv_alpha=True), "adakv_alpha"),
    (dict(observation_window=0), "observation_window"),
    (dict(pool_kernel=4), "pool_kernel"),
    (dict(pool_kernel=0), "pool_kernel"),
    (dict(pooling="mean"), "pooling"),
    (dict(keep_observation_window=1), "keep_observation_window"),
    (dict(allocation="adakv", budget=[10, 12]), "budget"),
    (dict(budget=[10, 3]), "budget"),  # does not fit sinks + budget_recent
    (dict(append_room=-1), "append_room"),
    (dict(append_room=2.0), "append_room"),
])
def test_budget_option_errors(bad, word):
    kw = dict(budget=10)
    kw.update(bad)
    budget = kw.pop("budget")
    with pytest.raises(ValueError, match=word):
        budget_layer(4, 2, "budget", [0, 0, 1, 0], budget, 2, **kw)


def test_budget_and_headkv_constructors():
    from headops import budgets
    from headops.testing import tiny_llama

    model, _ = tiny_llama()  # 2 layers, 4 query / 2 KV heads
    spec = headops.HeadSpec.budget(model, budget=24, allocation="adakv", alpha=0.3, observation_window=4,
                                   pool_kernel=7)
    assert spec.cache_kind == [["budget"] * 2] * 2 and spec.cache_budget == [[24] * 2] * 2
    assert spec.cache_options == {"allocation": "adakv", "adakv_alpha": 0.3, "observation_window": 4,
                                  "pool_kernel": 7}
    cache = headops.HeadSparseCache(model, spec, budget_recent=2)
    assert cache.options["allocation"] == "adakv" and cache.options["pool_kernel"] == 7
    old_form = headops.HeadSpec.budget(model, {1: [0]}, budget=9)
    assert old_form.cache_kind == [["full", "full"], ["budget", "full"]]
    assert old_form.cache_options == {"allocation": "uniform"}

    scores = torch.tensor([[0.9, 0.1, 0.0, 0.2], [0.5, 0.4, 0.3, 0.0]])  # per query head
    spec = headops.HeadSpec.headkv(model, scores, budget=32, beta=1.5)
    want = budgets.headkv_budgets(torch.tensor([[0.5, 0.1], [0.45, 0.15]], dtype=F64), 32, 1.5).tolist()
    assert spec.cache_budget == want and spec.cache_options == {"allocation": "headkv"}
    cache = headops.HeadSparseCache(model, spec, budget_recent=2)
    assert [layer.budgets for layer in cache._layers] == want
    as_kvpress = headops.HeadSpec.headkv(model, scores, budget=32, beta=1.5, pooling="avg", keep_observation_window=True)
    again = headops.HeadSpec.from_dict(as_kvpress.to_dict())
    assert again.cache_options == {"allocation": "headkv", "pooling": "avg", "keep_observation_window": True}
    cache = headops.HeadSparseCache(model, again, pooling="max")  # the cache's keyword overrides the spec's
    assert (cache.options["pooling"], cache.options["keep_observation_window"]) == ("max", True)

    with pytest.raises(ValueError, match="allocation"):
        headops.HeadSpec.budget(model, budget=8, allocation="headkv")
    with pytest.raises(ValueError, match="alpha"):
        headops.HeadSpec.budget(model, budget=8, allocation="adakv", alpha=2)
    with pytest.raises(ValueError, match="budget"):
        headops.HeadSpec.budget(model, budget=0)
    with pytest.raises(ValueError, match="pool_kernel"):
        headops.HeadSpec.budget(model, budget=8, pool_kernel=2)
    with pytest.raises(ValueError, match="pooling"):
        headops.HeadSpec.budget(model, budget=8, pooling="median")
    with pytest.raises(ValueError, match="keep_observation_window"):
        headops.HeadSpec.headkv(model, torch.ones(2, 2), budget=8, beta=2.0, keep_observation_window="yes")
    with pytest.raises(ValueError, match="scores"):
        headops.HeadSpec.headkv(model, torch.ones(3, 2), budget=8, beta=2.0)
    with pytest.raises(ValueError, match="beta"):
        headops.HeadSpec.headkv(model, torch.ones(2, 2), budget=8, beta=0.9)
    with pytest.raises(ValueError, match="beta"):  # the zero-score head would get nothing
        headops.HeadSpec.headkv(model, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), budget=8, beta=1.0)
    with pytest.raises(TypeError, match="scores"):
        headops.HeadSpec.headkv(model, [[1.0]], budget=8, beta=2.0)


# ------------------------------------------------------------------------------ compensation


def evicted_positions(length, sinks, ring):
    """What a streaming KV head keeping `sinks` + a ring of `ring` has evicted from `length` tokens."""
    return list(range(sinks, max(sinks, length - ring)))


def compensated_oracle(q, k, v, p, kv_sinks, kv_ring, comp, group, *, window, sinks, **args):
    """reference.attention for the last query rows of q ([1, m, Hq, D]) over positions 0..p-1 of
    k, v ([1, >= p, Hkv, D]) plus, per compensated KV head, one key (mean of its evicted keys and
    values) whose logit carries + log n (weighted) - placed first, with every sink moved by one
    so that positions keep their distances; -inf on query heads of other KV heads."""
    Hq, Hkv = q.shape[2], k.shape[2]
    kk, vv = k[:, :p].double(), v[:, :p].double()
    k_hat, v_hat = torch.zeros(1, 1, Hkv, k.shape[3], dtype=F64), torch.zeros(1, 1, Hkv, k.shape[3], dtype=F64)
    bias0 = torch.full((1, Hq, 1), -math.inf, dtype=F64)
    for h in range(Hkv):
        if comp[h] is None:
            continue
        gone = evicted_positions(p, kv_sinks[h], kv_ring[h])
        if gone:
            k_hat[0, 0, h], v_hat[0, 0, h] = kk[0, gone, h].mean(0), vv[0, gone, h].mean(0)
            bias0[0, h * group:(h + 1) * group] = math.log(len(gone)) if comp[h] == "weighted" else 0.0
    key_bias = args.pop("key_bias", None)
    kb = torch.zeros(1, Hq, p, dtype=F64) if key_bias is None else key_bias.double().expand(1, Hq, p)
    return reference.attention(q.double(), torch.cat([k_hat, kk], 1), torch.cat([v_hat, vv], 1),
                               key_bias=torch.cat([bias0, kb], -1), window=window, sinks=sinks + 1, **args)


@pytest.mark.parametrize("weighted", ["weighted", "unweighted"])
@pytest.mark.parametrize("prefill", ["spec", "full"])
@pytest.mark.parametrize("lengths", [None, [11, 4]])
def test_compensated_decode_equals_the_reference_with_one_more_key(weighted, prefill, lengths):
    B, S, Hq, Hkv, D, steps = 2, 11, 6, 3, 8, 14
    kinds = ["streaming", "full", "streaming"]
    comp = [weighted, None, "weighted"]
    window, sinks = [3, 2, -1, 4, 2, 1], [1, 0, 0, 0, 2, 1]
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds=kinds,
                                    window=window, sinks=sinks, compensation=comp, batch_size=B, dtype=F64,
                                    max_step=2, prefill=prefill)
    kv_sinks, kv_ring = [1, 0, 2], [3 + 1, 0, 2 + 1]  # the largest of the group's, ring + max_step - 1
    q, k, v = make_qkv(B, S + 2 * steps, S + 2 * steps, Hq, Hkv, D, F64)
    args = dict(gate=torch.tensor([1.0, 0.0, 0.5, 1.0, -1.0, 2.0], dtype=F64),
                softmax_scale=torch.tensor([0.3, 0.5, 0.2, 0.1, 0.9, 0.4], dtype=F64),
                sink_logit=torch.tensor([0.5, -math.inf, 0.2, 1.0, -1.0, 0.0], dtype=F64),
                out_bias=torch.randn(Hq, D, dtype=F64))
    rows = lengths or [S] * B
    out = cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, **args)
    for b, n in enumerate(rows):  # the prompt's outputs: no compensation key (the spec's or full attention)
        vis = {} if prefill == "full" else dict(window=torch.tensor(window), sinks=torch.tensor(sinks))
        want = reference.attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], **vis, **args)
        assert_close(out[b:b + 1, :n], want, 1e-12, 1e-12)
    cur = list(rows)
    counts = [[] for _ in range(B)]
    for i, m in enumerate([1, 2, 1, 1, 2, 1, 2, 2, 1, 1, 1, 2, 1, 1]):
        new = [torch.stack([t[b, cur[b]:cur[b] + m] for b in range(B)]) for t in (q, k, v)]
        cur = [x + m for x in cur]
        kb = torch.randn(B, Hq, max(cur), dtype=F64)
        got = cache.attention(0, *new, key_bias=kb, **args)
        for b in range(B):
            p = cur[b]
            want = compensated_oracle(q[b:b + 1, p - m:p], k[b:b + 1], v[b:b + 1], p, kv_sinks, kv_ring, comp,
                                      Hq // Hkv, window=torch.tensor(window), sinks=torch.tensor(sinks),
                                      key_bias=kb[b:b + 1, :, :p], **args)
            assert_close(got[b:b + 1], want, 1e-12, 1e-12, what=f"step {i} row {b}")
            for h in (0, 2):
                k_mean, v_mean, count = cache.compensation(0, b, h)
                gone = evicted_positions(p, kv_sinks[h], kv_ring[h])
                assert count == len(gone)
                counts[b].append(count)
                if gone:
                    assert_close(k_mean, k[b, gone, h].mean(0), 1e-13, 1e-13)
                    assert_close(v_mean, v[b, gone, h].mean(0), 1e-13, 1e-13)
    if lengths is not None:  # the short row's first evictions happen during decode
        assert counts[1][0] == 0 and counts[1][-1] > 0
    # one compensation token per row and compensated head, counted by ideal_nbytes
    bpt = 2 * D * 8
    kept = sum(p + min(p, 1 + 4) + min(p, 2 + 3) for p in cur)
    assert cache.ideal_nbytes() == (kept + B * 2) * bpt
    assert cache.nbytes() >= cache.ideal_nbytes()


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_compensation_after_many_evictions_is_the_mean_of_the_evicted(dtype):
    B, Hq, Hkv, D = 2, 2, 1, 16
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds="streaming",
                                    window=[5, 3], sinks=[2, 0], compensation="unweighted", batch_size=B,
                                    dtype=dtype, max_step=3)
    T = 700
    k = torch.randn(B, T, Hkv, D, dtype=F64).to(dtype)
    v = torch.randn(B, T, Hkv, D, dtype=F64).to(dtype)
    q = torch.randn(B, T, Hq, D, dtype=F64).to(dtype)
    p = 37
    cache.attention(0, q[:, :p], k[:, :p], v[:, :p])
    g = torch.Generator().manual_seed(3)
    while p < T:
        m = min(T - p, int(torch.randint(1, 4, (1,), generator=g)))
        if int(torch.randint(0, 4, (1,), generator=g)) == 0:
            cache.append(0, k[:, p:p + m], v[:, p:p + m])  # appends evict too
        else:
            cache.attention(0, q[:, p:p + m], k[:, p:p + m], v[:, p:p + m])
        p += m
    gone = evicted_positions(T, 2, 5 + 2)  # wraps the 7-slot ring ~100 times
    for b in range(B):
        k_mean, v_mean, count = cache.compensation(0, b, 0)
        assert count == len(gone) == T - 9
        torch.testing.assert_close(k_mean, k[b, gone, 0].double().mean(0), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(v_mean, v[b, gone, 0].double().mean(0), atol=1e-12, rtol=1e-12)


def test_compensation_of_a_long_prefill_in_one_call():
    cache = headops.HeadSparseCache(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                                    kinds=["streaming", "streaming"], window=[16, 4], sinks=[4, 0],
                                    compensation=["weighted", None], batch_size=1, dtype=F64, max_step=1)
    q, k, v = make_qkv(1, 3000, 3000, 2, 2, 8, F64)
    cache.attention(0, q, k, v)
    k_mean, v_mean, count = cache.compensation(0, 0, 0)
    assert count == 3000 - 4 - 16
    assert_close(k_mean, k[0, 4:3000 - 16, 0].mean(0), 1e-12, 1e-12)
    with pytest.raises(ValueError, match="kv_head"):
        cache.compensation(0, 0, 1)  # not compensated


@pytest.mark.parametrize("bad, word", [
    (dict(kinds=["full", "streaming"], compensation=["weighted", None]), "compensation"),
    (dict(kinds=["budget", "streaming"], budget=[9, None], compensation="weighted"), "compensation"),
    (dict(kinds="streaming", compensation="mean"), "compensation"),
    (dict(kinds="streaming", compensation=[None]), "compensation"),
    (dict(kinds="streaming", compensation=True), "compensation"),
])
def test_compensation_errors(bad, word):
    kw = dict(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, window=[3, 3, 2, 2], sinks=0)
    kw.update(bad)
    if "budget" in kw:
        kw["window"] = [-1, -1, 2, 2]
    with pytest.raises((ValueError, TypeError), match=word):
        headops.HeadSparseCache(**kw)


def test_razor_constructor():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()  # 2 layers, 2 KV heads
    spec = headops.HeadSpec.razor(model, {0: [1]}, window=8, sinks=2)
    assert spec.cache_kind == [["streaming", "full"], ["streaming", "streaming"]]
    assert spec.cache_compensation == [["weighted", None], ["weighted", "weighted"]]
    assert spec.cache_options == {"prefill": "full"}
    same = headops.HeadSpec.razor(model, [(0, 1)], window=8, sinks=2, weighted=False)
    assert same.cache_compensation == [["unweighted", None], ["unweighted", "unweighted"]]
    cache = headops.HeadSparseCache(model, spec)
    assert cache.options["prefill"] == "full"
    assert [layer.compensation for layer in cache._layers] == spec.cache_compensation
    again = headops.HeadSpec.from_dict(spec.to_dict())
    assert again.cache_compensation == spec.cache_compensation
    assert spec.slice_heads(range(2, 4)).cache_compensation == [[None], ["weighted"]]
    with pytest.raises(TypeError, match="compensation"):
        headops.HeadSparseCache(model, spec, compensation="weighted")  # the spec's
    with pytest.raises(ValueError, match="retrieval_heads"):
        headops.HeadSpec.razor(model, {0: [2]}, window=8)
    with pytest.raises(TypeError, match="weighted"):
        headops.HeadSpec.razor(model, {}, window=8, weighted="yes")
    bad = spec.copy()
    bad.cache_compensation[0][1] = "weighted"  # a full head
    with pytest.raises(ValueError, match="cache_compensation"):
        bad.validate()


# ------------------------------------------------------------------------------ from a dense prefill


def method_cache(B=2, **options):
    """One layer of every kind: a compensated streaming head, a full head, two AdaKV budget heads."""
    return headops.HeadSparseCache(num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8,
                                   kinds=["streaming", "full", "budget", "budget"],
                                   window=[4, 3, -1, 5, -1, -1, -1, -1], sinks=[2, 0, 0, 0, 1, 0, 0, 2],
                                   budget=[None, None, 12, 12], compensation=["weighted", None, None, None],
                                   budget_recent=2, batch_size=B, dtype=F64, max_step=3,
                                   **dict(dict(allocation="adakv", observation_window=6, pool_kernel=3), **options))


def same_state(a, b, B):
    la, lb = a._layers[0], b._layers[0]
    assert la.held == lb.held
    for row in range(B):
        for h in range(4):
            assert torch.equal(la.kept_positions(row, h), lb.kept_positions(row, h))
        assert la.budget_sizes(row) == lb.budget_sizes(row)
        ka, va, na = a.compensation(0, row, 0)
        kb, vb, nb = b.compensation(0, row, 0)
        assert na == nb and torch.equal(ka, kb) and torch.equal(va, vb)
    assert a.nbytes() == b.nbytes() and a.ideal_nbytes() == b.ideal_nbytes()


@pytest.mark.parametrize("lengths", [None, [30, 9]])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_fill_leaves_what_a_full_prefill_leaves(lengths, layout):
    B, S, Hq, Hkv, D = 2, 30, 8, 4, 8
    q, k, v = make_qkv(B, S + 9, S + 9, Hq, Hkv, D, F64)
    args = dict(softmax_scale=torch.rand(Hq, dtype=F64) + 0.1, sink_logit=torch.randn(Hq, dtype=F64),
                gate=torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 1.0], dtype=F64))
    run = method_cache(prefill="full")
    run.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, **args)
    rows = lengths or [S] * B
    w = 8  # at least the observation window (6); entries before position 0 are ignored
    last = torch.zeros(B, w, Hq, D, dtype=F64)
    for b, n in enumerate(rows):
        take = min(w, n)
        last[b, w - take:] = q[b, n - take:n]
    t = (lambda x: x) if layout == "bshd" else (lambda x: x.transpose(1, 2))
    filled = method_cache()
    filled.fill(0, t(k[:, :S]), t(v[:, :S]), queries=t(last), lengths=lengths, layout=layout, **args)
    same_state(run, filled, B)
    cur = list(rows)
    for m in [1, 3, 2, 1]:
        new = [torch.stack([x[b, cur[b]:cur[b] + m] for b in range(B)]) for x in (q, k, v)]
        cur = [x + m for x in cur]
        assert torch.equal(run.attention(0, *new, **args), filled.attention(0, *new, **args))
    same_state(run, filled, B)


def test_fill_errors_change_nothing():
    B, S, Hq, Hkv, D = 2, 20, 8, 4, 8
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, F64)
    cache = method_cache()
    for kw, word in [(dict(), "queries"),  # budget heads need scores
                     (dict(queries=q[:, -3:]), "queries"),  # fewer than the observation window (6)
                     (dict(queries=q[:, -6:, :4]), "queries"),
                     (dict(queries=q[:, -6:], lengths=[20, 0]), "lengths"),
                     (dict(queries=q[:, -6:], window=3), "window"),
                     (dict(queries=q[:, -6:].float()), "queries")]:
        with pytest.raises((ValueError, TypeError), match=word):
            cache.fill(0, k, v, **kw)
        assert cache.nbytes() == method_cache().nbytes() and cache.seq_lengths(0).tolist() == [0, 0]
    cache.fill(0, k, v, queries=q[:, -6:])
    with pytest.raises(ValueError, match="holds tokens already"):
        cache.fill(0, k, v, queries=q[:, -6:])
    assert cache.seq_lengths(0).tolist() == [20, 20]
    plain = headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, kinds="streaming",
                                    window=3, batch_size=1, dtype=F64)
    plain.fill(0, k[:1, :, :2], v[:1, :, :2])  # no budget heads: no queries needed
    assert plain.seq_lengths(0).tolist() == [20]


def _methods(model):
    return {
        "razor": headops.HeadSpec.razor(model, {0: [1]}, window=4, sinks=2),
        "streaming_llm": headops.HeadSpec.streaming_llm(model, window=5, sinks=1),
        "adakv": headops.HeadSpec.budget(model, budget=8, allocation="adakv", alpha=0.2, observation_window=4,
                                         pool_kernel=3),
        "headkv": headops.HeadSpec.headkv(model, torch.tensor([[0.9, 0.1], [0.3, 0.5]]), budget=8, beta=1.5,
                                          observation_window=4),
    }


@pytest.mark.parametrize("method", ["razor", "streaming_llm", "adakv", "headkv"])
def test_from_a_captured_prefill_equals_running_the_prefill(method):
    """The evaluation's flow (issue 14): one dense prefill of the context, each method's cache
    built from it, then the question appended and the answer decoded - the same tokens as
    running each method's prefill="full" cache over the context in the patched model."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    B, S, Q = 2, 24, 5
    context = torch.randint(3, 97, (B, S))
    question = torch.randint(3, 97, (B, Q))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 17:] = 0  # row 1: a shorter context, right padded
    prefill = headops.capture_prefill(model, context, mask, observation_window=4)
    assert prefill.num_layers == 2 and prefill.lengths == [24, 17]
    assert prefill.keys[0].shape == (B, 2, S, 16) and prefill.queries[0].shape == (B, 4, 4, 16)
    assert model.config._attn_implementation == "sdpa"  # restored
    spec = _methods(model)[method]
    built = headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=Q, budget_recent=1)
    headops.patch(model, spec)
    try:
        for b, n in enumerate(prefill.lengths):  # the patched model over each row's context (no padding)
            row = headops.HeadSparseCache(model, spec, prefill="full", max_step=Q, budget_recent=1)
            model(context[b:b + 1, :n], cache=row, use_cache=True)
            for layer in range(2):
                for h in range(2):
                    assert torch.equal(row._layers[layer].kept_positions(0, h),
                                       built._layers[layer].kept_positions(b, h)), (layer, h, b)
                    if spec.cache_compensation[layer][h]:
                        got, want = built.compensation(layer, b, h), row.compensation(layer, 0, h)
                        assert got[2] == want[2]
                        assert_close(got[0], want[0], 1e-6, 1e-6)
        # the question, then greedy decoding, through the built cache (row 0: no padding)
        ids = torch.cat([context[:1], question[:1]], dim=1)
        got = model.generate(ids, max_new_tokens=6, do_sample=False,
                             cache=headops.HeadSparseCache.from_prefill(
                                 model, spec, headops.capture_prefill(model, context[:1], observation_window=4),
                                 max_step=Q, budget_recent=1))
        row = headops.HeadSparseCache(model, spec, prefill="full", max_step=Q, budget_recent=1)
        model(context[:1], cache=row, use_cache=True)
        want = model.generate(ids, max_new_tokens=6, do_sample=False, cache=row)
        assert torch.equal(got, want)
    finally:
        headops.unpatch(model)


def test_capture_prefill_of_a_patched_model_is_dense_and_restores_its_spec():
    """capture_prefill runs dense attention through headops' kernels whatever the model runs: on a
    model patched with masked and streaming heads it gives the unpatched model's prefill (keys,
    values, queries), and the model keeps its spec and attention implementation afterwards."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    want = headops.capture_prefill(model, ids, observation_window=5)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_headops_previous")
    spec = headops.HeadSpec.streaming(model, {0: [1]}, window=3, sinks=1).mask_heads({1: [0, 2]})
    headops.patch(model, spec)
    with torch.no_grad():
        before = model(ids).logits
    got = headops.capture_prefill(model, ids, observation_window=5)
    for name in ("keys", "values", "queries"):
        for layer in range(2):
            assert_close(getattr(got, name)[layer], getattr(want, name)[layer].double(), 1e-6, 1e-6, name)
    assert headops.patched_spec(model) is spec and model.config._attn_implementation == "headops"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    headops.unpatch(model)


def test_a_prefill_prefix_equals_the_prefill_of_the_prefix():
    """DensePrefill.prefix(end, w): the keys, values and last w queries of the first `end` tokens,
    as capturing them alone gives (a causal model's prefix does not see what follows it); a
    window reaching further back than the captured queries, a padded prefill or a bad end is
    refused by name."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids = torch.randint(3, 97, (2, 30))
    whole = headops.capture_prefill(model, ids, observation_window=12)
    every = headops.capture_prefill(model, ids, observation_window=30)
    for end, w, source in ((22, 4, whole), (25, 7, whole), (30, 12, whole), (3, 4, every)):  # (3, 4): from before 0
        got = source.prefix(end, w)
        want = headops.capture_prefill(model, ids[:, :end], observation_window=w)
        assert got.num_layers == 2 and got.lengths is None
        for layer in range(2):
            assert got.keys[layer].shape == want.keys[layer].shape == (2, 2, end, 16)
            assert_close(got.keys[layer], want.keys[layer].double(), 1e-5, 1e-5, "keys")
            assert_close(got.values[layer], want.values[layer].double(), 1e-5, 1e-5, "values")
            assert got.queries[layer].shape == want.queries[layer].shape == (2, 4, w, 16)
            assert_close(got.queries[layer], want.queries[layer].double(), 1e-5, 1e-5, "queries")
        assert got.softmax_scale == want.softmax_scale
    with pytest.raises(ValueError, match="observation_window.*holds positions 18..29.*>= 13"):
        whole.prefix(28, 11)  # positions 17.. are wanted; the queries start at 18
    with pytest.raises(ValueError, match="end"):
        whole.prefix(31, 4)
    padded = headops.capture_prefill(model, ids, torch.ones_like(ids), observation_window=4)
    with pytest.raises(ValueError, match="lengths"):
        padded.prefix(10, 4)


# ------------------------------------------------------------------------------ rings that grow


def test_rings_hold_what_they_have_seen_through_growth_and_wrap_around():
    """A streaming head whose window exceeds what it has seen holds no more than it has seen
    (rounded up to 64 slots), grows as tokens arrive (moving the budget heads' slots, which share
    its storage, and AdaKV's per-row tables) and stops at its capacity; outputs, compensation and
    kept sets stay exact throughout."""
    B, Hq, Hkv, D, S = 2, 6, 3, 4, 20
    window, sinks = [150, 100, -1, -1, -1, -1], [3, 0, 0, 1, 0, 0]
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                    kinds=["streaming", "budget", "full"], window=window, sinks=sinks,
                                    budget=[None, 10, None], compensation=["weighted", None, None], budget_recent=2,
                                    batch_size=B, dtype=F64, max_step=2, allocation="adakv", observation_window=3)
    st = cache._layers[0]
    cap = 150 + 2 - 1
    T = S + 2 * 160
    q, k, v = make_qkv(B, T, T, Hq, Hkv, D, F64)
    lengths = [S, 7]
    cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths)
    cur, allocs, ptr_at_capacity = list(lengths), [], None
    bpt = 2 * D * 8
    for i in range(160):
        m = 1 + i % 2
        new = [torch.stack([x[b, cur[b]:cur[b] + m] for b in range(B)]) for x in (q, k, v)]
        cur = [x + m for x in cur]
        got = cache.attention(0, *new)
        seen = max(cur) - 3  # what the ring has received past its 3 sinks
        alloc = st.ring_alloc[0]
        assert min(cap, seen) <= alloc <= min(cap, -(-seen // 64) * 64), (i, alloc, seen)
        if not allocs or allocs[-1] != alloc:
            allocs.append(alloc)
        ring_bytes = (st.ring_k.numel() + st.ring_v.numel()) * 8
        assert ring_bytes == B * (3 + alloc + 10) * bpt  # the ring and the budget head's slots, nothing more
        if alloc == cap:
            ptr_at_capacity = ptr_at_capacity or st.ring_k.data_ptr()
            assert st.ring_k.data_ptr() == ptr_at_capacity  # no growth past the capacity
        for b in range(B):
            p = cur[b]
            mask = torch.zeros(1, Hq, p, dtype=F64)
            mask[0, 2:4] = -math.inf
            mask[0, 2:4, st.kept_positions(b, 1)] = 0.0
            want = compensated_oracle(q[b:b + 1, p - m:p], k[b:b + 1], v[b:b + 1], p, [3, 0, 0], [cap, 0, 0],
                                      ["weighted", None, None], 2, window=torch.tensor(window),
                                      sinks=torch.tensor(sinks), key_bias=mask)
            assert_close(got[b:b + 1], want, 1e-12, 1e-12, what=f"step {i} row {b}")
            assert cache.compensation(0, b, 0)[2] == max(0, p - 3 - cap)
            assert st.kept_positions(b, 1).numel() == min(p, st.budget_sizes(b)[0]) and p - 1 in \
                st.kept_positions(b, 1).tolist()
    assert allocs == [64, 128, cap], allocs  # grew twice, then wrapped at its capacity
    assert max(cur) > 3 + cap + 100  # (well past the capacity: the ring wrapped)


# ------------------------------------------------------------------------------ the raw ops


def _compensated_layer():
    cache = headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                                    kinds=["full", "streaming"], window=[-1, -1, 3, 2], sinks=[0, 0, 1, 1],
                                    compensation=[None, "weighted"], batch_size=2, dtype=F64, max_step=1)
    q, k, v = make_qkv(2, 12, 12, 4, 2, 8, F64)
    cache.attention(0, q[:, :11], k[:, :11], v[:, :11])
    return cache, cache._layers[0], q[:, 11:], k[:, 11:], v[:, 11:]


def test_compensation_ops_pass_opcheck():
    """kv_append mutates the compensation sums and counts (schema annotations), decode reads them."""
    cache, st, q1, k1, v1 = _compensated_layer()
    st.reserve(12)
    tables = (st.lengths, st.kv_kind, st.kv_index, st.ring_offset, st.ring_sinks, st.ring_size)
    before = st.comp_n.clone()
    torch.library.opcheck(torch.ops.headops.kv_append.default,
                          (k1, v1, st.full_k, st.full_v, st.ring_k, st.ring_v) + tables + (None, None, None, True)
                          + st.comp_args(), test_utils=("test_schema", "test_faketensor"))
    torch.ops.headops.kv_append(k1, v1, st.full_k, st.full_v, st.ring_k, st.ring_v, *tables, None, None, None, True,
                                *st.comp_args())
    assert torch.equal(st.comp_n, before + 1)  # (the call evicted one token into the sums)
    args = (q1, st.full_k, st.full_v, st.ring_k, st.ring_v, st.lengths + 1) + tables[1:] + (
        True, 8 ** -0.5, None, st.windows.view(1, -1).expand(2, -1).contiguous(),
        st.sinks.view(1, -1).expand(2, -1).contiguous(), None, None, None, None, None, None, 1024, None, None,
        None) + st.comp_args()
    torch.library.opcheck(torch.ops.headops.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad, word", [
    (lambda st: dict(comp_table=st.comp_table[:, :1].contiguous()), "comp_table"),
    (lambda st: dict(comp_table=torch.tensor([[5, 1]])), "comp_table"),
    (lambda st: dict(comp_table=torch.tensor([[0, 2]])), "comp_table"),
    (lambda st: dict(comp_k=st.comp_k.float()), "comp_k"),
    (lambda st: dict(comp_v=st.comp_v[:1].contiguous()), "comp_v"),
    (lambda st: dict(comp_n=-st.comp_n - 1), "comp_n"),
    (lambda st: dict(comp_n=None), "comp_k, comp_v and comp_n"),
])
def test_compensation_raw_op_errors(bad, word):
    """The C++ checks of the compensation tables (a direct call of the raw ops never crashes)."""
    cache, st, q1, k1, v1 = _compensated_layer()
    st.reserve(12)
    base = dict(zip(("comp_table", "comp_k", "comp_v", "comp_n"), st.comp_args()))
    common = dict(full_k=st.full_k, full_v=st.full_v, ring_k=st.ring_k, ring_v=st.ring_v, kv_kind=st.kv_kind,
                  kv_index=st.kv_index, ring_offset=st.ring_offset, ring_sinks=st.ring_sinks, ring_size=st.ring_size)
    comp = {**base, **bad(st)}
    n_before = st.comp_n.clone()
    with pytest.raises(RuntimeError, match=word):
        torch.ops.headops.kv_append(k_new=k1, v_new=v1, lengths=st.lengths, **common, **comp)
    with pytest.raises(RuntimeError, match=word):
        torch.ops.headops.decode_attention(q=q1, lengths=st.lengths, causal=True, default_scale=0.3,
                                           softmax_scale=None, window=None, sinks=None, alpha=None, key_bias=None,
                                           sink_logit=None, out_scale=None, out_bias=None, gate=None, split_keys=64,
                                           **common, **comp)
    assert torch.equal(st.comp_n, n_before)
