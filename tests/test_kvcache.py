"""headops.HeadSparseCache and the raw cache ops (DESIGN section 2).

The contract: prefilling a prompt and decoding N more tokens step by step with the cache
gives, up to rounding, the outputs of ``headops.attention`` over the whole sequence with the
same per-head spec (window/sinks of the cache plus the same other per-head arguments). With
causal=True the step outputs are rows of that one full-sequence call (bottom-right aligned
positions); with causal=False a decode query sees every stored key, so each step is compared
with ``headops.attention`` over the prefix that ends at the step (also bottom-right aligned).

Also: per-row prompt lengths, ring wrap-around, split-K independence, memory really held,
work counters (what the decode kernel reads) and errors (Python ValueError/TypeError naming the
argument; the raw ops raise RuntimeError and never crash).
"""

import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import headops

from conftest import assert_close, make_qkv

F64 = torch.float64
ATOL64 = 1e-12  # float64: both sides compute in double; only the summation order differs


# --------------------------------------------------------------------------------- helpers


def seq_dim(layout):
    return 1 if layout == "bshd" else 2


def make_cache(Hq, Hkv, D, *, kinds="full", window=None, sinks=None, B=2, L=1, dtype=F64, max_step=4,
               split_keys=None):
    return headops.HeadSparseCache(num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds=kinds,
                                   window=window, sinks=sinks, batch_size=B, dtype=dtype, max_step=max_step,
                                   split_keys=split_keys)


def as_tensor_or_none(x):
    return None if x is None else torch.as_tensor(x, dtype=torch.int64)


def run_steps(cache, q, k, v, S, steps, *, layer=0, layout="bshd", causal=True, key_bias=None, **args):
    """Prefill of S tokens, then one cache call per entry of `steps` (tokens per call). key_bias
    (indexed by original position, covering the whole sequence) is cut to the current length.
    Returns the outputs of every call."""
    d = seq_dim(layout)
    outs, p = [], 0
    for n in [S] + list(steps):
        kw = dict(args)
        if key_bias is not None:
            kw["key_bias"] = key_bias[..., :p + n]
        outs.append(cache.attention(layer, q.narrow(d, p, n), k.narrow(d, p, n), v.narrow(d, p, n), layout=layout,
                                    causal=causal, **kw))
        p += n
    return outs


def oracle(q, k, v, window, sinks, *, layout="bshd", causal=True, **args):
    return headops.attention(q, k, v, layout=layout, causal=causal, window=as_tensor_or_none(window),
                             sinks=as_tensor_or_none(sinks), **args)


def max_err(got, want):
    return (got.to(F64) - want.to(F64)).abs().max().item()


def scaled_err(got, want):
    """max |got - want| / (1 + |want|): an absolute error for outputs of magnitude <= 1 and a
    relative one beyond (out_scale, out_bias and gates make some outputs ~10)."""
    got, want = got.to(F64), want.to(F64)
    assert torch.isfinite(got).all()
    return ((got - want).abs() / (1 + want.abs())).max().item()


def per_head_args(names, B, Hq, D, N, *, per_batch=False):
    """Per-head arguments of headops.attention (besides window/sinks) for a 6-head spec whose
    query heads 2, 3 are served by a full KV head (alpha only there; 0 on the others)."""
    assert Hq == 6

    def head_vec(vals):
        t = torch.tensor(vals, dtype=F64)
        if per_batch:  # rows differ: row b rolls the values by b
            t = torch.stack([t.roll(b) for b in range(B)])
        return t

    kw = {}
    for name in names:
        if name == "gate":
            kw["gate"] = head_vec([1.0, 0.0, -0.7, 0.0, 1.6, 0.4])  # exact zeros on a streaming and a full KV head
        elif name == "softmax_scale":
            kw["softmax_scale"] = head_vec([0.05, 0.3, 1.0, 0.6, 0.2, 0.8])
        elif name == "softmax_scale_float":
            kw["softmax_scale"] = 0.7
        elif name == "sink_logit":
            kw["sink_logit"] = head_vec([0.5, -math.inf, 1.5, -math.inf, -1.0, 2.0])
        elif name == "key_bias":  # [B, Hq, Sk]
            kw["key_bias"] = torch.randn(B, Hq, N, dtype=F64)
        elif name == "key_bias_1d":  # [Sk], broadcast to every row and head
            kw["key_bias"] = torch.randn(N, dtype=F64)
        elif name == "out_scale_bias":
            shape = (B, Hq, D) if per_batch else (Hq, D)
            kw["out_scale"] = torch.randn(shape, dtype=F64)
            kw["out_bias"] = torch.randn(shape, dtype=F64)
        elif name == "alpha":
            # both branches on query head 2 (window 3 + sinks 1 vs everything), only the full branch
            # on head 3 (window 4); 0 on the heads served by streaming KV heads
            rows = [[0.0, 0.0, 0.3, 1.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.5, 0.0, 0.0]]
            kw["alpha"] = torch.tensor([rows[b % 2] for b in range(B)] if per_batch else rows[0], dtype=F64)
        else:
            raise KeyError(name)
    return kw


# ------------------------------------------------------------ 1. the invariant in float64

# window/sinks per query head; kinds per KV head. Sinks up to 4 (prompts of 1-3 tokens are
# shorter), windows from 1 to 20 (smaller and larger than the 12-token prompt); the 63-token
# prompt's decode goes past the full storage's first 64 tokens.
CASES = {
    "full": dict(Hq=4, Hkv=4, kinds="full", window=None, sinks=None),
    "full_windowed_gqa": dict(Hq=4, Hkv=2, kinds="full", window=[-1, 3, 1, 20], sinks=[0, 2, 4, 1]),
    "streaming": dict(Hq=4, Hkv=4, kinds="streaming", window=[1, 3, 5, 20], sinks=[0, 1, 4, 2]),
    "mixed": dict(Hq=4, Hkv=4, kinds=["full", "streaming", "streaming", "full"], window=[-1, 2, 7, 5],
                  sinks=[0, 3, 0, 2]),
    # query heads sharing a streaming KV head differ in window and sinks (it keeps the max)
    "gqa_4_2": dict(Hq=4, Hkv=2, kinds=["streaming", "full"], window=[2, 6, -1, 4], sinks=[3, 0, 0, 2]),
    "gqa_6_3": dict(Hq=6, Hkv=3, kinds=["streaming", "full", "streaming"], window=[1, 5, -1, 8, 7, 2],
                    sinks=[0, 4, 1, 0, 2, 2]),
    "mqa_streaming": dict(Hq=4, Hkv=1, kinds="streaming", window=[1, 2, 9, 4], sinks=[2, 0, 1, 4]),
    "mqa_full": dict(Hq=4, Hkv=1, kinds="full", window=[-1, 2, -1, 4], sinks=[0, 0, 3, 1]),
}
STEPS = {"single": [1] * 10, "max_step": [4] * 4, "mixed": [1, 3, 2, 4, 1, 1, 4, 2, 3]}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("S", [1, 2, 3, 12, 63])
@pytest.mark.parametrize("steps", list(STEPS))
@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_full_attention(case, steps, S, layout):
    c = CASES[case]
    B, D = 2, 8
    steps = STEPS[steps]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, c["Hq"], c["Hkv"], D, F64, layout)
    cache = make_cache(c["Hq"], c["Hkv"], D, kinds=c["kinds"], window=c["window"], sinks=c["sinks"], B=B)
    outs = run_steps(cache, q, k, v, S, steps, layout=layout)
    want = oracle(q, k, v, c["window"], c["sinks"], layout=layout)
    d = seq_dim(layout)
    p = 0
    for i, out in enumerate(outs):
        n = out.shape[d]
        assert out.shape == want.narrow(d, p, n).shape and out.dtype == F64
        assert max_err(out, want.narrow(d, p, n)) <= ATOL64, f"call {i} (positions {p}..{p + n - 1})"
        p += n
    assert p == N
    assert cache.seq_lengths(0).tolist() == [N] * B


ARG_SETS = {
    "gate": ["gate"],
    "softmax_scale": ["softmax_scale"],
    "softmax_scale_float": ["softmax_scale_float"],
    "sink_logit": ["sink_logit"],
    "key_bias": ["key_bias"],
    "key_bias_1d": ["key_bias_1d"],
    "out_scale_bias": ["out_scale_bias"],
    "alpha": ["alpha"],
    "all": ["gate", "softmax_scale", "sink_logit", "key_bias", "out_scale_bias", "alpha"],
    "all_1d_bias": ["gate", "softmax_scale", "sink_logit", "key_bias_1d", "out_scale_bias", "alpha"],
}
# KV head 1 is full and serves query heads 2 (window 3, sinks 1) and 3 (window 4): alpha there
ARGS_SPEC = dict(Hq=6, Hkv=3, kinds=["streaming", "full", "streaming"], window=[2, 5, 3, 4, 7, 1],
                 sinks=[1, 0, 1, 0, 2, 3])


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["per_head", "per_batch"])
@pytest.mark.parametrize("args", list(ARG_SETS))
def test_decode_matches_full_attention_with_per_head_args(args, per_batch, layout):
    c = ARGS_SPEC
    B, D, S, steps = 2, 8, 5, [1, 3, 2, 4, 1, 1, 4, 2]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, c["Hq"], c["Hkv"], D, F64, layout)
    kw = per_head_args(ARG_SETS[args], B, c["Hq"], D, N, per_batch=per_batch)
    key_bias = kw.pop("key_bias", None)
    cache = make_cache(c["Hq"], c["Hkv"], D, kinds=c["kinds"], window=c["window"], sinks=c["sinks"], B=B)
    outs = run_steps(cache, q, k, v, S, steps, layout=layout, key_bias=key_bias, **kw)
    got = torch.cat(outs, seq_dim(layout))
    want = oracle(q, k, v, c["window"], c["sinks"], layout=layout, key_bias=key_bias, **kw)
    assert max_err(got, want) <= ATOL64
    # the spec matters: without the per-head arguments the outputs differ (the test can fail)
    plain = oracle(q, k, v, c["window"], c["sinks"], layout=layout)
    assert max_err(want, plain) > 1e-3
    if "gate" in kw:  # heads gated off exactly give exact zeros
        off = (kw["gate"] == 0).expand(B, c["Hq"])
        heads_axis = got.transpose(1, 2) if layout == "bshd" else got  # [B, Hq, S, D]
        assert off.any() and (heads_axis[off] == 0).all()


def test_decode_steps_whose_numbers_change():
    """Per-head arguments given as Python numbers are built and checked once per layer, then
    reused (HeadSparseCache._step_args): a step with other numbers gets arguments of its own,
    and what would be refused is refused on every step (softmax_scale=True after 1 too),
    changing nothing."""
    c = ARGS_SPEC
    B, D, S = 2, 8, 5
    steps = [dict(softmax_scale=0.7), dict(softmax_scale=0.7), dict(softmax_scale=1.3, sink_logit=0.5), dict(),
             dict(gate=0.0), dict(softmax_scale=1), dict(gate=1, softmax_scale=1.0), dict(sink_logit=0.5, alpha=0.0),
             dict(softmax_scale=0.7)]
    refused = [(dict(softmax_scale=True), "softmax_scale"), (dict(softmax_scale=math.nan), "softmax_scale"),
               (dict(sink_logit=math.nan), "sink_logit"), (dict(gate=False), "gate"), (dict(alpha=2.0), "alpha"),
               (dict(alpha=0.5), "alpha")]  # (0.5: query heads of streaming KV heads have no full branch)
    N = S + len(steps)
    q, k, v = make_qkv(B, N, N, c["Hq"], c["Hkv"], D, F64, "bshd")
    cache = make_cache(c["Hq"], c["Hkv"], D, kinds=c["kinds"], window=c["window"], sinks=c["sinks"], B=B)
    cache.attention(0, q[:, :S], k[:, :S], v[:, :S])
    for i, kw in enumerate(steps):
        p = S + i
        new = q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1]
        for bad, name in refused:
            with pytest.raises((TypeError, ValueError), match=name):
                cache.attention(0, *new, **bad)
            assert cache.seq_lengths(0).tolist() == [p] * B
        out = cache.attention(0, *new, **kw)
        want = oracle(q[:, :p + 1], k[:, :p + 1], v[:, :p + 1], c["window"], c["sinks"], **kw)[:, p:p + 1]
        assert max_err(out, want) <= ATOL64, f"step {i}: {kw}"
        if "gate" in kw and kw["gate"] == 0:
            assert (out == 0).all()
    assert cache.seq_lengths(0).tolist() == [N] * B


def test_decode_steps_with_the_same_numbers_in_layers_that_differ():
    """The arguments reused per layer are that layer's: two layers of one cache whose windows and
    sinks differ, stepped in turn with the same softmax_scale, each match attention with its own."""
    B, Hq, Hkv, D, S, steps = 2, 4, 2, 8, 6, 5
    windows, sinks = [[-1, -1, -1, -1], [2, 3, -1, 5]], [[0, 0, 0, 0], [1, 0, 0, 2]]
    cache = headops.HeadSparseCache(num_layers=2, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                    kinds=[["full", "full"], ["streaming", "full"]], window=windows, sinks=sinks,
                                    batch_size=B, dtype=F64, max_step=1)
    N = S + steps
    qkv = [make_qkv(B, N, N, Hq, Hkv, D, F64, "bshd") for _ in range(2)]
    for layer, (q, k, v) in enumerate(qkv):
        cache.attention(layer, q[:, :S], k[:, :S], v[:, :S], softmax_scale=0.7)
    for p in range(S, N):
        for layer, (q, k, v) in enumerate(qkv):
            out = cache.attention(layer, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1], softmax_scale=0.7)
            want = oracle(q[:, :p + 1], k[:, :p + 1], v[:, :p + 1], windows[layer], sinks[layer],
                          softmax_scale=0.7)[:, p:p + 1]
            assert max_err(out, want) <= ATOL64, f"layer {layer}, position {p}"


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_decode_with_strided_inputs(layout):
    # q, k, v are views with every stride differing from the contiguous one (last dim contiguous)
    c = ARGS_SPEC
    B, D, S, steps = 2, 8, 7, [1, 4, 2, 3, 1]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, c["Hq"], c["Hkv"], D, F64, layout, strided=True)
    assert not q.is_contiguous()
    kw = per_head_args(ARG_SETS["all"], B, c["Hq"], D, N)
    key_bias = kw.pop("key_bias")
    cache = make_cache(c["Hq"], c["Hkv"], D, kinds=c["kinds"], window=c["window"], sinks=c["sinks"], B=B)
    got = torch.cat(run_steps(cache, q, k, v, S, steps, layout=layout, key_bias=key_bias, **kw), seq_dim(layout))
    want = oracle(q.contiguous(), k.contiguous(), v.contiguous(), c["window"], c["sinks"], layout=layout,
                  key_bias=key_bias, **kw)
    assert max_err(got, want) <= ATOL64


@pytest.mark.parametrize("with_streaming", [False, True], ids=["full_only", "with_streaming"])
def test_non_causal_decode_sees_every_stored_key(with_streaming):
    # causal=False: a decode query sees all stored keys (within its window): each step equals
    # headops.attention over the prefix ending at the step, bottom-right aligned. Steps of
    # several tokens matter: there the new queries see each other's keys in both directions.
    B, Hq, Hkv, D, S = 2, 4, 2, 8, 6
    kinds = ["full", "streaming"] if with_streaming else "full"
    window, sinks = [-1, 3, 4, 2], [0, 1, 2, 1]
    steps = [1, 3, 2, 4, 1, 3]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, F64)
    gate = torch.tensor([1.0, 0.5, -1.0, 2.0], dtype=F64)
    cache = make_cache(Hq, Hkv, D, kinds=kinds, window=window, sinks=sinks, B=B)
    outs = run_steps(cache, q, k, v, S, steps, causal=False, gate=gate)
    p = 0
    for n, out in zip([S] + steps, outs):
        want = oracle(q[:, p:p + n], k[:, :p + n], v[:, :p + n], window, sinks, causal=False, gate=gate)
        assert max_err(out, want) <= ATOL64
        p += n
    # and it is not the causal answer
    causal = oracle(q, k, v, window, sinks, gate=gate)
    assert max_err(torch.cat(outs, 1), causal) > 1e-3


def test_layers_are_independent():
    # three layers with their own kinds, windows and sinks, used in an interleaved order with
    # different step sizes; each must match its own full-sequence attention
    L, B, Hq, Hkv, D = 3, 2, 4, 2, 8
    kinds = [["full", "streaming"], ["streaming", "streaming"], ["full", "full"]]
    window = [[-1, 5, 2, 3], [4, 1, 6, 2], [-1, -1, 3, 8]]
    sinks = [[0, 1, 2, 0], [1, 2, 0, 3], [0, 0, 2, 1]]
    cache = make_cache(Hq, Hkv, D, kinds=kinds, window=window, sinks=sinks, B=B, L=L)
    prompts = [7, 2, 11]
    schedule = [(0, None), (2, None), (0, 1), (1, None), (0, 3), (2, 4), (1, 1), (1, 2), (2, 1), (0, 2), (1, 4),
                (2, 2), (0, 1), (1, 3)] + [(i % 3, 1 + i % 4) for i in range(12)]
    total = [prompts[i] + sum(n for l_, n in schedule if l_ == i and n) for i in range(L)]
    data = [make_qkv(B, total[i], total[i], Hq, Hkv, D, F64) for i in range(L)]
    outs, pos = [[] for _ in range(L)], [0] * L
    for layer, n in schedule:
        n = prompts[layer] if n is None else n
        q, k, v = data[layer]
        p = pos[layer]
        outs[layer].append(cache.attention(layer, q[:, p:p + n], k[:, p:p + n], v[:, p:p + n]))
        pos[layer] += n
        assert [cache.seq_lengths(i).tolist() for i in range(L)] == [[x] * B for x in pos]
    for layer in range(L):
        q, k, v = data[layer]
        want = oracle(q, k, v, window[layer], sinks[layer])
        assert max_err(torch.cat(outs[layer], 1), want) <= ATOL64, f"layer {layer}"


def test_append_then_decode():
    # cache.append stores a prompt without attention; the decode that follows is the same
    B, Hq, Hkv, D, S = 2, 6, 3, 8, 20
    c = ARGS_SPEC
    steps = [1, 3, 2, 4, 1]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, F64, "bhsd")
    cache = make_cache(Hq, Hkv, D, kinds=c["kinds"], window=c["window"], sinks=c["sinks"], B=B)
    cache.append(0, k[:, :, :S], v[:, :, :S], layout="bhsd")
    assert cache.seq_lengths(0).tolist() == [S] * B
    outs, p = [], S
    for n in steps:
        outs.append(cache.attention(0, q[:, :, p:p + n], k[:, :, p:p + n], v[:, :, p:p + n], layout="bhsd"))
        p += n
    want = oracle(q, k, v, c["window"], c["sinks"], layout="bhsd")[:, :, S:]
    assert max_err(torch.cat(outs, 2), want) <= ATOL64


# ---------------------------------------------------------------- 2. lower precisions

# Measured (12 runs: 6 seeds x both layouts x plain / all per-head arguments; outputs up to
# ~10), as scaled_err:
#                decode rows vs float64   every row vs headops.attention in the same dtype
#   float32      1.5e-6                   8.9e-7  (float accumulation, vectorised exp, float32 output)
#   bfloat16     3.1e-3                   8.6e-3  (decode: output rounded to bfloat16, half an ulp is
#                                                  2**-9 = 2e-3 relative; headops.attention's bfloat16
#                                                  path also rounds P to bfloat16 before P.V: 8e-3 vs
#                                                  float64 there, and that is the other side here)
#   float16      3.9e-4                   4.8e-4  (output rounded to float16: half an ulp is 4.9e-4)
# "vs float64" is the cache against the float64 oracle on the same rounded inputs (the decode
# kernel's own accuracy; the prefill rows are headops.attention itself, tested elsewhere). The
# tolerances are ~3x the measurements.
LOW_TOL = {torch.float32: (5e-6, 3e-6), torch.bfloat16: (1e-2, 2.5e-2), torch.float16: (1.2e-3, 1.5e-3)}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("args", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_lower_precision(dtype, args, layout):
    check_lower_precision(dtype, args, layout, B=2, D=32, S=40, steps=[1, 4, 2, 1, 3, 1, 1, 4] * 2)


# The decode's products read 16-bit rows in vector pairs (16 elements on AVX2, 32 on AVX-512;
# bfloat16 in an interleaved order that the kernel undoes for the output) and the head dims
# past the last whole pair (scores) or column chunk (PV: 16 on AVX2, 64 on AVX-512) one by one:
# head dims on both sides of those boundaries, over more than one 256-key block. On AVX512-BF16
# bfloat16 scores take stored pairs 64 elements at a time, then one step of 32, where D is a
# multiple of 32 (96: both; 32 in test_decode_lower_precision: the step of 32 alone).
@pytest.mark.parametrize("D", [8, 40, 72, 96, 136])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_lower_precision_head_dims(dtype, D):
    check_lower_precision(dtype, "all", "bshd", B=1, D=D, S=300, steps=[1, 3, 1])


def check_lower_precision(dtype, args, layout, *, B, D, S, steps):
    c = ARGS_SPEC
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, c["Hq"], c["Hkv"], D, dtype, layout)
    kw = per_head_args(ARG_SETS["all"], B, c["Hq"], D, N) if args == "all" else {}
    key_bias = kw.pop("key_bias", None)
    cache = make_cache(c["Hq"], c["Hkv"], D, kinds=c["kinds"], window=c["window"], sinks=c["sinks"], B=B, dtype=dtype)
    outs = run_steps(cache, q, k, v, S, steps, layout=layout, key_bias=key_bias, **kw)
    d = seq_dim(layout)
    got = torch.cat(outs, d)
    assert got.dtype == dtype
    same = oracle(q, k, v, c["window"], c["sinks"], layout=layout, key_bias=key_bias, **kw)
    exact = oracle(*(t.to(F64) for t in (q, k, v)), c["window"], c["sinks"], layout=layout, key_bias=key_bias, **kw)
    tol_exact, tol_same = LOW_TOL[dtype]
    e_exact = scaled_err(got.narrow(d, S, N - S), exact.narrow(d, S, N - S))
    e_same = scaled_err(got, same)
    print(f"{dtype} {args}: decode vs float64 {e_exact:.3g}, vs same dtype {e_same:.3g}")
    assert e_exact <= tol_exact
    assert e_same <= tol_same


# ------------------------------------------------------------- 3. long contexts, split-K


def long_case(split_keys, S=500, steps=(1, 3, 4, 1, 2, 4, 4, 1, 3), dtype=F64, B=1):
    # the decode crosses token 512 (the prompt's storage, rounded to 64, is full there).
    # KV head 0 is full: query head 0 unlimited, query head 1 window 150 + 7 sinks (two key
    # ranges); KV head 1 is streaming (windows 40 and 100)
    Hq, Hkv, D = 4, 2, 16
    window, sinks = [-1, 150, 40, 100], [0, 7, 4, 0]
    N = S + sum(steps)
    torch.manual_seed(1234)  # the same data for every split_keys
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, dtype)
    kb = torch.randn(B, Hq, N, dtype=F64)
    gate = torch.tensor([1.0, -0.5, 2.0, 1.0], dtype=F64)
    cache = make_cache(Hq, Hkv, D, kinds=["full", "streaming"], window=window, sinks=sinks, B=B, dtype=dtype,
                       split_keys=split_keys)
    outs = run_steps(cache, q, k, v, S, list(steps), key_bias=kb, gate=gate)
    want = oracle(q, k, v, window, sinks, key_bias=kb, gate=gate)
    return torch.cat(outs, 1), want, S


@pytest.mark.parametrize("split_keys", [37, 64, 100, 1024])
def test_long_context_split_keys(split_keys):
    got, want, S = long_case(split_keys, B=2)
    assert max_err(got, want) <= ATOL64
    ref, _, _ = long_case(1024, B=2)
    assert max_err(got[:, S:], ref[:, S:]) <= ATOL64  # the result does not depend on split_keys


def test_gpu_split_keys_fill_the_sms():
    # split_keys=None on a GPU: the fewest keys a block (multiples of 128, 128 to 1024) that give
    # each SM 3 blocks; the cache's count: every full head's capacity and every ring/budget slot
    rule = headops.cache.gpu_split_keys
    assert rule(8 * 32768, 132) == 768  # bench/kvcache_cuda.py's full cache at 32k on an H200
    assert rule(4 * 32768 + 8 * 1028, 132) == 384  # half the heads streaming
    assert rule(8 * 1028, 132) == 128  # every head streaming
    assert rule(8 * 131072, 132) == 1024  # at 128k: the most
    assert rule(0, 132) == rule(1, 1) == 128 and rule(3 * 128 + 1, 1) == 256
    assert rule(3 * 1024 * 132, 132) == 1024 and rule(3 * 1024 * 132 - 1, 132) == 1024
    assert rule(3 * 896 * 132, 132) == 896 and rule(3 * 896 * 132 + 1, 132) == 1024


def test_long_context_default_split():
    # ~2100 tokens: the unlimited full head spans three work items of 1024 keys (counted)
    B, Hq, Hkv, D, S = 1, 2, 1, 16, 2100
    window, sinks = [-1, 1500], [0, 3]
    steps = [1, 3, 2, 4]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, F64)
    cache = make_cache(Hq, Hkv, D, kinds="full", window=window, sinks=sinks, B=B)
    assert cache.split_keys is None and headops.cache.SPLIT_KEYS == 1024  # (None: 1024 on the CPU)
    outs = run_steps(cache, q, k, v, S, steps[:-1])
    with headops.count_work() as w:
        outs.append(cache.attention(0, q[:, N - 4:], k[:, N - 4:], v[:, N - 4:]))
    assert w.work_items == math.ceil(N / 1024)  # one KV head; the union of its heads' keys is [0, N)
    want = oracle(q, k, v, window, sinks)
    assert max_err(torch.cat(outs, 1), want) <= ATOL64


# ---------------------------------------------------------------- 4. per-row lengths


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_per_row_prompt_lengths(layout):
    B, Hq, Hkv, D = 3, 6, 3, 8
    kinds, window, sinks = ["streaming", "full", "streaming"], [2, 5, 3, 4, 7, 1], [1, 0, 1, 0, 2, 3]
    lengths, S = [62, 1, 40], 62  # row 1 is shorter than the sinks; row 0 decodes past token 64
    steps = [1, 3, 2, 1, 4, 1, 1]
    n_max = S + sum(steps)
    q, k, v = make_qkv(B, n_max, n_max, Hq, Hkv, D, F64, "bshd")
    kb = torch.randn(B, Hq, n_max, dtype=F64)
    gate = torch.tensor([[1.0, 0.0, -0.7, 0.5, 1.6, 0.4], [0.3, 1.0, 0.0, 2.0, 1.0, 0.0], [1.0] * 6], dtype=F64)
    out_bias = torch.randn(B, Hq, D, dtype=F64)  # padded rows must stay 0 despite a bias
    sink_logit = torch.tensor([0.0, -math.inf, 1.0, 0.5, -1.0, 2.0], dtype=F64)
    kw = dict(gate=gate, out_bias=out_bias, sink_logit=sink_logit)
    to_layout = (lambda t: t) if layout == "bshd" else (lambda t: t.transpose(1, 2))
    from_layout = to_layout
    cache = make_cache(Hq, Hkv, D, kinds=kinds, window=window, sinks=sinks, B=B)
    # the prompt, right-padded (the padding holds garbage)
    pre = cache.attention(0, to_layout(q[:, :S]), to_layout(k[:, :S]), to_layout(v[:, :S]), layout=layout,
                          lengths=lengths, key_bias=kb[..., :S], **kw)
    pre = from_layout(pre)
    got = [[pre[b, :lengths[b]]] for b in range(B)]
    for b in range(B):
        assert (pre[b, lengths[b]:] == 0).all(), f"row {b}: padded output rows must be exactly 0"
    assert cache.seq_lengths(0).tolist() == lengths
    cur = list(lengths)
    for n in steps:  # row b's next n tokens sit at its own positions cur[b] ..
        new = [torch.stack([t[b, cur[b]:cur[b] + n] for b in range(B)]) for t in (q, k, v)]
        cur = [x + n for x in cur]
        out = cache.attention(0, *(to_layout(t) for t in new), layout=layout, key_bias=kb[..., :max(cur)], **kw)
        out = from_layout(out)
        for b in range(B):
            got[b].append(out[b])
        assert cache.seq_lengths(0).tolist() == cur
    for b in range(B):
        n = cur[b]
        row_kw = dict(gate=gate[b:b + 1], out_bias=out_bias[b:b + 1], sink_logit=sink_logit)
        want = oracle(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], window, sinks, key_bias=kb[b:b + 1, :, :n],
                      **row_kw)[0]
        assert max_err(torch.cat(got[b], 0), want) <= ATOL64, f"row {b}"


def test_per_row_lengths_with_head_shaped_out_scale():
    B, Hq, Hkv, D, S = 2, 4, 2, 8, 6
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, F64)
    out_scale, out_bias = torch.randn(Hq, D, dtype=F64), torch.randn(Hq, D, dtype=F64)
    cache = make_cache(Hq, Hkv, D, kinds="full", B=B)
    out = cache.attention(0, q, k, v, lengths=[6, 4], out_scale=out_scale, out_bias=out_bias)
    for b, n in enumerate([6, 4]):
        want = oracle(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], None, None, out_scale=out_scale,
                      out_bias=out_bias)
        assert max_err(out[b:b + 1, :n], want) <= ATOL64


# ----------------------------------------------------------------- 5. ring wrap-around


@pytest.mark.parametrize("max_step", [1, 3])
def test_ring_wraps_many_times(max_step):
    # window 3 and sinks 2 (the KV heads keep 2 sinks + a ring of 3 + max_step - 1): 240 decode
    # steps wrap the ring ~80 times; the invariant holds at every step
    B, Hq, Hkv, D, S = 2, 4, 2, 8, 4
    window, sinks = [3, 2, 3, 1], [2, 1, 0, 2]
    steps = [1] * 240 if max_step == 1 else [1 + i % 3 for i in range(120)]
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, F64)
    cache = make_cache(Hq, Hkv, D, kinds="streaming", window=window, sinks=sinks, B=B, max_step=max_step)
    outs = run_steps(cache, q, k, v, S, steps)
    want = oracle(q, k, v, window, sinks)
    p = 0
    for i, out in enumerate(outs):
        n = out.shape[1]
        assert max_err(out, want[:, p:p + n]) <= ATOL64, f"call {i} (positions {p}..{p + n - 1})"
        p += n
    # the rings hold their capacity, no more (+ the layout tables)
    assert cache.ideal_nbytes() == B * (2 + 3 + max_step - 1 + 2 + 3 + max_step - 1) * bytes_per_token(D, F64)
    assert cache.ideal_nbytes() < cache.nbytes() <= cache.ideal_nbytes() + 1024


def test_ring_keeps_the_sinks():
    # The sink tokens carry huge values: a sink lost (overwritten by the ring) or shifted would
    # change the output by far more than the tolerance. Checked after 250 wrapping steps.
    B, Hq, Hkv, D, S = 1, 2, 1, 8, 3
    window, sinks = [3, 2], [2, 1]
    N = S + 250
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, F64)
    v[:, :2] = torch.tensor([1e4, -3e4], dtype=F64)[None, :, None, None]
    k[:, :2] *= 3
    cache = make_cache(Hq, Hkv, D, kinds="streaming", window=window, sinks=sinks, B=B, max_step=1)
    outs = run_steps(cache, q, k, v, S, [1] * 250)
    got = torch.cat(outs, 1)
    want = oracle(q, k, v, window, sinks)
    without_sinks = oracle(q, k, v, window, [0, 0])
    assert (want - without_sinks)[:, -50:].abs().amax(dim=(0, 2, 3)).min() > 1.0  # every late step needs the sinks
    assert_close(got, want, ATOL64, 1e-12)


# ---------------------------------------------------------------------------- 6. memory


def bytes_per_token(D, dtype):
    return 2 * D * torch.empty((), dtype=dtype).element_size()  # K and V


def full_tensors(layer):
    """Internal: the tensors of a layer's full storage (one tensor, or a list of segments)."""
    return list(layer.full_k) + list(layer.full_v) if isinstance(layer.full_k, (list, tuple)) else [layer.full_k,
                                                                                                   layer.full_v]


def test_streaming_storage_stops_growing_at_its_capacity():
    L, B, Hq, Hkv, D = 2, 2, 4, 2, 8
    window, sinks, max_step = [[4, 8, 2, 3], [1, 1, 5, 6]], [[2, 0, 1, 3], [0, 4, 0, 0]], 2
    cache = make_cache(Hq, Hkv, D, kinds="streaming", window=window, sinks=sinks, B=B, L=L, max_step=max_step)
    slots = [2 + 8 + max_step - 1, 3 + 3 + max_step - 1, 4 + 1 + max_step - 1, 0 + 6 + max_step - 1]  # per KV head
    q, k, v = make_qkv(B, 310, 310, Hq, Hkv, D, F64)
    for layer in range(L):  # a 10-token prompt fills every ring to its capacity
        cache.attention(layer, q[:, :10], k[:, :10], v[:, :10])
    before = cache.nbytes()
    ring_ptr = cache._layers[0].ring_k.data_ptr()  # internal: from now on the storage is never reallocated
    for layer in range(L):
        run_steps(cache, q[:, 10:], k[:, 10:], v[:, 10:], 1, [1] * 299, layer=layer)
        assert cache.nbytes() == before
    assert cache._layers[0].ring_k.data_ptr() == ring_ptr
    ideal = B * sum(slots) * bytes_per_token(D, F64)
    assert cache.ideal_nbytes() == ideal
    assert ideal <= cache.nbytes() <= ideal + 1024  # + the layout tables
    assert cache.dense_nbytes() == L * B * Hkv * 310 * bytes_per_token(D, F64)
    assert cache.nbytes() < cache.dense_nbytes() / 10


def test_full_storage_grows_in_chunks():
    # 300 decode steps (of 1 and 3 tokens) after a 10-token prompt: the full storage's capacity
    # (read from nbytes: what the empty cache holds is the rings and tables) stays within 25% +
    # 64 tokens of what is needed and grows in chunks, never per token; and the outputs across
    # every growth still match headops.attention
    B, Hq, Hkv, D, S = 2, 4, 2, 8, 10
    window, sinks = [-1, 6, 4, 2], [0, 2, 1, 1]
    cache = make_cache(Hq, Hkv, D, kinds=["full", "streaming"], window=window, sinks=sinks, B=B, max_step=3)
    empty = cache.nbytes()
    per_token = B * 1 * bytes_per_token(D, F64)  # one full KV head
    steps = [1] * 260 + [3] * 20 + [1, 2] * 10
    assert len(steps) == 300
    N = S + sum(steps)
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, F64)
    layer = cache._layers[0]  # internal: the addresses of the full storage
    outs, sizes, ptrs, p = [], [], [], 0
    for n in [S] + steps:
        outs.append(cache.attention(0, q[:, p:p + n], k[:, p:p + n], v[:, p:p + n]))
        p += n
        full_bytes = cache.nbytes() - empty
        assert full_bytes % per_token == 0
        cap = full_bytes // per_token
        assert p <= cap <= 1.25 * p + 64, f"length {p}: capacity {cap}"
        if not sizes or sizes[-1] != cap:
            sizes.append(cap)
        addresses = tuple(t.data_ptr() for t in full_tensors(layer))
        if not ptrs or ptrs[-1] != addresses:
            ptrs.append(addresses)
        slots = 1 + 4 + 3 - 1  # the streaming KV head: sinks 1, window 4, max_step 3
        assert cache.ideal_nbytes() == B * (p + min(p, slots)) * bytes_per_token(D, F64)
    assert 2 <= len(sizes) <= 15, f"the capacity changed {len(sizes) - 1} times in 300 steps: {sizes}"
    assert len(ptrs) <= 15, f"the full storage was reallocated {len(ptrs) - 1} times in 300 steps"
    assert max_err(torch.cat(outs, 1), oracle(q, k, v, window, sinks)) <= ATOL64


def test_nbytes_close_to_ideal_after_long_prefill():
    # 4000 tokens, 2 of 8 KV heads full: prefill reserves exactly the prompt rounded to 64
    B, H, D, S, max_step = 1, 8, 16, 4000, 4
    kinds = ["full", "streaming", "streaming", "streaming", "full", "streaming", "streaming", "streaming"]
    window = [-1, 64, 128, 32, -1, 16, 256, 8]
    dtype = torch.float32
    cache = make_cache(H, H, D, kinds=kinds, window=window, sinks=4, B=B, dtype=dtype, max_step=max_step)
    q, k, v = make_qkv(B, S, S, H, H, D, dtype)
    cache.attention(0, q, k, v)
    layer = cache._layers[0]  # internal: the full storage's capacity
    assert layer.capacity() == 4032  # full heads: 4000 rounded to 64
    kept = 2 * S + sum(4 + w + max_step - 1 for w, kind in zip(window, kinds) if kind == "streaming")
    assert cache.ideal_nbytes() == kept * bytes_per_token(D, dtype)
    assert cache.dense_nbytes() == H * S * bytes_per_token(D, dtype)
    ratio = cache.nbytes() / cache.ideal_nbytes()
    assert 1.0 <= ratio <= 1.02, ratio
    assert cache.nbytes() < 0.3 * cache.dense_nbytes()  # streaming-heavy: far below dense


# ---------------------------------------------------------------------- 7. work counters


def test_streaming_decode_reads_only_sinks_and_ring():
    B, Hq, Hkv, D, max_step = 2, 4, 2, 8, 4
    window, sinks = [3, 5, 2, 4], [1, 2, 0, 3]
    slots = [2 + 5 + max_step - 1, 3 + 4 + max_step - 1]  # max sinks + max window + max_step - 1 per KV head
    cache = make_cache(Hq, Hkv, D, kinds="streaming", window=window, sinks=sinks, B=B, max_step=max_step)
    q, k, v = make_qkv(B, 400, 400, Hq, Hkv, D, F64)
    cache.attention(0, q[:, :50], k[:, :50], v[:, :50])
    seen = []
    for p, n in [(50, 3), (53, 1), (54, 4), (58, 300), (358, 3)]:
        if n == 300:  # a long way further (steps of 4)
            for i in range(p, p + n, 4):
                cache.attention(0, q[:, i:i + 4], k[:, i:i + 4], v[:, i:i + 4])
            continue
        with headops.count_work() as w:
            cache.attention(0, q[:, p:p + n], k[:, p:p + n], v[:, p:p + n])
        rows = (Hq // Hkv) * n  # an item computes all query heads of its group x the new tokens
        # a ring is up to three runs of consecutive positions (sinks, ring tail, ring head):
        # at most 3 items per KV head, over the slots some query head of the group can see
        assert B * Hkv <= w.work_items <= 3 * B * Hkv
        assert w.score_elements <= B * rows * sum(slots)
        # what the group sees: the union of max(window) + n - 1 recent keys and max(sinks)
        visible = [min(max(w_ for w_ in window[g * 2:g * 2 + 2]) + n - 1 + max(sinks[g * 2:g * 2 + 2]), slots[g])
                   for g in range(Hkv)]
        assert w.score_elements <= B * rows * sum(visible)
        if n == 3:
            seen.append(w.score_elements)
    assert seen[0] == seen[1]  # at length 53 and 361 the same work


def test_gated_off_kv_group_is_not_visited():
    B, Hq, Hkv, D = 2, 4, 2, 8
    cache = make_cache(Hq, Hkv, D, kinds=["full", "streaming"], window=[-1, 6, 3, 2], sinks=[0, 0, 1, 1], B=B)
    q, k, v = make_qkv(B, 64, 64, Hq, Hkv, D, F64)
    cache.attention(0, q[:, :60], k[:, :60], v[:, :60])

    def step(p, gate):
        with headops.count_work() as w:
            out = cache.attention(0, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1], gate=gate)
        return w, out

    w_all, _ = step(60, torch.ones(Hq, dtype=F64))
    # the full group is one item per row, the streaming one 1 to 3 (its runs of consecutive positions)
    assert B * Hkv <= w_all.work_items <= B * (1 + 3)
    w_half, out = step(61, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64))  # streaming group off
    assert w_half.work_items == B
    rows, ring_slots = Hq // Hkv, 1 + 3 + 4 - 1  # streaming KV head: sinks 1, window 3, max_step 4
    assert B * rows * 61 < w_all.score_elements <= B * rows * (61 + ring_slots)  # the full KV head reads [0, 61)
    assert w_half.score_elements == B * rows * 62
    assert (out[:, :, 2:] == 0).all()
    # per batch row: row 0 keeps only the full group, row 1 only the streaming group (one head)
    w_pb, out = step(62, torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], dtype=F64))
    assert 2 <= w_pb.work_items <= 1 + 3
    assert (out[0, :, 2:] == 0).all() and (out[1, :, :3] == 0).all() and (out[1, :, 3] != 0).all()
    # one query head still on keeps its group visited
    w_one, _ = step(63, torch.tensor([1.0, 1.0, 0.0, 0.3], dtype=F64))
    assert B * Hkv <= w_one.work_items <= B * (1 + 3)


@pytest.mark.parametrize("n", [1, 3])
def test_full_heads_are_split_into_key_ranges(n):
    # KV head 0: an unlimited query head (keys [0, L)); KV head 1: query heads with windows
    # 100 and 40 and sinks 0 and 5 (keys [0, 5) and the last 100 + n - 1)
    B, Hq, Hkv, D, S, split = 2, 4, 2, 8, 500, 37
    window, sinks = [-1, -1, 100, 40], [0, 0, 0, 5]
    cache = make_cache(Hq, Hkv, D, kinds="full", window=window, sinks=sinks, B=B, split_keys=split)
    q, k, v = make_qkv(B, S + 2 * n, S + 2 * n, Hq, Hkv, D, F64)
    cache.attention(0, q[:, :S], k[:, :S], v[:, :S])
    with headops.count_work() as w:
        cache.attention(0, q[:, S:S + n], k[:, S:S + n], v[:, S:S + n])
    L = S + n
    ranges = [L, 5, 100 + n - 1]
    assert w.work_items == B * sum(math.ceil(r / split) for r in ranges)
    assert w.score_elements == B * 2 * n * sum(ranges)
    # alpha costs one pass: the same keys loaded and multiplied, only the P.V products double
    alpha = torch.tensor([0.5, 0.0, 0.25, 0.0], dtype=F64)
    with headops.count_work() as wa:
        cache.attention(0, q[:, S + n:], k[:, S + n:], v[:, S + n:], alpha=alpha)
    L2 = L + n
    assert wa.work_items == B * sum(math.ceil(r / split) for r in [L2, L2])  # head 2's full branch sees [0, L2)
    assert wa.key_blocks == wa.work_items  # split < 256: one key block per item
    assert wa.score_elements == B * 2 * n * 2 * L2
    assert wa.value_blocks == 2 * wa.key_blocks  # both branches in the same pass over the keys


def test_full_head_items_after_many_decode_steps():
    B, Hq, Hkv, D, S = 1, 2, 1, 8, 100
    cache = make_cache(Hq, Hkv, D, kinds="full", B=B)
    q, k, v = make_qkv(B, S + 401, S + 401, Hq, Hkv, D, F64)
    cache.attention(0, q[:, :S], k[:, :S], v[:, :S])
    for p in range(S, S + 400):
        cache.attention(0, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1])
    with headops.count_work() as w:
        cache.attention(0, q[:, -1:], k[:, -1:], v[:, -1:])
    # items and key blocks span the segments of the full storage (a cache grown a token at a
    # time has one per 64 tokens here)
    segments = len(cache._layers[0].full_k)
    assert segments >= 5
    assert w.work_items == B * math.ceil((S + 401) / headops.cache.SPLIT_KEYS)
    L, split = S + 401, headops.cache.SPLIT_KEYS
    assert w.key_blocks == B * sum(math.ceil(min(split, L - j) / 256) for j in range(0, L, split))


@pytest.mark.parametrize("split_keys", [1024, 100, 7])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_decode_across_many_segments(split_keys, dtype):
    """A cache grown one token at a time holds its full heads in many small segments: decode
    items and key blocks that cross their ends read the right rows (items of split_keys slots
    start and end anywhere in a segment)."""
    B, Hq, Hkv, D, S, steps = 2, 4, 2, 16, 90, 330
    cache = make_cache(Hq, Hkv, D, kinds=["full", "streaming"], window=[-1, -1, 40, 40], sinks=[0, 0, 3, 3],
                       B=B, dtype=dtype, max_step=1, split_keys=split_keys)
    q, k, v = make_qkv(B, S + steps, S + steps, Hq, Hkv, D, dtype)
    outs = run_steps(cache, q, k, v, S, [1] * steps)
    assert len(cache._layers[0].full_k) >= 4
    want = oracle(q.to(F64), k.to(F64), v.to(F64), [-1, -1, 40, 40], [0, 0, 3, 3])
    tol = {F64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    for i in (0, 100, steps - 1):
        p = S + i
        assert max_err(outs[1 + i], want[:, p:p + 1]) < tol, (i, max_err(outs[1 + i], want[:, p:p + 1]))


# ------------------------------------------------------------------------------- 8. errors


CTOR = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["full", "streaming"],
            window=[-1, -1, 3, 2], sinks=[0, 0, 1, 1], batch_size=2, dtype=F64, max_step=2)

BAD_CTOR = {
    "kinds_unknown": (dict(kinds=["full", "stream"]), "kinds"),
    "kinds_budget_without_budget": (dict(kinds="budget"), "budget"),
    "kinds_too_many": (dict(kinds=["full", "full", "streaming"]), "kinds"),
    "kinds_too_few": (dict(kinds=["full"]), "kinds"),
    "kinds_layers": (dict(kinds=[["full", "full"]] * 3), "kinds"),
    "window_0": (dict(window=[-1, 0, 3, 2]), "window"),
    "streaming_unlimited_window": (dict(window=[-1, -1, -1, 2]), "window"),
    "window_wrong_length": (dict(window=[3, 2, 1]), "window"),
    "sinks_negative": (dict(sinks=[0, -1, 0, 0]), "sinks"),
    "heads_not_multiple": (dict(num_heads=5), "num_heads"),
    "batch_size_0": (dict(batch_size=0), "batch_size"),
    "max_step_0": (dict(max_step=0), "max_step"),
    "split_keys_0": (dict(split_keys=0), "split_keys"),
}


@pytest.mark.parametrize("name", list(BAD_CTOR))
def test_constructor_errors(name):
    over, word = BAD_CTOR[name]
    headops.HeadSparseCache(**CTOR)  # the base is valid
    with pytest.raises((ValueError, TypeError), match=word):
        headops.HeadSparseCache(**{**CTOR, **over})


def fresh_cache():
    return headops.HeadSparseCache(**CTOR)


Q, K, V = make_qkv(2, 3, 3, 4, 2, 8, F64)

BAD_CALLS = {
    # name: (word, call on a fresh cache, prefill first?)
    "q_heads": ("q", lambda c: c.attention(0, Q[:, :, :3], K, V), False),
    "q_batch": ("q", lambda c: c.attention(0, Q[:1], K[:1], V[:1]), False),
    "q_head_dim": ("q", lambda c: c.attention(0, Q[..., :4], K[..., :4], V[..., :4]), False),
    "q_rank": ("q", lambda c: c.attention(0, Q[0], K, V), False),
    "q_not_tensor": ("q", lambda c: c.attention(0, Q.tolist(), K, V), False),
    "k_heads": ("k", lambda c: c.attention(0, Q, Q, Q), False),
    "v_shape": ("k|v", lambda c: c.attention(0, Q, K, V[:, :2]), False),
    "q_dtype": ("q", lambda c: c.attention(0, Q.float(), K.float(), V.float()), False),
    "k_dtype": ("k", lambda c: c.attention(0, Q, K.float(), V), False),
    "window_given": ("window", lambda c: c.attention(0, Q, K, V, window=torch.tensor([1, 1, 1, 1])), False),
    "sinks_given": ("sinks", lambda c: c.attention(0, Q, K, V, sinks=1), False),
    "layer_too_big": ("layer", lambda c: c.attention(2, Q, K, V), False),
    "layer_negative": ("layer", lambda c: c.attention(-1, Q, K, V), False),
    "layout": ("layout", lambda c: c.attention(0, Q, K, V, layout="sbhd"), False),
    "lengths_too_long": ("lengths", lambda c: c.attention(0, Q, K, V, lengths=[4, 3]), False),
    "lengths_zero": ("lengths", lambda c: c.attention(0, Q, K, V, lengths=[0, 3]), False),
    "lengths_count": ("lengths", lambda c: c.attention(0, Q, K, V, lengths=[3]), False),
    "lengths_not_first": ("lengths", lambda c: c.attention(0, Q[:, :1], K[:, :1], V[:, :1], lengths=[1, 1]), True),
    "probed_step_past_max_step": ("max_step", lambda c: c.attention(0, Q, K, V, probe=headops.Probe(entropy=True)),
                                  True),
    "decode_q_k_steps": ("q", lambda c: c.attention(0, Q[:, :1], K[:, :2], V[:, :2]), True),
    "decode_gate_shape": ("gate", lambda c: c.attention(0, Q[:, :1], K[:, :1], V[:, :1], gate=torch.ones(3, dtype=F64)),
                          True),
    "decode_key_bias_short": ("key_bias", lambda c: c.attention(0, Q[:, :1], K[:, :1], V[:, :1],
                                                                key_bias=torch.zeros(3, dtype=F64)), True),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_attention_errors(name):
    word, call, prefill = BAD_CALLS[name]
    c = fresh_cache()
    if prefill:
        c.attention(0, Q, K, V)
    with pytest.raises((ValueError, TypeError), match=word):
        call(c)


def test_long_step_is_fine_without_streaming_heads():
    # max_step sizes the rings only: a full-only cache takes a decode step of any length
    c = headops.HeadSparseCache(**{**CTOR, "kinds": "full"})
    q, k, v = make_qkv(2, 9, 9, 4, 2, 8, F64)
    out = run_steps(c, q, k, v, 3, [6])
    assert max_err(out[1], oracle(q, k, v, CTOR["window"], CTOR["sinks"])[:, 3:]) <= ATOL64


def test_rejected_decode_call_leaves_the_cache_unchanged():
    c = fresh_cache()
    c.attention(0, Q, K, V)
    with pytest.raises(ValueError, match="gate"):
        c.attention(0, Q[:, :1], K[:, :1], V[:, :1], gate=torch.ones(3, dtype=F64))
    assert c.seq_lengths(0).tolist() == [3, 3]


def test_alpha_on_streaming_served_head_is_a_value_error():
    c = fresh_cache()
    alpha = torch.tensor([0.0, 0.0, 0.5, 0.0], dtype=F64)  # query head 2 is served by the streaming KV head
    with pytest.raises(ValueError, match="alpha"):  # a spec asking for more than is kept: refused at once
        c.attention(0, Q, K, V, alpha=alpha)
    c.attention(0, Q, K, V)
    before = c.seq_lengths(0)
    with pytest.raises(ValueError, match="alpha"):
        c.attention(0, Q[:, :1], K[:, :1], V[:, :1], alpha=alpha)
    assert torch.equal(c.seq_lengths(0), before)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_messages_name_the_cache_and_its_argument(phase):
    # the per-head rules are headops.attention's, the messages the cache's own
    c = fresh_cache()
    n = 3
    if phase == "decode":
        c.attention(0, Q, K, V)
        n = 1

    def attend(**kw):
        return c.attention(0, Q[:, :n], K[:, :n], V[:, :n], **kw)

    caller = "headops.HeadSparseCache.attention"
    for kw, words in [(dict(gate=torch.ones(3, dtype=F64)), "gate must be of shape"),
                      (dict(sink_logit=torch.full((4,), math.nan, dtype=F64)), "sink_logit must be a number"),
                      (dict(softmax_scale=math.inf), "softmax_scale must be a finite float"),
                      (dict(alpha=torch.tensor([0.0, 0.0, 0.5, 0.0], dtype=F64)), "alpha must be 0 on query heads"),
                      (dict(causal=1), "causal must be a bool")]:
        with pytest.raises((ValueError, TypeError), match=rf"^{re.escape(caller)}: {words}"):
            attend(**kw)
    with pytest.raises(TypeError, match=r"^headops\.HeadSparseCache\.append: k must be a 4-D tensor"):
        c.append(0, K.tolist(), V)


# -------------------------------------------------------- sizing at the first call


def lazy_cache(**over):
    kw = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["full", "streaming"],
              window=[-1, -1, 3, 2], sinks=[0, 0, 1, 1], max_step=2)
    return headops.HeadSparseCache(**{**kw, **over})


def test_the_cache_sizes_itself_at_its_first_call():
    # as transformers' caches: batch size, dtype and device from the first call, storages allocated then
    cache = lazy_cache()
    tables = cache.nbytes()
    assert cache.batch_size == -1 and cache.dtype is None and cache.device is None
    assert cache.get_seq_length() == 0 and cache.seq_lengths(0).numel() == 0
    assert cache.ideal_nbytes() == cache.dense_nbytes() == 0
    q, k, v = make_qkv(3, 5, 5, 4, 2, 8, torch.bfloat16)
    out = cache.attention(1, q, k, v)  # any layer may come first
    assert (cache.batch_size, cache.dtype, cache.device) == (3, torch.bfloat16, torch.device("cpu"))
    assert out.dtype == torch.bfloat16 and cache.nbytes() > tables
    assert cache.seq_lengths(0).tolist() == [0] * 3 and cache.seq_lengths(1).tolist() == [5] * 3
    assert_close(out.double(), oracle(q, k, v, [-1, -1, 3, 2], [0, 0, 1, 1]).double(), 1e-2, 1e-2)
    # from then on the calls are checked against what the first one brought
    with pytest.raises(ValueError, match=r"^headops\.HeadSparseCache\.attention: q must be \[B, S, Hq, D\] with B=3"):
        cache.attention(0, q[:2], k[:2], v[:2])
    with pytest.raises(ValueError, match=r"^headops\.HeadSparseCache\.append: k must be of the cache's dtype"):
        cache.append(0, k.float(), v.float())


def test_a_refused_first_call_leaves_the_cache_unsized():
    cache = lazy_cache()
    tables = cache.nbytes()
    q, k, v = make_qkv(2, 4, 4, 4, 2, 8, F64)
    with pytest.raises(ValueError, match=r"^headops\.HeadSparseCache\.attention: gate must be"):
        cache.attention(0, q, k, v, gate=torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match=r"^headops\.HeadSparseCache\.attention: q must be float32"):
        cache.attention(0, q.long(), k.long(), v.long())
    assert cache.batch_size == -1 and cache.dtype is None and cache.nbytes() == tables
    # a ring too big to allocate is refused at the first call, which changes nothing
    huge = lazy_cache(kinds="budget", window=-1, budget=2**40)
    with pytest.raises(ValueError, match="window, sinks, budget and max_step"):
        huge.attention(0, q, k, v)
    assert huge.batch_size == -1 and huge.seq_lengths(0).numel() == 0
    # (a ring grows with what it receives: a window of 2**40 holds what it has seen)
    wide = lazy_cache(window=[-1, -1, 2**40, 2])
    wide.attention(0, q, k, v)
    assert wide._layers[0].ring_alloc == [64] and wide.nbytes() < 2**16  # 64 ring slots: 4 tokens, rounded up
    out = cache.attention(0, q[:1], k[:1], v[:1])  # and a later call sizes it
    assert cache.batch_size == 1 and out.shape == (1, 4, 4, 8)


def test_given_sizes_are_checked_and_sized_at_construction_when_complete():
    cache = lazy_cache(batch_size=2)  # dtype from the first call
    assert cache.batch_size == 2 and cache.dtype is None and cache.seq_lengths(0).numel() == 0
    q, k, v = make_qkv(3, 4, 4, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        cache.attention(0, q, k, v)
    cache.append(0, k[:2], v[:2])
    assert cache.dtype == torch.float32 and cache.seq_lengths(0).tolist() == [4, 4]
    sized = lazy_cache(batch_size=2, dtype=F64)  # everything given: sized now
    assert sized.seq_lengths(1).tolist() == [0, 0] and sized.device == torch.device("cpu")
    assert sized.nbytes() > lazy_cache().nbytes()


# ------------------------------------------------------------------------------ raw ops

RB, RHQ, RHKV, RD = 2, 4, 2, 8


@pytest.fixture
def layer_state():
    """A valid layer (KV head 0 full, KV head 1 streaming with sinks 1 and a ring of 4) after a
    5-token prefill, valid arguments of the two raw ops for token 5, and the cache with the
    token-5 inputs."""
    cache = headops.HeadSparseCache(**{**CTOR, "num_layers": 1})
    q, k, v = make_qkv(RB, 6, 6, RHQ, RHKV, RD, F64)
    cache.attention(0, q[:, :5], k[:, :5], v[:, :5])
    st = cache._layers[0]  # internal: the storages and tables the raw ops take
    tables = dict(lengths=st.lengths.clone(), kv_kind=st.kv_kind.clone(), kv_index=st.kv_index.clone(),
                  ring_offset=st.ring_offset.clone(), ring_sinks=st.ring_sinks.clone(), ring_size=st.ring_size.clone())
    assert tables["ring_size"].tolist() == [4] and tables["ring_sinks"].tolist() == [1]
    storages = dict(full_k=map_full(st.full_k, torch.clone), full_v=map_full(st.full_v, torch.clone),
                    ring_k=st.ring_k.clone(), ring_v=st.ring_v.clone())
    decode = dict(q=q[:, 5:6].clone(), **storages, **tables, causal=True, default_scale=1 / math.sqrt(RD),
                  softmax_scale=None, window=st.windows.expand(RB, RHQ).contiguous(),
                  sinks=st.sinks.expand(RB, RHQ).contiguous(), alpha=None, key_bias=None, sink_logit=None,
                  out_scale=None, out_bias=None, gate=None, split_keys=1024)
    append = dict(k_new=k[:, 5:6].clone(), v_new=v[:, 5:6].clone(), **storages, **tables)
    return decode, append, (cache, q[:, 5:6], k[:, 5:6], v[:, 5:6])


def map_full(x, fn):
    """fn on the full storage: one tensor, or each segment of a list of them."""
    return [fn(t) for t in x] if isinstance(x, (list, tuple)) else fn(x)


def full_capacity(x):
    return sum(t.shape[2] for t in x) if isinstance(x, (list, tuple)) else x.shape[2]


def per_head_long(*values):
    return torch.tensor([values] * RB, dtype=torch.int64)


# name: (which op, overrides given the valid args, word of the message)
BAD_RAW = {
    "storage_dtype": ("both", lambda a: dict(full_k=map_full(a["full_k"], lambda t: t.float())), "dtype"),
    "ring_storage_dtype": ("both", lambda a: dict(ring_v=a["ring_v"].float()), "dtype"),
    "storage_not_contiguous": ("both", lambda a: dict(ring_k=torch.zeros(RB, RD, a["ring_k"].shape[1], dtype=F64)
                                                      .transpose(1, 2)), "contiguous"),
    "full_not_contiguous": ("both", lambda a: {n: map_full(a[n], lambda t: t.transpose(2, 3).contiguous()
                                                           .transpose(2, 3)) for n in ("full_k", "full_v")},
                            "contiguous"),
    "full_head_dim": ("both", lambda a: dict(full_k=map_full(a["full_k"], lambda t: t[..., :4].contiguous())), "full"),
    "full_rank": ("both", lambda a: {n: map_full(a[n], lambda t: t[:, 0]) for n in ("full_k", "full_v")}, "full"),
    "full_heads": ("both", lambda a: {n: map_full(a[n], lambda t: t.expand(RB, 2, -1, RD).contiguous())
                                      for n in ("full_k", "full_v")}, "full"),
    "full_segment_counts_differ": ("both", lambda a: dict(full_v=list(a["full_v"]) + [a["full_v"][0].clone()]),
                                   "segments"),
    "ring_batch": ("both", lambda a: dict(ring_k=a["ring_k"][:1].contiguous(), ring_v=a["ring_v"][:1].contiguous()),
                   "ring_k"),
    "ring_k_v_differ": ("both", lambda a: dict(ring_v=a["ring_v"][:, :-1].contiguous()), "ring_k"),
    "kv_kind_2": ("both", lambda a: dict(kv_kind=torch.tensor([0, 2])), "kv_kind"),
    "kv_index_out_of_range": ("both", lambda a: dict(kv_index=torch.tensor([0, 1])), "kv_index"),
    "kv_index_negative": ("both", lambda a: dict(kv_index=torch.tensor([-1, 0])), "kv_index"),
    "kv_kind_count": ("both", lambda a: dict(kv_kind=torch.tensor([0])), "kv_kind"),
    "ring_past_slots": ("both", lambda a: dict(ring_offset=torch.tensor([1])), "fit"),
    "ring_size_past_slots": ("both", lambda a: dict(ring_size=torch.tensor([5])), "fit"),
    "ring_size_0": ("both", lambda a: dict(ring_size=torch.tensor([0])), "ring"),
    "ring_tables_count": ("both", lambda a: dict(ring_sinks=torch.tensor([1, 1])), "streaming head"),
    "lengths_int32": ("both", lambda a: dict(lengths=a["lengths"].int()), "int64"),
    "lengths_count": ("both", lambda a: dict(lengths=torch.tensor([5])), "lengths"),
    "lengths_negative": ("both", lambda a: dict(lengths=torch.tensor([-1, 5])), "lengths"),
    "append_past_capacity": ("append", lambda a: dict(lengths=torch.tensor([5, full_capacity(a["full_k"])])),
                             "capacity"),
    "append_k_v_shapes": ("append", lambda a: dict(v_new=a["v_new"].expand(RB, 2, RHKV, RD).contiguous()), "k_new"),
    "decode_lengths_below_sq": ("decode", lambda a: dict(q=torch.zeros(RB, 3, RHQ, RD, dtype=F64),
                                                         lengths=torch.tensor([5, 2])), "fewer"),
    "decode_past_capacity": ("decode", lambda a: dict(lengths=torch.tensor([5, 10 ** 6])), "capacity"),
    "decode_alpha_on_streaming": ("decode", lambda a: dict(alpha=torch.tensor([[0.0, 0.0, 0.5, 0.0]] * RB,
                                                                                dtype=F64)), "alpha"),
    # (past the ring only once the ring has evicted: at 8 tokens, sinks 1 + ring 4 hold 5 of them)
    "decode_window_past_ring": ("decode", lambda a: dict(window=per_head_long(-1, -1, 5, 2),
                                                         lengths=torch.tensor([8, 8])), "keeps"),
    "decode_window_unlimited_on_streaming": ("decode", lambda a: dict(window=per_head_long(-1, -1, -1, 2)), "keeps"),
    "decode_no_window_on_streaming": ("decode", lambda a: dict(window=None), "keeps"),
    "decode_step_past_ring": ("decode", lambda a: dict(q=torch.zeros(RB, 3, RHQ, RD, dtype=F64),
                                                       lengths=torch.tensor([8, 8])), "keeps"),
    "decode_sinks_past_kept": ("decode", lambda a: dict(sinks=per_head_long(0, 0, 2, 1)), "keeps"),
    "decode_split_keys_0": ("decode", lambda a: dict(split_keys=0), "split_keys"),
    "decode_key_bias_short": ("decode", lambda a: dict(key_bias=torch.zeros(RB, RHQ, 4, dtype=F64)), "key_bias"),
    "decode_gate_shape": ("decode", lambda a: dict(gate=torch.ones(RHQ, dtype=F64)), "gate"),
    "decode_q_dtype": ("decode", lambda a: dict(q=a["q"].long()), "float"),
    "decode_q_heads": ("decode", lambda a: dict(q=torch.zeros(RB, 1, 3, RD, dtype=F64)), "multiple"),
}


def with_fresh_storages(args):
    storages = ("full_k", "full_v", "ring_k", "ring_v")
    return {n: map_full(t, torch.clone) if n in storages else t for n, t in args.items()}


@pytest.mark.parametrize("name", list(BAD_RAW))
def test_raw_op_errors(name, layer_state):
    which, override, word = BAD_RAW[name]
    decode, append, _ = layer_state
    ops = {"decode": (torch.ops.headops.decode_attention, decode), "append": (torch.ops.headops.kv_append, append)}
    for op_name in (["decode", "append"] if which == "both" else [which]):
        op, args = ops[op_name]
        op(**with_fresh_storages(args))  # the valid call runs
        bad = {**with_fresh_storages(args), **override({**decode, **append})}
        with pytest.raises(RuntimeError, match=word):
            op(**bad)


def test_raw_ops_compute_what_the_cache_computes(layer_state):
    # the valid raw calls of the error tests: append token 5, then decode it (lengths count it)
    decode, append, (cache, q, k, v) = layer_state
    torch.ops.headops.kv_append(**append)
    decode = {**decode, "full_k": append["full_k"], "full_v": append["full_v"], "ring_k": append["ring_k"],
              "ring_v": append["ring_v"], "lengths": append["lengths"] + 1}
    out = torch.ops.headops.decode_attention(**decode)
    want = cache.attention(0, q, k, v)
    assert out.shape == (RB, 1, RHQ, RD)
    assert max_err(out, want) <= ATOL64


_OVERFLOW_SCRIPT = textwrap.dedent("""
    import torch, headops
    B, D = 1, 4
    ring = torch.zeros(B, 5, D, dtype=torch.float64)
    if "List" in str(torch.ops.headops.decode_attention.default._schema.arguments[1].type):
        full_k, full_v = [], []  # the full storage as a list of segments: none
    else:
        full_k, full_v = (torch.zeros(B, 0, 0, D, dtype=torch.float64) for _ in range(2))
    q = torch.randn(B, 1, 1, D, dtype=torch.float64)
    try:
        # one streaming KV head: offset 1 + ring 2**63 - 1 overflows int64 in the "fits in the slots" check
        torch.ops.headops.decode_attention(
            q, full_k, full_v, ring, ring.clone(), torch.tensor([3]), torch.tensor([1]), torch.tensor([0]),
            torch.tensor([1]), torch.tensor([0]), torch.tensor([2**63 - 1]), True, 1.0, None,
            torch.tensor([[1]]), None, None, None, None, None, None, None, 1024)
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0])
    else:
        print("no error")
""")


def test_raw_decode_huge_ring_table_does_not_crash():
    # (the timeout only guards against a hang: importing torch in an ASan-preloaded child on a busy
    # 2-core machine can take minutes)
    proc = subprocess.run([sys.executable, "-c", _OVERFLOW_SCRIPT], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the process died (returncode {proc.returncode}): {proc.stderr[-2000:]}"
    assert "raised:" in proc.stdout


# ------------------------------------------------------------------------- torch.library checks


def test_kv_ops_pass_opcheck():
    # schemas (mutation annotations of kv_append) and fake kernels agree with the real ops
    cache = headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["full", "streaming"],
                                    window=[-1, -1, 4, 4], sinks=[0, 0, 1, 1])
    q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8)
    cache.attention(0, q, k, k)
    st = cache._layers[0]
    k1 = torch.randn(1, 1, 2, 8)
    tables = (st.lengths, st.kv_kind, st.kv_index, st.ring_offset, st.ring_sinks, st.ring_size)
    torch.library.opcheck(torch.ops.headops.kv_append.default,
                          (k1, k1, st.full_k, st.full_v, st.ring_k, st.ring_v) + tables,
                          test_utils=("test_schema", "test_faketensor"))
    cache.append(0, k1, k1)
    args = (torch.randn(1, 1, 4, 8), st.full_k, st.full_v, st.ring_k, st.ring_v) + tables + (
        True, 8 ** -0.5, None, st.windows.view(1, -1).clone(), st.sinks.view(1, -1).clone(), None, None, None, None,
        None, None, 1024)
    torch.library.opcheck(torch.ops.headops.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------ budget heads


def budget_cache(B=2, Hq=4, Hkv=2, D=16, budget=12, recent=3, sinks=(0, 0, 2, 1), max_step=2, kinds=None):
    return headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                   kinds=kinds or ["full"] + ["budget"] * (Hkv - 1), window=-1, sinks=list(sinks),
                                   budget=budget, budget_recent=recent, batch_size=B, dtype=F64, max_step=max_step)


def kept_mask(cache, B, Hq, Hkv, L):
    """key_bias [B, Hq, L]: 0 on the positions each query head's KV head keeps, -inf elsewhere."""
    group = Hq // Hkv
    kb = torch.full((B, Hq, L), float("-inf"), dtype=F64)
    for b in range(B):
        for h in range(Hkv):
            kb[b, h * group:(h + 1) * group, cache._layers[0].kept_positions(b, h)] = 0.0
    return kb


@pytest.mark.parametrize("steps", [[1] * 25, [2, 1, 2, 2, 1] * 4])
@pytest.mark.parametrize("args", [{}, "all"])
def test_budget_heads_equal_attention_over_the_kept_set(steps, args):
    # DESIGN section 2: a budget head equals recomputing with a key mask equal to the kept set
    B, S, Hq, Hkv, D = 2, 30, 4, 2, 16
    cache = budget_cache(B, Hq, Hkv, D)
    T = S + sum(steps)
    q, k, v = make_qkv(B, T, T, Hq, Hkv, D, F64)
    extra = {} if args == {} else dict(gate=torch.tensor([[1.0, 0.5, 2.0, 0.0], [0.3, 1.0, 1.0, 1.0]], dtype=F64),
                                       sink_logit=torch.randn(Hq, dtype=F64), softmax_scale=torch.rand(Hq, dtype=F64))
    out = cache.attention(0, q[:, :S], k[:, :S], v[:, :S], **extra)
    assert_close(out, headops.attention(q[:, :S], k[:, :S], v[:, :S], **extra), 1e-12, 1e-12)
    p = S
    for n in steps:
        out = cache.attention(0, q[:, p:p + n], k[:, p:p + n], v[:, p:p + n], **extra)
        p += n
        kb = kept_mask(cache, B, Hq, Hkv, p)
        want = headops.attention(q[:, :p], k[:, :p], v[:, :p], key_bias=kb, **extra)[:, -n:]
        assert_close(out, want, 1e-12, 1e-12)
        for b in range(B):
            kept = cache._layers[0].kept_positions(b, 1)
            assert kept.numel() == min(p, 12)
            assert {0, 1} <= set(kept.tolist())  # the sinks (max of the group's: 2)
            assert set(range(p - 3, p)) <= set(kept.tolist())  # the budget_recent latest tokens
    assert cache.ideal_nbytes() < cache.dense_nbytes()


def test_budget_eviction_takes_the_least_attended_token():
    B, S, Hq, Hkv, D = 1, 20, 2, 1, 8
    cache = budget_cache(B, Hq, Hkv, D, budget=8, recent=2, sinks=(1, 0), kinds=["budget"])
    q, k, v = make_qkv(B, S + 12, S + 12, Hq, Hkv, D, F64)
    cache.attention(0, q[:, :S], k[:, :S], v[:, :S])
    layer = cache._layers[0]
    for p in range(S, S + 12):
        before = layer.kept_positions(0, 0)
        masses = {int(pos): float(mass) for pos, mass in zip(layer.slot_pos[0], layer.slot_mass[0]) if pos >= 0}
        cache.attention(0, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1])
        after = layer.kept_positions(0, 0)
        evicted = sorted(set(before.tolist()) - set(after.tolist()))
        assert len(evicted) == 1 and p in after.tolist()
        evictable = [pos for pos in before.tolist() if pos >= 1 and pos <= p - 2]
        least = min(evictable, key=lambda pos: (masses[pos], pos))
        assert evicted[0] == least
    # the masses are attention probabilities summed over the group's rows: each step adds
    # at most one per query head (a row's probabilities sum to at most 1)
    assert 0 < float(layer.slot_mass.sum()) <= Hq * (12 + min(S, 2)) + 1e-9


def test_budget_prefill_keeps_what_the_last_queries_attend_to():
    B, S, Hq, Hkv, D = 1, 60, 2, 1, 8
    cache = budget_cache(B, Hq, Hkv, D, budget=10, recent=4, sinks=(2, 0), kinds=["budget"])
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, F64)
    cache.attention(0, q, k, v)
    # the observation window is the last budget_recent = 4 queries: their attention, summed
    logits = torch.einsum("ihd,jhd->hij", q[0, -4:], k[0].expand(S, Hq, D)) / math.sqrt(D)
    logits = logits.masked_fill(torch.arange(S).view(1, 1, S) > torch.arange(S - 4, S).view(1, 4, 1), float("-inf"))
    mass = torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    middle = torch.arange(2, S - 4)
    want = sorted([0, 1] + list(range(S - 4, S)) + middle[mass[middle].topk(4).indices].tolist())
    assert cache._layers[0].kept_positions(0, 0).tolist() == want


@pytest.mark.parametrize("bad, word", [
    (dict(budget=None), "budget"),
    (dict(budget=5), "budget"),  # <= sinks (2) + recent (3)
    (dict(window=[-1, -1, 8, -1]), "window"),
])
def test_budget_bad_specs(bad, word):
    kw = dict(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["full", "budget"], window=-1,
              sinks=[0, 0, 2, 1], budget=12, budget_recent=3)
    kw.update(bad)
    with pytest.raises(ValueError, match=word):
        headops.HeadSparseCache(**kw)


def test_budget_head_refuses_alpha():
    cache = budget_cache()
    q, k, v = make_qkv(2, 10, 10, 4, 2, 16, F64)
    with pytest.raises(ValueError, match="alpha"):
        cache.attention(0, q, k, v, alpha=torch.tensor([0.0, 0.0, 0.5, 0.0], dtype=F64))


# ---------------------------------------------------------------- reserve / sync_lengths


def _reserve_case(sized=True, **kw):
    # KV head 1 streaming, its ring growing toward its window of 200
    return headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["full", "streaming"],
                                   window=[-1, -1, 200, 200], sinks=[0, 0, 2, 2], batch_size=2,
                                   dtype=F64 if sized else None, max_step=1, **kw)


def test_reserved_cache_steps_allocate_nothing_and_equal_a_growing_cache():
    """reserve(T): the storages are sized now (full segments, rings toward their windows), so steps up
    to T tokens allocate nothing and move nothing (what a CUDA graph's replays need); the outputs
    equal a cache that grows as it goes."""
    S, steps = 20, 70
    q, k, v = make_qkv(2, S + steps, S + steps, 4, 2, 8, F64)
    reserved, growing = _reserve_case(), _reserve_case()
    for cache in (reserved, growing):
        cache.attention(0, q[:, :S], k[:, :S], v[:, :S])
    reserved.reserve(S + steps)
    st, twin = reserved._layers[0], growing._layers[0]
    twin_layout = (list(twin.ring_alloc), twin.ring_k.data_ptr())
    layout = (len(st.full_k), list(st.ring_alloc), st.ring_k.data_ptr(), [t.data_ptr() for t in st.full_k])
    assert st.room() >= S + steps
    for p in range(S, S + steps):
        got = reserved.attention(0, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1])
        want = growing.attention(0, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1])
        assert max_err(got, want) <= ATOL64
    assert (len(st.full_k), list(st.ring_alloc), st.ring_k.data_ptr(), [t.data_ptr() for t in st.full_k]) == layout
    assert (list(twin.ring_alloc), twin.ring_k.data_ptr()) != twin_layout  # (the twin's ring did grow and move)
    reserved.sync_lengths()  # on the CPU the mirror was right all along
    assert st.held == twin.held == [S + steps] * 2


def test_reserve_and_sync_lengths_refuse_by_name():
    cache = _reserve_case(max_length=100)
    with pytest.raises(ValueError, match="not sized yet"):
        _reserve_case(sized=False).reserve(10)  # (dtype not given: sized at the first call)
    q, k, v = make_qkv(2, 10, 10, 4, 2, 8, F64)
    cache.attention(0, q, k, v)
    st = cache._layers[0]
    before = (len(st.full_k), list(st.ring_alloc), st.full_capacity)
    for bad in (-1, 1.5, "20", None):
        with pytest.raises((TypeError, ValueError), match="tokens"):
            cache.reserve(bad)
    with pytest.raises(ValueError, match="past max_length = 100"):
        cache.reserve(101)
    assert (len(st.full_k), list(st.ring_alloc), st.full_capacity) == before  # refused: nothing changed
    cache.reserve(100)
    # the device's counts past what the storages hold (as a graph replayed past its reserve would
    # leave them): reported, naming reserve, and the mirror left as it was
    st.lengths += 200
    with pytest.raises(RuntimeError, match=r"past the \d+ its storages held without growing: reserve\(\)"):
        cache.sync_lengths()
    assert st.held == [10, 10]
    st.lengths -= 200
    st.lengths += 110  # within the storages (room 128) but past max_length
    assert st.room() >= 120
    with pytest.raises(RuntimeError, match="past max_length = 100"):
        cache.sync_lengths()
    assert st.held == [10, 10]


def test_sync_lengths_checks_every_layer_before_changing_any():
    cache = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, kinds="full",
                                    batch_size=2, dtype=F64, max_step=1)
    q, k, v = make_qkv(2, 10, 10, 4, 2, 8, F64)
    for layer in range(2):
        cache.attention(layer, q, k, v)
    first, second = cache._layers
    first.lengths += 3  # layer 0: three replayed steps, within its storages
    second.lengths += 1000  # layer 1: past them
    with pytest.raises(RuntimeError, match="layer 1 was stepped to 1010"):
        cache.sync_lengths()
    assert first.held == second.held == [10, 10]  # neither layer's mirror moved
    second.lengths -= 997
    cache.sync_lengths()
    assert first.held == second.held == [13, 13]


def test_a_decode_call_past_max_step_runs_as_max_step_calls():
    """A call of 7 new tokens with max_step = 2 (a second turn's prompt): the same outputs and kept
    tokens as calls of 2, 2, 2 and 1, with full, streaming (compensated) and budget heads, a
    key_bias by position sliced for each of them, and rows of different lengths."""
    from test_cache_rows import assert_same, held

    def make():
        return headops.HeadSparseCache(num_layers=2, num_heads=6, num_kv_heads=3, head_dim=16,
                                       kinds=["full", "streaming", "budget"], window=[-1, -1, 3, 2, -1, -1],
                                       sinks=[0, 0, 1, 2, 1, 1], budget=[None, None, 6], budget_recent=2, max_step=2,
                                       compensation=[None, "weighted", None])

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 19, h, 16, generator=g) for h in (6, 3, 3))
    bias = torch.randn(2, 6, 19, generator=g)
    whole, steps = make(), make()
    for cache in (whole, steps):
        cache.attention(0, q[:, :12], k[:, :12], v[:, :12], lengths=[12, 9], key_bias=bias[..., :12])
    got = whole.attention(0, q[:, 12:], k[:, 12:], v[:, 12:], key_bias=bias)
    want = torch.cat([steps.attention(0, q[:, a:b], k[:, a:b], v[:, a:b], key_bias=bias[..., :b])
                      for a, b in ((12, 14), (14, 16), (16, 18), (18, 19))], 1)
    assert torch.equal(got, want)
    assert_same(held(whole), held(steps))
    with pytest.raises(ValueError, match="key_bias"):  # checked whole before anything changes
        whole.attention(0, q[:, :5], k[:, :5], v[:, :5], key_bias=bias[..., :20])
    assert_same(held(whole), held(steps))
