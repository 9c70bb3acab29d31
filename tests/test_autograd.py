"""Gradients of headops.attention (the fused CPU backward, DESIGN section 1 'Autograd').

1. torch.autograd.gradcheck in float64 (finite differences: an oracle independent of the
   reference) for q, k, v and every floating per-head argument, alone and together.
2. Every gradient against autograd through headops.reference.attention, on shapes that cross
   the backward's tiles, in float64, float32, bfloat16 and float16.
3. Special cases: alpha exactly 0/1, gates exactly 0 (with and without requires_grad), rows
   with no visible key, the gradient through lse, sink_logit = -inf, empty sequences.
4. The cost contract in the backward, read from the work counters.
5. The gradient of a gate is the head-importance score of Michel et al. (2019).
6. torch.compile, 7. determinism.

Tolerances of the reference comparisons (GRAD_TOL) are relative to the largest magnitude of
each reference gradient; see the comment above GRAD_TOL for the measured errors behind them.
"""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import headops
from headops import reference

from conftest import ALL_FEATURES as ALL, assert_no_new_nonfinite, half_ulp_excess, head_params, make_qkv

F64 = torch.float64
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
# floating per-head arguments, in the order of the op's gradients
PARAMS = ("softmax_scale", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate")

shape_id = lambda s: "B{}-Sq{}-Sk{}-Hq{}-Hkv{}-D{}".format(*s)  # noqa: E731


def acc_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def seq_heads(q, layout):
    """(Sq, Hq) of q in `layout`."""
    return (q.shape[1], q.shape[2]) if layout == "bshd" else (q.shape[2], q.shape[1])


# ---------------------------------------------------------------------------------------------
# helpers: gradients of a weighted sum of the outputs, by headops and by the reference


def leaves(q, k, v, kw, *, qkv_grad=True, params=PARAMS):
    """Fresh leaves: q, k, v (their dtype and strides kept; all of them when qkv_grad is True,
    else those it names) and the floating tensors of kw named in `params`, requiring grad (the
    others are passed as they are)."""
    wanted = ("q", "k", "v") if qkv_grad is True else (qkv_grad or ())
    q, k, v = (t.detach().requires_grad_(n in wanted) for n, t in (("q", q), ("k", k), ("v", v)))
    kw = dict(kw)
    for name in params:
        t = kw.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            kw[name] = t.detach().clone().requires_grad_(True)
    return q, k, v, kw


def grads(attn, q, k, v, kw, dout, dlse=None, *, qkv_grad=True, params=PARAMS):
    """{name: d loss / d name} with loss = sum(out * dout) [+ sum(lse * dlse)], for q, k, v (when
    qkv_grad) and the per-head tensors named in `params`. Every one must receive a gradient."""
    q, k, v, kw = leaves(q, k, v, kw, qkv_grad=qkv_grad, params=params)
    res = attn(q, k, v, return_lse=dlse is not None, **kw)
    out, lse = res if dlse is not None else (res, None)
    loss = (out.to(F64) * dout).sum()
    if dlse is not None:
        loss = loss + (lse.to(F64) * dlse).sum()
    named = {n: t for n, t in (("q", q), ("k", k), ("v", v)) if t.requires_grad}
    named.update({n: t for n, t in kw.items() if isinstance(t, torch.Tensor) and t.requires_grad})
    return dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def round_params(kw, dtype):
    """Floating per-head tensors rounded to the kernel's accumulation dtype, held in float64: the
    reference then sees exactly the values the kernel uses."""
    acc = acc_dtype(dtype)
    return {n: (t.to(acc).to(F64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}


def random_cotangents(q, layout, with_lse):
    """dout (rounded to q's dtype, so that headops sees it exactly) and, optionally, dlse."""
    dout = torch.randn(q.shape, dtype=F64).to(q.dtype).to(F64)
    Sq, Hq = seq_heads(q, layout)
    dlse = torch.randn(q.shape[0], Hq, Sq, dtype=F64) if with_lse else None
    return dout, dlse


def kernel_and_reference_grads(q, k, v, kw, *, with_lse=False, dout=None, dlse=None, **opts):
    """Gradients through headops.attention (q, k, v in their dtype; per-head tensors float64,
    rounded to the accumulation dtype) and through the float64 reference on the same values."""
    kw = round_params(kw, q.dtype)
    if dout is None:
        dout, dlse = random_cotangents(q, kw.get("layout", "bshd"), with_lse)
    got = grads(headops.attention, q, k, v, kw, dout, dlse, **opts)
    want = grads(reference.attention, *(t.to(F64) for t in (q, k, v)), kw, dout, dlse, **opts)
    return got, want


# Gradient tolerances, as a fraction of max|reference gradient| (per gradient tensor). Measured
# over ~180 random configurations per dtype (shapes of GRAD_SHAPES and others, all features
# with and without alpha, per-batch strided inputs, causal and not) and every test of this
# file, the largest error / max|ref| seen was:
#   float64:  5e-14 (sink_logit), 4e-15 (q, k, v)              -> 1e-10 (the same math in double)
#   float32:  1.5e-5 (sink_logit, a sum of terms that cancel), 7.7e-6 (softmax_scale),
#             1.6e-6 (q, k, v)                                 -> 5e-5
#   float16:  4.7e-4 (q, k, v: rounded to float16, 2**-11)     -> 1.5e-3
#             1.4e-5 (per-head: computed and returned in float32/float64; the forward keeps P in
#             float32 for float16)                             -> 5e-5
#   bfloat16: 1.1e-2 (q, k, key_bias), 4.4e-3 (out_scale), 2.9e-3 (gate), 1e-6 (out_bias) -> 3e-2.
#             The backward computes in float32, but dq/dk/dv are rounded to bfloat16 (2**-9)
#             and the saved forward averages carry the forward's bfloat16 rounding of the
#             probabilities (packed P.V path, even head dims), which enters delta = do . o.
#             alpha, sink_logit and softmax_scale are each one sum over all rows of a head in
#             which large terms cancel (do . (o_full - o_stream), P_sink * delta, dS * logits):
#             bfloat16 P in the forward's P V and dL/do in the backward's dP took them up to 2x
#             a tolerance of 1e-1 (S = 333, D = 128). A call that learns one of them reads P in
#             two bfloat16 parts (attention.py, _learns_cancelling_sums), and dL/do too where it
#             learns softmax_scale: over 160 draws of that case alpha and sink_logit stayed under
#             3e-4 and key_bias (per key, over rows) under 5e-5 -> 1e-3. softmax_scale's error is ~1e-3 of its terms' size, so a head whose
#             sum nearly cancels to 0 sees more of its own size (1.5e-2 once in 160 draws with
#             one head of two gated off) -> 3e-2; with three heads learning, 1.5e-4
#             (test_bfloat16_learnt_cancelling_sums_stay_precise).
GRAD_TOL = {F64: 1e-10, torch.float32: 5e-5, torch.float16: 1.5e-3, torch.bfloat16: 3e-2}
GRAD_TOL_OVERRIDES = {
    (torch.float16, name): 5e-5 for name in PARAMS
} | {(torch.bfloat16, name): 1e-3 for name in ("alpha", "sink_logit", "key_bias")}
# a reference gradient that is exactly 0 everywhere must come out (almost) 0
GRAD_FLOOR = {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def grad_tol(dtype, name):
    return GRAD_TOL_OVERRIDES.get((dtype, name), GRAD_TOL[dtype])


def grad_errors(got, want):
    """{name: (max abs error, max |reference|)}."""
    assert got.keys() == want.keys(), f"{sorted(got)} != {sorted(want)}"
    errs = {}
    for n, w in want.items():
        g = got[n].to(F64)
        assert g.shape == w.shape, f"d{n}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert_no_new_nonfinite(g, w)
        errs[n] = ((g - w).abs().max().item(), w.abs().max().item()) if w.numel() else (0.0, 0.0)
    return errs


def assert_grads_close(got, want, dtype, tol=None):
    """Every gradient within tol (default: grad_tol; a dict: per name, grad_tol for the rest)
    times its reference's max magnitude."""
    errs = grad_errors(got, want)
    print("error / max|ref|: " + " ".join(f"{n}={e / m if m else e:.1e}" for n, (e, m) in errs.items()))
    for n, (err, scale) in errs.items():
        t = tol.get(n, grad_tol(dtype, n)) if isinstance(tol, dict) else grad_tol(dtype, n) if tol is None else tol
        assert err <= t * scale + GRAD_FLOOR[dtype], \
            f"d{n}: max error {err:.3e} > {t:g} * max|ref| ({scale:.3e}) [{dtype}]"


def check_grads(q, k, v, dtype=None, tol=None, **kw):
    got, want = kernel_and_reference_grads(q, k, v, kw)
    assert_grads_close(got, want, q.dtype if dtype is None else dtype, tol)
    return got, want


# ---------------------------------------------------------------------------------------------
# 1. gradcheck in float64


def gradcheck_attention(q, k, v, kw, wrt, *, fast_mode=False, return_lse=False):
    """gradcheck of headops.attention in the tensors named by `wrt` (among q, k, v and the keys of
    kw); everything else (windows, sinks, flags) is held fixed in a closure."""
    base = dict(q=q, k=k, v=v, **kw)
    names = list(wrt)
    inputs = tuple(base[n].detach().clone().requires_grad_(True) for n in names)
    assert all(t.dtype == F64 for t in inputs)

    def fn(*tensors):
        args = dict(base, **dict(zip(names, tensors)))
        return headops.attention(args.pop("q"), args.pop("k"), args.pop("v"), return_lse=return_lse, **args)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast_mode)


def open_alpha(B, Hq, per_batch=False):
    """alpha strictly inside (0, 1): gradcheck's +-1e-6 steps must stay in [0, 1]."""
    return torch.empty((B, Hq) if per_batch else (Hq,), dtype=F64).uniform_(0.1, 0.9)


def gc_params(B, Hq, Sk, D, features, per_batch=False):
    kw = head_params(B, Hq, Sk, D, [f for f in features if f != "alpha"], per_batch=per_batch)
    if "alpha" in features:
        kw["alpha"] = open_alpha(B, Hq, per_batch)
    return kw


# tiny shapes: the full Jacobian (slow mode) of q, k and v together stays under ~0.5 s
GC_QKV_SHAPES = [
    (2, 5, 5, 4, 2, 4),  # GQA
    (1, 4, 7, 4, 1, 3),  # MQA, Sq < Sk
    (1, 7, 4, 2, 2, 4),  # Sq > Sk: causal rows without keys
    (2, 1, 6, 2, 1, 4),  # Sq = 1
]


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", GC_QKV_SHAPES, ids=shape_id)
def test_gradcheck_qkv(shape, causal, layout):
    q, k, v = make_qkv(*shape, F64, layout)
    gradcheck_attention(q, k, v, dict(causal=causal, layout=layout), ["q", "k", "v"])


# each floating per-head argument alone (q, k, v held fixed), in its broadcast shapes
B_GC, SQ_GC, SK_GC, HQ_GC, HKV_GC, D_GC = 2, 6, 9, 4, 2, 4
_rn = lambda *shape: torch.randn(shape, dtype=F64)  # noqa: E731
PARAM_ALONE = {
    "gate": lambda: dict(gate=torch.tensor([0.5, 0.0, -1.25, 2.0], dtype=F64)),
    "gate_per_batch": lambda: dict(gate=_rn(B_GC, HQ_GC)),
    "gate_scalar_tensor": lambda: dict(gate=torch.tensor(0.7, dtype=F64)),
    "softmax_scale": lambda: dict(softmax_scale=torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=F64)),
    "softmax_scale_per_batch": lambda: dict(softmax_scale=torch.rand(B_GC, HQ_GC, dtype=F64) + 0.1),
    "alpha": lambda: dict(alpha=open_alpha(B_GC, HQ_GC)),
    "alpha_per_batch": lambda: dict(alpha=open_alpha(B_GC, HQ_GC, per_batch=True)),
    "key_bias_Sk": lambda: dict(key_bias=_rn(SK_GC)),
    "key_bias_Hq1": lambda: dict(key_bias=_rn(HQ_GC, 1)),
    "key_bias_BHqSk": lambda: dict(key_bias=_rn(B_GC, HQ_GC, SK_GC)),
    "key_bias_B1Sk": lambda: dict(key_bias=_rn(B_GC, 1, SK_GC)),
    "sink_logit": lambda: dict(sink_logit=_rn(HQ_GC)),
    "sink_logit_per_batch": lambda: dict(sink_logit=_rn(B_GC, HQ_GC)),
    "out_scale": lambda: dict(out_scale=_rn(HQ_GC, D_GC)),
    "out_scale_per_batch": lambda: dict(out_scale=_rn(B_GC, HQ_GC, D_GC)),
    "out_bias": lambda: dict(out_bias=_rn(HQ_GC, D_GC)),
    "out_bias_per_batch": lambda: dict(out_bias=_rn(B_GC, HQ_GC, D_GC)),
}
# context: plain causal; causal with windows and sinks (alpha mixes two different branches);
# non-causal windows (|pos_i - j| < w) and sinks
CONTEXTS = {
    "causal": lambda: dict(causal=True),
    "causal_window_sinks": lambda: dict(causal=True, window=torch.tensor([1, 3, -1, 2]),
                                        sinks=torch.tensor([1, 0, 2, 3])),
    "noncausal_window_sinks": lambda: dict(causal=False, window=torch.tensor([2, -1, 4, 1]),
                                           sinks=torch.tensor([0, 2, 1, 1])),
}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("param", list(PARAM_ALONE))
def test_gradcheck_each_parameter_alone(param, context):
    q, k, v = make_qkv(B_GC, SQ_GC, SK_GC, HQ_GC, HKV_GC, D_GC, F64)
    kw = dict(CONTEXTS[context](), **PARAM_ALONE[param]())
    name = next(n for n in kw if n in PARAMS)
    gradcheck_attention(q, k, v, kw, [name])


# everything together: q, k, v and every floating per-head tensor, with windows and sinks
ALL_TOGETHER = {
    # name: (shape, features, per_batch, causal, layout)
    "gqa_causal_bshd": ((2, 6, 9, 4, 2, 4), ALL, False, True, "bshd"),
    "gqa_noncausal_bhsd": ((2, 6, 9, 4, 2, 4), ALL, False, False, "bhsd"),
    "alpha_causal_bhsd": ((2, 8, 8, 4, 2, 4), ALL + ["alpha"], False, True, "bhsd"),
    "alpha_noncausal_bshd": ((1, 7, 10, 4, 4, 5), ALL + ["alpha"], False, False, "bshd"),
    "per_batch_alpha": ((2, 6, 9, 4, 2, 4), ALL + ["alpha"], True, True, "bshd"),
    "per_batch_noncausal": ((2, 9, 6, 4, 2, 4), ALL, True, False, "bhsd"),
    "mqa_sq_gt_sk": ((1, 9, 5, 4, 1, 4), ALL + ["alpha"], False, True, "bshd"),
    "mqa_sq_lt_sk": ((2, 3, 11, 4, 1, 6), ALL, False, True, "bhsd"),
    "sq1": ((2, 1, 7, 4, 2, 4), ALL + ["alpha"], False, True, "bshd"),
    "sq1_noncausal": ((2, 1, 7, 4, 1, 4), ALL, True, False, "bhsd"),
    "windows_sinks_alpha": ((2, 10, 10, 4, 2, 4), ["window", "sinks", "alpha"], False, True, "bshd"),
}


def _all_together(case):
    shape, features, per_batch, causal, layout = ALL_TOGETHER[case]
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = make_qkv(*shape, F64, layout)
    kw = gc_params(B, Hq, Sk, D, features, per_batch=per_batch)
    return (q, k, v), dict(kw, causal=causal, layout=layout)


@pytest.mark.parametrize("case", list(ALL_TOGETHER))
def test_gradcheck_everything_together(case):
    # fast mode (a random projection of the Jacobian) keeps these shapes cheap; the full
    # Jacobian is checked on a tiny shape below and every entry against the reference in 2.
    (q, k, v), kw = _all_together(case)
    wrt = ["q", "k", "v"] + [n for n in PARAMS if n in kw]
    gradcheck_attention(q, k, v, kw, wrt, fast_mode=True)


@pytest.mark.parametrize("alpha", [False, True], ids=["no_alpha", "alpha"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_everything_together_full_jacobian(causal, alpha):
    B, Sq, Sk, Hq, Hkv, D = 1, 4, 5, 2, 1, 3
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64)
    kw = dict(gc_params(B, Hq, Sk, D, ALL + (["alpha"] if alpha else [])), causal=causal)
    kw["window"], kw["sinks"] = torch.tensor([2, -1]), torch.tensor([1, 0])
    gradcheck_attention(q, k, v, kw, ["q", "k", "v"] + [n for n in PARAMS if n in kw])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_through_lse(causal):
    # out and lse both differentiated; no row without a visible key (lse = -inf: its finite
    # differences are NaN)
    B, Sq, Sk, Hq, Hkv, D = 2, 5, 8, 4, 2, 4
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64)
    kw = gc_params(B, Hq, Sk, D, ["scale", "window", "sinks", "key_bias", "sink_logit", "out_scale", "out_bias"])
    kw["gate"] = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=F64)
    kw["causal"] = causal
    gradcheck_attention(q, k, v, kw, ["q", "k", "v"] + [n for n in PARAMS if n in kw], fast_mode=True,
                        return_lse=True)
    # the full Jacobian on a tiny slice
    small = dict(causal=causal, sink_logit=kw["sink_logit"][:2], key_bias=kw["key_bias"][:2, :4],
                 softmax_scale=kw["softmax_scale"][:2], gate=kw["gate"][:2])
    gradcheck_attention(q[:1, :3, :2], k[:1, :4, :1], v[:1, :4, :1], small,
                        ["q", "k", "v", "sink_logit", "key_bias", "softmax_scale", "gate"], return_lse=True)


# ---------------------------------------------------------------------------------------------
# 2. every gradient against the reference's autograd

# B, Sq, Sk, Hq, Hkv, D; the backward tiles are headops._C.cpu_backward_tile_shape(dtype, D)
GRAD_SHAPES = [
    (2, 7, 7, 4, 4, 64),
    (1, 300, 700, 4, 2, 24),  # several query tiles and key blocks, both ending part-way
    (1, 513, 513, 2, 1, 7),  # one query / one key past the tiles; odd head dim; MQA
    (2, 127, 33, 4, 2, 5),  # Sq > Sk: causal rows with no visible key; odd head dim
    (1, 1, 300, 4, 1, 32),  # a decode step
    (2, 130, 600, 4, 2, 64),
]
FEATURE_SETS = {
    # name: (features, per_batch and strided inputs)
    "plain": ([], False),
    "all": (ALL, False),
    "all+alpha": (ALL + ["alpha"], False),  # alpha includes exact 0 and 1 (head_params)
    "all+alpha_per_batch_strided": (ALL + ["alpha"], True),
}


def test_grad_shapes_cross_the_backward_tiles():
    for D, dtype in itertools.product((24, 7, 5), (torch.float64, torch.float32, torch.bfloat16)):
        block_q, block_k = headops._C.cpu_backward_tile_shape(dtype, D)
        assert 300 % block_q and 300 > block_q and 700 % block_k and 700 > 2 * block_k
        assert 513 % block_q == 1 and 513 % block_k == 1


def _sweep_case(shape, features, dtype, causal, layout):
    B, Sq, Sk, Hq, Hkv, D = shape
    feats, per_batch = FEATURE_SETS[features]
    q, k, v = make_qkv(*shape, dtype, layout, strided=per_batch)
    if per_batch:
        assert not q.is_contiguous() and not k.is_contiguous()
    kw = head_params(B, Hq, Sk, D, feats, per_batch=per_batch)
    return (q, k, v), dict(kw, causal=causal, layout=layout)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("features", list(FEATURE_SETS))
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_grads_float64(shape, features, causal, layout):
    (q, k, v), kw = _sweep_case(shape, features, F64, causal, layout)
    check_grads(q, k, v, **kw)


@pytest.mark.parametrize("features", ["all", "all+alpha_per_batch_strided"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_grads_low_precision(dtype, shape, features):
    # causal and layout alternate with the shape so that each dtype sees all four pairs
    i = GRAD_SHAPES.index(shape)
    causal, layout = i % 2 == 0, ("bshd", "bhsd")[(i // 2) % 2]
    (q, k, v), kw = _sweep_case(shape, features, dtype, causal, layout)
    check_grads(q, k, v, **kw)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_grads_low_precision_plain(dtype):
    q, k, v = make_qkv(2, 300, 700, 4, 2, 64, dtype)
    check_grads(q, k, v)


@pytest.mark.parametrize("features", ["plain", "all+alpha"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_grads_low_precision_on_the_diagonal(dtype, features):
    # Sq = Sk and a head dim the packed paths take: blocks the causal diagonal crosses, whose dV
    # and dK products run per chunk of keys from the first row that sees them (KeyChunk)
    (q, k, v), kw = _sweep_case((1, 333, 333, 2, 2, 128), features, dtype, True, "bshd")
    check_grads(q, k, v, **kw)


@pytest.mark.parametrize("name", ["softmax_scale", "sink_logit", "alpha"])
def test_bfloat16_call_learning_a_cancelling_sum_keeps_precise_probabilities(name):
    # the rule of _learns_cancelling_sums: such a call's P V reads P to ~2**-17 (two bfloat16
    # parts), so its output is the float32 call's rounded to bfloat16, but for an element whose
    # float32 value sits within that error of a rounding boundary (~0.2 % of them)
    q, k, v = make_qkv(1, 160, 160, 2, 2, 64, torch.bfloat16)
    value = {"softmax_scale": torch.tensor([0.1, 0.2]), "sink_logit": torch.tensor([0.5, -1.0]),
             "alpha": torch.tensor([0.3, 0.7])}[name]
    kw = dict(window=48, sinks=2) if name == "alpha" else {}
    learnt = headops.attention(q, k, v, **{name: value.clone().requires_grad_()}, **kw)
    in_float = headops.attention(q.float(), k.float(), v.float(), **{name: value}, **kw).to(torch.bfloat16)
    assert learnt.dtype == torch.bfloat16
    assert (learnt != in_float).float().mean() < 0.01
    # a call that learns only q, k or v keeps the bfloat16 path: P rounded for its P V product
    # (35-42 % of the elements then differ from the float32 call's)
    plain = headops.attention(q.clone().requires_grad_(), k, v, **{name: value}, **kw)
    if headops._C.cpu_uses_packed_operands(torch.bfloat16, 64):
        assert (plain != in_float).float().mean() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(headops.attention(q, k, v, **{name: value}, **kw), plain, atol=0, rtol=0)
        # the raw op's switch alone gives the learning call's output
        args = dict(q=q, k=k, v=v, causal=True, heads_first=False, default_scale=64 ** -0.5, softmax_scale=None,
                    window=None, sinks=None, alpha=None, key_bias=None, sink_logit=None, out_scale=None,
                    out_bias=None, gate=None, skip_zero_gate=True, skip_unused_branch=True, save_for_backward=False)
        for n, x in dict(kw, **{name: value}).items():
            args[n] = torch.as_tensor(x).expand(1, 2).contiguous()
        if name == "softmax_scale":
            args[n] = args[n].float()
        if name == "alpha":
            args["skip_unused_branch"] = False
        raw = torch.ops.headops.attention_fwd(**args, precise_probabilities=True)[0]
        torch.testing.assert_close(raw, learnt, atol=0, rtol=0)


SPLIT_HALF_GRAD_CASES = [
    # shape, features (none whose gradient sums cancelling terms), causal
    ((1, 333, 333, 2, 2, 128), [], True),
    ((2, 300, 700, 4, 2, 64), ["gate", "out_scale", "out_bias", "window", "sinks"], True),
    ((1, 130, 600, 4, 1, 64), ["window", "sinks"], False),
]


@pytest.mark.parametrize("case", SPLIT_HALF_GRAD_CASES, ids=lambda c: shape_id(c[0]))
def test_float16_backward_in_two_bfloat16_parts_is_float_accurate(case):
    # On AMX without AMX-FP16 a float16 backward that learns none of softmax_scale, sink_logit,
    # alpha and key_bias runs its five products as two bfloat16 parts each (backward_products.h,
    # SplitHalfTileProducts): dq, dk and dv stay within half a float16 ulp plus 3e-5 of their
    # largest value of the reference's (measured: 6.1e-6, against 4e-7 through float32 tiles)
    (B, Sq, Sk, Hq, Hkv, D), features, causal = case
    if not headops._C.cpu_call_splits_half_into_bf16_tiles(D, Sq * Hq // Hkv):
        pytest.skip("float16 runs as two bfloat16 parts only on AMX without AMX-FP16")
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.float16)
    kw = dict(head_params(B, Hq, Sk, D, features), causal=causal)
    got, want = kernel_and_reference_grads(q, k, v, kw)
    for name in ("q", "k", "v"):
        assert got[name].dtype == torch.float16
        assert half_ulp_excess(got[name], want[name]) < 3e-5, name


@pytest.mark.parametrize("feature,name", [("scale", "softmax_scale"), ("key_bias", "key_bias")])
def test_float16_call_learning_softmax_scale_or_key_bias_runs_as_float32(feature, name):
    # their gradients sum dS over rows, terms that cancel: the two-part products put 1.7e-5 to
    # 9.2e-5 (softmax_scale) and 5e-6 to 2.8e-5 (key_bias) of their size into them where float32
    # tiles leave at most 3.1e-6 and 1.8e-6 (8 draws, S = 333, D = 128, all features), so such a
    # call runs its backward as float32 (backward_splits_half)
    bound = {"softmax_scale": 1e-5, "key_bias": 5e-6}[name]
    worst = 0.0
    for _ in range(3):
        q, k, v = make_qkv(1, 333, 333, 4, 2, 128, torch.float16)
        kw = dict(head_params(1, 4, 333, 128, [feature, "gate", "out_scale"]), causal=True)
        got, want = kernel_and_reference_grads(q, k, v, kw)
        worst = max(worst, ((got[name].double() - want[name]).abs().max() / want[name].abs().max()).item())
    assert worst < bound


def test_float16_backward_with_an_inf_input_runs_as_float32():
    # q, k or v holding inf leave the split (attention_bwd.cpp): its inf times a part of 0 would
    # make NaN where the float path's one product keeps a finite gradient (a query row whose
    # every key an inf element masks out has dq = 0)
    q, k, v = make_qkv(1, 100, 150, 2, 1, 64, torch.float16)
    k[..., 3] = k[..., 3].abs() + 0.01
    q[0, 40, 0, 3] = -math.inf
    dout = torch.randn(q.shape).to(torch.float16)
    grads = []
    for dtype in (torch.float16, torch.float32):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        headops.attention(*leaves, causal=True).backward(dout.to(dtype))
        grads.append([t.grad for t in leaves])
    for half, single in zip(*grads):
        assert torch.equal(half.isnan(), single.isnan())
        finite = ~single.isnan()
        torch.testing.assert_close(half[finite].float(), single[finite].to(torch.float16).float(), atol=2e-3, rtol=2e-3)
    assert not grads[0][0][0, 40].isnan().any()  # that row's dq: 0, not NaN


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_precise_probabilities_changes_nothing_in_float(dtype):
    q, k, v = make_qkv(1, 130, 130, 2, 2, 64, dtype)
    args = dict(q=q, k=k, v=v, causal=True, heads_first=False, default_scale=0.125, softmax_scale=None, window=None,
                sinks=None, alpha=None, key_bias=None, sink_logit=None, out_scale=None, out_bias=None, gate=None,
                skip_zero_gate=True, skip_unused_branch=True, save_for_backward=True)
    rounded, precise = (torch.ops.headops.attention_fwd(**args, precise_probabilities=p) for p in (False, True))
    for a, b in zip(rounded, precise):
        assert torch.equal(a, b)


def test_bfloat16_learnt_cancelling_sums_stay_precise():
    # three heads learning softmax_scale, sink_logit and alpha (or key_bias), with gate and
    # out_scale (which make dL/do inexact in bfloat16), on blocks the diagonal and the windows
    # cross. Over 160 draws the largest error / max|ref| was 1.5e-4 (softmax_scale), 2.0e-5
    # (sink_logit), 9.6e-6 (alpha); 3.7e-5 (key_bias, 80 draws). With P rounded in the forward
    # they reached 1.9e-2, 6.6e-3, 1.3e-2 and 2.7e-3; with dL/do rounded in dP, d(softmax_scale)
    # took 2e-4 to 2.6e-3 per draw (18 of 20 over 4e-4): three draws of each
    B, S, Hq, Hkv, D = 1, 333, 4, 2, 128
    for learnt in (["scale", "sink_logit", "alpha"], ["key_bias", "alpha"]) * 3:
        q, k, v = make_qkv(B, S, S, Hq, Hkv, D, torch.bfloat16)
        kw = head_params(B, Hq, S, D, ["window", "sinks", "out_scale", "gate"] + learnt)
        got, want = kernel_and_reference_grads(q, k, v, dict(kw, causal=True))
        assert_grads_close(got, want, torch.bfloat16,
                           tol={"softmax_scale": 4e-4, "sink_logit": 1e-4, "alpha": 1e-4, "key_bias": 2e-4})


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_grads_with_large_logits(dtype):
    # nearly one-hot softmaxes: the probabilities recomputed from the saved lse must stay exact
    q, k, v = make_qkv(1, 200, 300, 2, 2, 64, dtype)
    q = (q.to(F64) * 30).to(dtype)
    check_grads(q, k, v, window=torch.tensor([7, -1]), sinks=torch.tensor([2, 0]))


@pytest.mark.parametrize("which", ["q", "k", "v", *PARAMS])
def test_one_input_at_a_time(which):
    # only one input requires grad: the backward computes only what is needed, and that must
    # equal the same gradient computed together with all the others
    B, Sq, Sk, Hq, Hkv, D = 2, 40, 70, 4, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64)
    kw = dict(head_params(B, Hq, Sk, D, ALL + ["alpha"]), causal=False)
    dout, _ = random_cotangents(q, "bshd", False)
    together = grads(headops.attention, q, k, v, kw, dout)
    qkv = which in ("q", "k", "v")
    alone = grads(headops.attention, q, k, v, kw, dout, qkv_grad=(which,), params=() if qkv else (which,))
    assert list(alone) == [which]
    want = grads(reference.attention, q, k, v, kw, dout)[which]
    torch.testing.assert_close(alone[which], together[which], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(alone[which], want, atol=1e-12, rtol=1e-10)


def test_per_head_parameters_of_other_dtypes_and_strides():
    # float32 per-head tensors (with float64 q) and non-contiguous views of leaves: their
    # gradients come back in their own dtype, through the views
    B, Sq, Sk, H, D = 2, 30, 50, 4, 8
    q, k, v = make_qkv(B, Sq, Sk, H, 2, D, F64)
    f32 = torch.float32
    bases = dict(gate=torch.rand(H, 3, dtype=f32), softmax_scale=torch.rand(B, 2 * H, dtype=F64) + 0.05,
                 sink_logit=torch.randn(H, B, dtype=f32), out_scale=torch.randn(D, H, dtype=F64),
                 out_bias=torch.randn(B, D, H, dtype=F64), key_bias=torch.randn(Sk, B, H, dtype=f32),
                 alpha=torch.rand(2 * H, dtype=F64))
    views = dict(gate=lambda t: t[:, 1], softmax_scale=lambda t: t[:, ::2], sink_logit=lambda t: t.t(),
                 out_scale=lambda t: t.t(), out_bias=lambda t: t.transpose(1, 2), key_bias=lambda t: t.permute(1, 2, 0),
                 alpha=lambda t: t[1::2])
    dout, _ = random_cotangents(q, "bshd", False)

    def run(attn):
        params = {n: b.clone().requires_grad_() for n, b in bases.items()}
        kw = {n: views[n](t) for n, t in params.items()}
        assert not any(t.is_contiguous() for t in kw.values())
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn(*qkv, window=torch.tensor([3, -1, 9, 1]), sinks=torch.tensor([0, 2, 1, 0]), **kw)
        g = torch.autograd.grad((out * dout).sum(), qkv + list(params.values()))
        return dict(zip(["q", "k", "v", *params], g))

    got, want = run(headops.attention), run(reference.attention)
    for name, base in bases.items():
        assert got[name].dtype == base.dtype and got[name].shape == base.shape, name
        assert (got[name] != 0).any(), name
    # float32 gradients are rounded to float32 on both sides
    assert_grads_close(got, want, F64, tol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. special cases


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_alpha_exactly_0_and_1_with_grad(causal, dtype):
    # alpha at 0 or 1 needs one branch for the output, but its gradient needs both:
    # dL/dalpha = sum do . (o_full - o_stream)
    B, Sq, Sk, Hq, Hkv, D = 2, 150, 300, 4, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = dict(alpha=torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=F64), window=torch.tensor([8, 1, 40, 130]),
              sinks=torch.tensor([2, 0, 5, 1]), causal=causal)
    got, want = check_grads(q, k, v, **kw)
    assert (want["alpha"].abs() > 1e-3).all()  # both branches differ: the test has teeth
    # alpha per batch row, exact 0/1 mixed with interior values
    check_grads(q, k, v, **dict(kw, alpha=torch.tensor([[0.0, 1.0, 0.5, 1.0], [1.0, 0.25, 0.0, 0.0]], dtype=F64)))


def test_alpha_exactly_0_and_1_without_grad():
    # alpha not differentiated: the unused branch is skipped, q, k, v gradients stay right
    B, Sq, Sk, Hq, Hkv, D = 2, 150, 300, 4, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64)
    kw = dict(alpha=torch.tensor([0.0, 1.0, 0.3, 0.0], dtype=F64), window=torch.tensor([8, 1, 40, 130]),
              sinks=torch.tensor([2, 0, 5, 1]), key_bias=torch.randn(Sk, dtype=F64))
    got, want = kernel_and_reference_grads(q, k, v, kw, params=("key_bias",))
    assert_grads_close(got, want, F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_gate_exactly_0_with_grad(dtype):
    # a masked head's importance: dL/dgate at gate = 0 is the gradient the reference gives,
    # and it is not 0 (the head is computed although its output is 0)
    B, Sq, Sk, Hq, Hkv, D = 2, 130, 300, 4, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    gate = torch.tensor([1.0, 0.0, -0.5, 0.0], dtype=F64)
    extra = dict(window=torch.tensor([5, 64, -1, 1]), sinks=torch.tensor([1, 2, 0, 0]),
                 out_scale=torch.randn(Hq, D, dtype=F64), out_bias=torch.randn(Hq, D, dtype=F64),
                 sink_logit=torch.randn(Hq, dtype=F64))
    for kw in (dict(gate=gate), dict(gate=gate, **extra), dict(gate=gate, alpha=torch.tensor([0.5, 0.3, 0.0, 1.0]),
                                                               **extra)):
        got, want = check_grads(q, k, v, **kw)
        assert (got["gate"][[1, 3]].abs() > 1e-2).all()
        # the q rows of a gated-off head get nothing from out (o is scaled by the gate 0)
        assert torch.equal(got["q"][:, :, [1, 3]], torch.zeros_like(got["q"][:, :, [1, 3]]))
    # per batch row
    gate_pb = torch.tensor([[0.0, 1.0, 2.0, 0.0], [1.0, 0.0, 0.0, -1.0]], dtype=F64)
    got, _ = check_grads(q, k, v, gate=gate_pb, **extra)
    assert (got["gate"][gate_pb == 0].abs() > 1e-2).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_gate_exactly_0_without_grad(dtype):
    # the head is skipped: it contributes nothing, every other gradient still matches
    B, Sq, Sk, Hq, Hkv, D = 2, 130, 300, 4, 4, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = dict(gate=torch.tensor([0.5, 0.0, -1.0, 2.0], dtype=F64), window=torch.tensor([5, 64, -1, 1]),
              out_scale=torch.randn(Hq, D, dtype=F64), out_bias=torch.randn(Hq, D, dtype=F64),
              key_bias=torch.randn(Hq, Sk, dtype=F64), softmax_scale=torch.rand(Hq, dtype=F64) + 0.1)
    params = ("out_scale", "out_bias", "key_bias", "softmax_scale")
    got, want = kernel_and_reference_grads(q, k, v, kw, params=params)
    assert_grads_close(got, want, dtype)
    for name, grad in (("q", got["q"][:, :, 1]), ("k", got["k"][:, :, 1]), ("v", got["v"][:, :, 1]),
                       ("out_scale", got["out_scale"][1]), ("out_bias", got["out_bias"][1]),
                       ("key_bias", got["key_bias"][1]), ("softmax_scale", got["softmax_scale"][1])):
        assert torch.equal(grad, torch.zeros_like(grad)), name
    assert (got["q"][:, :, 0].abs().amax() > 0) and (got["out_bias"][0].abs().amax() > 0)
    # a per-batch zero: only that (b, h) is skipped
    gate = torch.tensor([[0.0, 1.0, 1.0, 2.0], [1.0, 1.0, 0.0, 1.0]], dtype=F64)
    got, want = kernel_and_reference_grads(q, k, v, dict(kw, gate=gate), params=params)
    assert_grads_close(got, want, dtype)
    assert torch.equal(got["q"][0, :, 0], torch.zeros_like(got["q"][0, :, 0]))
    assert got["q"][1, :, 0].abs().amax() > 0


def test_all_gates_zero_without_grad():
    q, k, v = make_qkv(2, 20, 30, 4, 2, 8, F64)
    bias = torch.randn(4, 8, dtype=F64)
    got, want = kernel_and_reference_grads(q, k, v, dict(gate=0.0, out_bias=bias), params=("out_bias",))
    assert_grads_close(got, want, F64)
    for n in ("q", "k", "v", "out_bias"):
        assert torch.equal(got[n], torch.zeros_like(got[n])), n


def _no_key_case(name):
    """(Sq, Sk, kwargs, rows of head 0 with no visible key), Hq = 2."""
    if name == "causal_sq_gt_sk":  # positions -3..1: rows 0-2 see nothing
        return 5, 2, dict(causal=True), slice(0, 3)
    if name == "noncausal_window_far":  # positions -15..4, window 3: rows 0-12 see nothing
        return 20, 5, dict(causal=False, window=3), slice(0, 13)
    if name == "key_bias_all_minus_inf":  # every key of head 0 pushed out
        bias = torch.randn(2, 9, dtype=F64)
        bias[0] = -math.inf
        return 6, 9, dict(causal=False, key_bias=bias), slice(0, 6)
    if name == "key_bias_minus_inf_on_a_row_s_keys":  # causal: row 0 sees key 0 only, pushed out
        bias = torch.randn(8, dtype=F64)
        bias[0] = -math.inf
        bias[5] = -math.inf
        return 8, 8, dict(causal=True, key_bias=bias), slice(0, 1)
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_sink", [False, True], ids=["plain", "sink_logit"])
@pytest.mark.parametrize("case", ["causal_sq_gt_sk", "noncausal_window_far", "key_bias_all_minus_inf",
                                  "key_bias_minus_inf_on_a_row_s_keys"])
def test_rows_without_visible_key(case, with_sink, dtype):
    Sq, Sk, kw, rows = _no_key_case(case)
    q, k, v = make_qkv(2, Sq, Sk, 2, 1, 16, dtype)
    kw.update(gate=torch.tensor([0.5, -2.0], dtype=F64), out_bias=torch.randn(2, 16, dtype=F64),
              out_scale=torch.randn(2, 16, dtype=F64), softmax_scale=torch.tensor([0.3, 0.2], dtype=F64))
    if with_sink:
        kw["sink_logit"] = torch.tensor([0.25, -1.5], dtype=F64)
    got, want = kernel_and_reference_grads(q, k, v, kw)
    for n, w in want.items():  # the premise: the reference itself is finite here
        assert torch.isfinite(w).all(), n
    for n, g in got.items():
        assert torch.isfinite(g).all(), n
    assert_grads_close(got, want, dtype)
    # those rows have o = 0: no gradient reaches their queries
    dq_rows = got["q"][:, rows, 0]
    assert torch.equal(dq_rows, torch.zeros_like(dq_rows))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradient_through_lse(causal, dtype):
    # loss = sum(out * dout) + sum(lse * dlse): lse's gradient reaches q, k, key_bias,
    # softmax_scale and sink_logit. No row without a visible key (the reference's lse would
    # then have a NaN gradient: log(0)).
    B, Sq, Sk, Hq, Hkv, D = 2, 150, 300, 4, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL)  # the gate has an exact 0, requiring grad: computed
    kw["causal"] = causal
    got, want = kernel_and_reference_grads(q, k, v, kw, with_lse=True)
    assert_grads_close(got, want, dtype)
    # lse alone: its gradient is not 0 through q and the gated-off head (lse does not see the gate)
    dout = torch.zeros(q.shape, dtype=F64)
    dlse = torch.randn(B, Hq, Sq, dtype=F64)
    got, want = kernel_and_reference_grads(q, k, v, kw, dout=dout, dlse=dlse)
    assert_grads_close(got, want, dtype)
    assert got["q"][:, :, Hq // 2].abs().amax() > 1e-3 and torch.equal(got["v"], torch.zeros_like(got["v"]))


def test_lse_of_a_skipped_head_takes_no_gradient():
    # contract clarification: a head skipped for its exact-0 gate (gate not requiring grad)
    # has lse = -inf, a constant: its dlse is dropped. The other heads match the reference.
    B, Sq, Sk, Hq, Hkv, D = 1, 40, 60, 4, 4, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64)
    kw = dict(gate=torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=F64), key_bias=torch.randn(Sk, dtype=F64))
    dout, dlse = random_cotangents(q, "bshd", True)
    got = grads(headops.attention, q, k, v, kw, dout, dlse, params=("key_bias",))
    dlse_kept = dlse.clone()
    dlse_kept[:, 1] = 0
    want = grads(reference.attention, q, k, v, kw, dout, dlse_kept, params=("key_bias",))
    assert_grads_close(got, want, F64)
    assert torch.equal(got["k"][:, :, 1], torch.zeros_like(got["k"][:, :, 1]))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_sink_logit_minus_inf(dtype):
    # a sink that never weighs: its gradient is 0 (not NaN) and the head behaves as without it
    B, Sq, Sk, Hq, Hkv, D = 2, 70, 300, 4, 4, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    sink = torch.tensor([-math.inf, 0.5, -math.inf, 2.0], dtype=F64)
    off = [0, 2]
    for extra in (dict(), dict(window=torch.tensor([3, 1, 50, -1]), alpha=torch.tensor([0.5, 0.2, 0.0, 1.0])),
                  dict(causal=False, window=torch.tensor([1, 4, 3, 2]), sinks=torch.tensor([2, 0, 0, 1]))):
        got, want = check_grads(q, k, v, sink_logit=sink, **extra)
        assert torch.equal(got["sink_logit"][off], torch.zeros(2, dtype=F64))
        assert (got["sink_logit"][[1, 3]] != 0).all()
        # heads 0 and 2 get the gradients they get without any sink
        dout, _ = random_cotangents(q, "bshd", False)
        with_sink = grads(headops.attention, q, k, v, dict(extra, sink_logit=sink), dout)
        no_sink = grads(headops.attention, q, k, v, extra, dout)
        for n in ("q", "k", "v"):
            torch.testing.assert_close(with_sink[n][:, :, off], no_sink[n][:, :, off], atol=GRAD_FLOOR[dtype],
                                       rtol=grad_tol(dtype, n), msg=lambda m: f"d{n}: {m}")


def test_empty_keys_backward():
    # Sk = 0: o = 0 everywhere; out = gate * out_bias (the reference cannot take Sk = 0)
    B, Sq, Hq, D = 2, 3, 4, 8
    q = torch.randn(B, Sq, Hq, D, dtype=F64, requires_grad=True)
    k = torch.empty(B, 0, 2, D, dtype=F64, requires_grad=True)
    v = torch.empty(B, 0, 2, D, dtype=F64, requires_grad=True)
    bias = torch.randn(Hq, D, dtype=F64, requires_grad=True)
    gate = torch.randn(Hq, dtype=F64, requires_grad=True)
    scale = torch.randn(Hq, D, dtype=F64, requires_grad=True)
    out = headops.attention(q, k, v, out_bias=bias, gate=gate, out_scale=scale)
    dout = torch.randn_like(out)
    dq, dk, dv, dbias, dgate, dscale = torch.autograd.grad((out * dout).sum(), (q, k, v, bias, gate, scale))
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape
    assert torch.equal(dscale, torch.zeros_like(scale))
    torch.testing.assert_close(dbias, gate[:, None] * dout.sum(dim=(0, 1)), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dgate, (bias * dout.sum(dim=(0, 1))).sum(-1), atol=1e-12, rtol=1e-12)


def test_empty_queries_backward():
    q = torch.randn(2, 0, 4, 8, requires_grad=True)
    k = torch.randn(2, 5, 2, 8, requires_grad=True)
    v = torch.randn(2, 5, 2, 8, requires_grad=True)
    gate = torch.rand(4, requires_grad=True)
    out = headops.attention(q, k, v, gate=gate)
    dq, dk, dv, dgate = torch.autograd.grad(out.sum(), (q, k, v, gate))
    assert dq.shape == q.shape
    for g in (dk, dv, dgate):
        assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------
# 4. the cost contract in the backward (work counters around .backward() only)


def backward_counts(q, k, v, kw, *, qkv_grad=True, params=(), with_lse=False):
    """Work counters of the backward pass alone, and the gradients."""
    q, k, v, kw = leaves(q, k, v, kw, qkv_grad=qkv_grad, params=params)
    res = headops.attention(q, k, v, return_lse=with_lse, **kw)
    out, lse = res if with_lse else (res, None)
    loss = (out.to(F64) * torch.linspace(-1, 1, out.numel(), dtype=F64).view(out.shape)).sum()
    if with_lse:
        loss = loss + (lse.to(F64) * torch.linspace(-1, 1, lse.numel(), dtype=F64).view(lse.shape)).sum()
    inputs = [t for t in (q, k, v) if t.requires_grad] + [kw[n] for n in params]
    with headops.count_work() as counts:
        g = torch.autograd.grad(loss, inputs)
    return counts, g


def computed(c):
    return dataclasses.replace(c, heads_skipped=0)


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_backward_skips_a_gated_off_head(dtype):
    B, S, H, D = 2, 300, 4, 32
    q, k, v = make_qkv(B, S, S, H, H, D, dtype)
    window = torch.tensor([16, -1, 64, 5])  # heads of different cost: the right one must go
    gate = torch.tensor([1.0, 0.0, 0.5, 2.0])
    keep = [0, 2, 3]
    with headops.count_work() as fwd:
        headops.attention(q.requires_grad_(), k, v, gate=gate, window=window)
    q = q.detach()
    assert fwd.heads_skipped == B  # the forward skipped it too
    c, _ = backward_counts(q, k, v, dict(gate=gate, window=window))
    c_keep, _ = backward_counts(q[:, :, keep], k[:, :, keep], v[:, :, keep], dict(gate=gate[keep], window=window[keep]))
    assert c.key_blocks > 0
    assert computed(c) == computed(c_keep)
    # heads of equal cost: the backward does exactly 3/4 of the work of the ungated one
    ones, _ = backward_counts(q, k, v, dict(gate=torch.ones(4)))
    gated, _ = backward_counts(q, k, v, dict(gate=gate))
    for field in ("work_items", "key_blocks", "score_elements", "value_blocks"):
        assert 4 * getattr(gated, field) == 3 * getattr(ones, field), field
    # also when only a per-head parameter (not q, k, v) wants a gradient
    c, _ = backward_counts(q, k, v, dict(gate=gate, window=window, key_bias=torch.randn(S, dtype=F64)),
                           qkv_grad=False, params=("key_bias",))
    c_keep, _ = backward_counts(q[:, :, keep], k[:, :, keep], v[:, :, keep],
                                dict(gate=gate[keep], window=window[keep], key_bias=torch.randn(S, dtype=F64)),
                                qkv_grad=False, params=("key_bias",))
    assert computed(c) == computed(c_keep) and c.key_blocks > 0


def test_backward_skips_a_per_batch_gated_off_head():
    B, S, H, D = 3, 130, 4, 32
    q, k, v = make_qkv(B, S, S, H, 2, D, torch.float32)
    gate = torch.ones(B, H)
    gate[0, 1] = gate[2, 3] = gate[2, 0] = 0.0
    c, _ = backward_counts(q, k, v, dict(gate=gate))
    ones, _ = backward_counts(q, k, v, dict(gate=torch.ones(B, H)))
    per_head = ones.key_blocks // (B * H)
    assert ones.key_blocks == per_head * B * H
    assert c.key_blocks == per_head * (B * H - 3)
    assert c.score_elements * B * H == ones.score_elements * (B * H - 3)


def _gate_zero_case(dtype):
    B, S, H, D = 2, 300, 4, 32
    q, k, v = make_qkv(B, S, S, H, H, D, dtype)
    return (q, k, v), torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=F64), torch.tensor([16, -1, 64, 5])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_gate_zero_with_grad_is_computed_and_read_cheaply(dtype):
    # a gate at 0 that requires grad: the forward computes the head (its dL/dgate needs o), and
    # dL/dgate comes from the rows alone (do . (o * out_scale + out_bias))
    (q, k, v), gate, window = _gate_zero_case(dtype)
    with headops.count_work() as fwd:
        headops.attention(q, k, v, gate=gate.clone().requires_grad_(), window=window)
    assert fwd.heads_skipped == 0
    # only the gates want a gradient: no key loop at all in the backward
    c, (dgate,) = backward_counts(q, k, v, dict(gate=gate, window=window), qkv_grad=False, params=("gate",))
    assert computed(c) == headops.WorkCounts()
    assert dgate[1].abs() > 1e-3
    g = gate.clone().requires_grad_()
    out = reference.attention(*(t.to(F64) for t in (q, k, v)), gate=g, window=window)
    (want,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=F64).view(out.shape)).sum(), g)
    torch.testing.assert_close(dgate, want, atol=1e-12, rtol=grad_tol(dtype, "gate"))
    # the same gradient when q, k, v want theirs too
    _, (*_, dgate_all) = backward_counts(q, k, v, dict(gate=gate, window=window), params=("gate",))
    torch.testing.assert_close(dgate_all, want, atol=1e-12, rtol=grad_tol(dtype, "gate"))
    # with lse in the loss, the head's key loop is needed (dlse reaches q and k): the gated head
    # costs what a gate-1 head costs
    c_lse, _ = backward_counts(q, k, v, dict(gate=gate, window=window), params=("gate",), with_lse=True)
    c_ones, _ = backward_counts(q, k, v, dict(gate=torch.ones(4, dtype=F64), window=window), params=("gate",),
                                with_lse=True)
    assert computed(c_lse) == computed(c_ones)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_gate_zero_with_grad_skips_the_backward_key_loop(dtype):
    # dL/do of a head at gate 0 is 0: when lse is not used, its key loop adds nothing to any
    # gradient and must be skipped. The backward costs what it costs without that head.
    (q, k, v), gate, window = _gate_zero_case(dtype)
    keep = [0, 2, 3]
    c, _ = backward_counts(q, k, v, dict(gate=gate, window=window), params=("gate",))
    c_keep, _ = backward_counts(q[:, :, keep], k[:, :, keep], v[:, :, keep], dict(gate=gate[keep], window=window[keep]),
                                params=("gate",))
    assert c_keep.key_blocks > 0
    assert computed(c) == computed(c_keep)


def causal_window_pairs(S, w):
    """Visible (query, key) pairs of a causal window-w head with Sq = Sk = S."""
    return sum(min(i + 1, w) for i in range(S))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streaming_backward_cost_is_linear_in_the_window(dtype):
    S, w, sinks, D = 4096, 128, 4, 64
    block_q, block_k = headops._C.cpu_backward_tile_shape(dtype, D)
    q, k, v = make_qkv(1, S, S, 1, 1, D, dtype)
    c, grads_ = backward_counts(q, k, v, dict(window=w, sinks=sinks))
    assert all(torch.isfinite(g).all() for g in grads_)
    # every visible pair is computed, and at most two query tiles' worth more per query
    assert causal_window_pairs(S, w) <= c.score_elements <= S * (w + sinks + 2 * block_q)
    # a tile walks its window range and its sink range, each cut in blocks of block_k keys
    assert c.key_blocks <= c.work_items * (ceil_div(w + 2 * block_q, block_k) + 1)
    assert c.score_elements < S * S / 2 / 4  # far below causal attention's S^2 / 2
    # plain causal backward: only the blocks on and below the diagonal
    full, _ = backward_counts(q, k, v, {})
    assert S * (S + 1) / 2 <= full.score_elements <= S * S / 2 + S * 2 * block_q
    assert c.score_elements < full.score_elements / 8
    # non-causal windows see both sides
    both, _ = backward_counts(q, k, v, dict(window=w, sinks=sinks, causal=False))
    assert both.score_elements <= S * (2 * w + sinks + 2 * block_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("S", [2048, 1000])
def test_causal_backward_diagonal_blocks_stop_at_each_row_groups_last_key(dtype, S):
    # S and dP on a block the diagonal crosses run per group of 32 rows up to the last key one of
    # its rows sees, in 32-key steps (kernels.md): ~16 keys a row past its own on average, where
    # whole 128-row tiles cost ~64
    q, k, v = make_qkv(1, S, S, 1, 1, 64, dtype)
    full, grads_ = backward_counts(q, k, v, {})
    assert all(torch.isfinite(g).all() for g in grads_)
    assert S * (S + 1) / 2 <= full.score_elements <= S * (S + 1) / 2 + S * 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("S", [1024, 333])
@pytest.mark.parametrize("case", ["causal", "windows", "alpha", "non-causal window"])
def test_backward_key_gradients_reduce_only_over_rows_that_see_the_keys(dtype, S, case):
    # dV and dK reduce each chunk of a key block's keys over the rows from the first that sees
    # it: the (row, key) pairs of their products are those S and dP computed per group of rows
    # (kernels.md), where one product over the whole block took a triangle more on the diagonal
    # (~block_q / 2 keys a row)
    kw = {"causal": {}, "windows": dict(window=torch.tensor([-1, 200]), sinks=4),
          "alpha": dict(window=96, sinks=4, alpha=torch.tensor([0.3, 0.8])),
          "non-causal window": dict(window=150, causal=False)}[case]
    q, k, v = make_qkv(1, S, S, 2, 2, 64, dtype)
    c, grads_ = backward_counts(q, k, v, kw)
    assert all(torch.isfinite(g).all() for g in grads_)
    assert c.gradient_elements > 0
    if S % 64 == 0:  # no block reaches past the keys
        assert c.gradient_elements == c.score_elements
    else:  # the scores count the keys a packed block pads, the gradients stop at the last real one
        assert c.gradient_elements <= c.score_elements
    if case == "causal":
        assert 2 * S * (S + 1) / 2 <= c.gradient_elements <= 2 * (S * (S + 1) / 2 + S * 32)
    # only dK wanted: the same products, counted once
    c_dk, _ = backward_counts(q, k, v, kw, qkv_grad=("k",))
    assert c_dk.gradient_elements == c.gradient_elements
    # only dQ wanted: no dV or dK product
    c_dq, _ = backward_counts(q, k, v, kw, qkv_grad=("q",))
    assert c_dq.gradient_elements == 0 and c_dq.score_elements == c.score_elements


_BACKWARD_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch, headops
    S, D, w = 65536, 64, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, 1, D, requires_grad=True) for _ in range(3))
    key_bias = torch.zeros(S, requires_grad=True)
    def step(n):
        out = headops.attention(q[:, :n], k[:, :n], v[:, :n], window=w, sinks=4, key_bias=key_bias[:n])
        torch.autograd.grad(out.sum(), (q, k, v, key_bias))
    step(512)  # first-call set-up outside the measure
    out = headops.attention(q, k, v, window=w, sinks=4, key_bias=key_bias)
    loss = out.sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with headops.count_work() as c:
        grads = torch.autograd.grad(loss, (q, k, v, key_bias))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(growth=after - before, finite=all(bool(torch.isfinite(g).all()) for g in grads),
                          score_elements=c.score_elements)))
""")


def test_backward_has_no_s_by_s_memory(tmp_path):
    # the backward recomputes the probabilities tile by tile: at S = 65536 (S x S float32 = 16 GiB)
    # a streaming head's backward grows the peak RSS by far less than a GiB
    S, w, D = 65536, 128, 64
    script = tmp_path / "backward_memory.py"
    script.write_text(_BACKWARD_MEMORY_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["finite"]
    assert result["growth"] < 1 << 30, f"peak RSS grew by {result['growth'] / 2**20:.0f} MiB"
    assert result["growth"] < S * S * 4 / 64
    block_q, _ = headops._C.cpu_backward_tile_shape(torch.float32, D)
    assert 0 < result["score_elements"] < S * (w + 4 + 2 * block_q)


@pytest.mark.parametrize("w", [1, 7])
def test_tiny_window_backward_cost(w):
    S, D = 1000, 64
    block_q, _ = headops._C.cpu_backward_tile_shape(torch.float32, D)
    q, k, v = make_qkv(2, S, S, 2, 1, D, torch.float32)
    c, _ = backward_counts(q, k, v, dict(window=w))
    assert c.score_elements <= 2 * 2 * S * (w + block_q)


@pytest.mark.parametrize("alpha_grad", [False, True], ids=["alpha_fixed", "alpha_grad"])
def test_alpha_backward_costs_one_pass(alpha_grad):
    S, D = 1024, 64
    q, k, v = make_qkv(1, S, S, 2, 2, D, torch.float32)
    streaming_kw = dict(window=torch.tensor([64, 16]), sinks=torch.tensor([4, 0]))
    params = ("alpha",) if alpha_grad else ()
    full, _ = backward_counts(q, k, v, {})
    streaming, _ = backward_counts(q, k, v, streaming_kw)
    mixed, _ = backward_counts(q, k, v, dict(streaming_kw, alpha=torch.tensor([0.5, 0.25], dtype=F64)), params=params)
    assert streaming.score_elements < full.score_elements / 4
    assert mixed.key_blocks == full.key_blocks  # one walk over the keys, not full + streaming
    assert mixed.score_elements == full.score_elements
    # alpha exactly 0 or 1: the branch of weight 0 adds nothing to any gradient, even to alpha's
    # (which comes from the saved averages): one branch is walked
    one, _ = backward_counts(q, k, v, dict(streaming_kw, alpha=torch.tensor([1.0, 1.0], dtype=F64)), params=params)
    zero, _ = backward_counts(q, k, v, dict(streaming_kw, alpha=torch.tensor([0.0, 0.0], dtype=F64)), params=params)
    assert computed(one) == computed(full)
    assert computed(zero) == computed(streaming)


# ---------------------------------------------------------------------------------------------
# 5. head importance (Michel et al. 2019): dL/dgate at gate = 1 from one backward pass


def _tiny_model(L=2, B=2, S=24, Hq=4, Hkv=2, D=8):
    Dm = Hq * D
    gen = lambda *shape: torch.randn(*shape, dtype=F64) / math.sqrt(shape[0])  # noqa: E731
    layers = [dict(wq=gen(Dm, Hq * D), wk=gen(Dm, Hkv * D), wv=gen(Dm, Hkv * D), wo=gen(Hq * D, Dm),
                   window=torch.tensor([4, -1, 7, 2]), sinks=torch.tensor([1, 0, 0, 2]),
                   out_bias=0.1 * torch.randn(Hq, D, dtype=F64)) for _ in range(L)]
    x = torch.randn(B, S, Dm, dtype=F64)
    target = torch.randn(B, S, Dm, dtype=F64)
    return x, target, layers, (Hq, Hkv, D)


def _model_loss(attn, x, target, layers, dims, gates):
    Hq, Hkv, D = dims
    h = x
    B, S, _ = x.shape
    for layer, p in enumerate(layers):
        q = (h @ p["wq"]).view(B, S, Hq, D)
        k = (h @ p["wk"]).view(B, S, Hkv, D)
        v = (h @ p["wv"]).view(B, S, Hkv, D)
        a = attn(q, k, v, gate=gates[layer], window=p["window"], sinks=p["sinks"], out_bias=p["out_bias"])
        h = h + a.reshape(B, S, Hq * D) @ p["wo"]
    return ((h.tanh() - target) ** 2).mean()


def test_gate_gradient_is_michel_head_importance():
    x, target, layers, dims = _tiny_model()
    L, Hq = len(layers), dims[0]
    gates = torch.ones(L, Hq, dtype=F64)
    gates[1, 2] = 0.0  # a pruned head: its importance is still read from the same pass
    g = gates.clone().requires_grad_(True)
    (importance,) = torch.autograd.grad(_model_loss(headops.attention, x, target, layers, dims, g), g)
    g_ref = gates.clone().requires_grad_(True)
    (importance_ref,) = torch.autograd.grad(_model_loss(reference.attention, x, target, layers, dims, g_ref), g_ref)
    # finite differences, one head at a time (the slow way)
    eps = 1e-6
    fd = torch.zeros_like(gates)
    with torch.no_grad():
        for layer in range(L):
            for h in range(Hq):
                up, down = gates.clone(), gates.clone()
                up[layer, h] += eps
                down[layer, h] -= eps
                fd[layer, h] = (_model_loss(headops.attention, x, target, layers, dims, up)
                                - _model_loss(headops.attention, x, target, layers, dims, down)) / (2 * eps)
    print("importance", importance.tolist(), "finite differences", fd.tolist())
    scale = importance.abs().max()
    assert (importance.abs() > 1e-4 * scale).all()  # every head, the pruned one too, has a score
    assert (importance - fd).abs().max() <= 1e-6 * scale
    assert (importance - importance_ref).abs().max() <= 1e-10 * scale


# ---------------------------------------------------------------------------------------------
# 6. torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_layer(q, k, v, gate, softmax_scale, key_bias, sink_logit, out_scale, out_bias, alpha):
    out = headops.attention(q * 1.0, k, v, gate=gate, window=torch.tensor([3, -1, 5, 2]),
                            sinks=torch.tensor([1, 0, 2, 0]), softmax_scale=softmax_scale, key_bias=key_bias,
                            sink_logit=sink_logit, out_scale=out_scale, out_bias=out_bias, alpha=alpha)
    return (out.sum(dim=2) + 1).square().sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gradients_match_eager(backend, fresh_dynamo):
    B, Sq, Sk, Hq, Hkv, D = 2, 9, 13, 4, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.float32)
    args = [q, k, v, torch.tensor([0.5, 0.0, 1.5, -1.0]), torch.rand(Hq) + 0.1, torch.randn(Sk),
            torch.randn(Hq), torch.randn(Hq, D), torch.randn(Hq, D), torch.tensor([0.25, 0.0, 1.0, 0.6])]
    args = [a.requires_grad_() for a in args]
    want = torch.autograd.grad(_compiled_layer(*args), args)
    compiled = torch.compile(_compiled_layer, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*args), args)
    # aot_eager runs the very same ops: bitwise; inductor may fuse the ops around attention
    atol = 0 if backend == "aot_eager" else 1e-5
    for name, g, w in zip(("q", "k", "v", *PARAMS), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol, msg=lambda m: f"d{name}: {m}")
    assert got[3][1] != 0  # the gate at 0 gets its importance through the compiled graph too


# ---------------------------------------------------------------------------------------------
# 7. determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_backward_is_deterministic(dtype):
    B, Sq, Sk, Hq, Hkv, D = 2, 300, 700, 4, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL + ["alpha"])
    dout, _ = random_cotangents(q, "bshd", False)
    first = grads(headops.attention, q, k, v, kw, dout)
    second = grads(headops.attention, q, k, v, kw, dout)
    assert first.keys() == set(["q", "k", "v", *PARAMS])
    for n in first:
        assert torch.equal(first[n], second[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_backward_same_in_either_layout(dtype):
    """bshd and bhsd inputs give the same gradients bit for bit: the layouts change where rows
    lie (and, on the CPU, the layout dk/dv are written in: the caller's where a head's rows are
    written once, heads-first where they accumulate per key block), not the arithmetic."""
    B, Sq, Sk, Hq, Hkv, D = 2, 300, 700, 4, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL + ["alpha"])
    dout, _ = random_cotangents(q, "bshd", False)
    bshd = grads(headops.attention, q, k, v, kw, dout)
    heads_first = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    bhsd = grads(headops.attention, *heads_first, dict(kw, layout="bhsd"), dout.transpose(1, 2))
    for n in bshd:
        got = bhsd[n].transpose(1, 2) if n in ("q", "k", "v") else bhsd[n]
        assert torch.equal(got, bshd[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("broadcast", ["all", "heads", "batch_and_sequence"])
def test_broadcast_output_gradient_same_as_materialised(dtype, layout, broadcast):
    """A dL/dout broadcast with stride 0 (out.sum()'s gradient is one value expanded; here also
    over heads only, or over batch and sequence) gives the gradients its materialised copy gives,
    bit for bit: on the CPU the kernel reads the broadcast rows where they lie, uncopied."""
    B, Sq, Sk, Hq, Hkv, D = 2, 150, 260, 4, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, layout)
    kw = dict(head_params(B, Hq, Sk, D, ALL + ["alpha"]), layout=layout)
    out_shape = q.shape
    s_dim, h_dim = (1, 2) if layout == "bshd" else (2, 1)
    distinct = list(out_shape)
    for dim in {"all": (0, 1, 2, 3), "heads": (h_dim,), "batch_and_sequence": (0, s_dim)}[broadcast]:
        distinct[dim] = 1
    dout = torch.randn(distinct, dtype=F64).to(dtype).expand(out_shape)
    assert 0 in dout.stride()

    def gradients(d_out):
        lq, lk, lv, lkw = leaves(q, k, v, kw)
        named = {"q": lq, "k": lk, "v": lv, **{n: t for n, t in lkw.items() if isinstance(t, torch.Tensor)
                                               and t.requires_grad}}
        out = headops.attention(lq, lk, lv, **lkw)
        return dict(zip(named, torch.autograd.grad(out, list(named.values()), grad_outputs=d_out)))

    expanded, materialised = gradients(dout), gradients(dout.contiguous())
    assert expanded.keys() == materialised.keys() and len(expanded) > 3
    for n in expanded:
        assert not expanded[n].isnan().any(), n
        assert torch.equal(expanded[n], materialised[n]), n


def _grads_at_thread_counts(q, k, v, kw, dout):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        many = grads(headops.attention, q, k, v, kw, dout)
        torch.set_num_threads(1)
        one = grads(headops.attention, q, k, v, kw, dout)
    finally:
        torch.set_num_threads(threads)
    return many, one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_backward_independent_of_thread_count(dtype):
    # every (b, h) item owns its outputs, GQA groups are summed in a fixed order. Scales are
    # powers of two here (see the next test for the others).
    B, Sq, Sk, Hq, Hkv, D = 2, 300, 700, 4, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, [f for f in ALL if f != "scale"] + ["alpha"])
    kw["softmax_scale"] = torch.tensor([0.125, 0.25, 0.0625, 0.5], dtype=F64)
    dout, _ = random_cotangents(q, "bshd", False)
    many, one = _grads_at_thread_counts(q, k, v, kw, dout)
    for n in many:
        assert torch.equal(many[n], one[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_dk_independent_of_thread_count_any_scale(dtype):
    B, Sq, Sk, H, D = 1, 300, 700, 2, 24  # default scale 1/sqrt(24): not a power of two
    q, k, v = make_qkv(B, Sq, Sk, H, H, D, dtype)
    dout, _ = random_cotangents(q, "bshd", False)
    many, one = _grads_at_thread_counts(q, k, v, {}, dout)
    for n in ("q", "v"):
        assert torch.equal(many[n], one[n]), n
    assert torch.equal(many["k"], one["k"])


# ---------------------------------------------------------------------------------------------
# 8. the inverse visibility rule the CUDA backward's key-side pass walks


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_queries_for_key_inverts_visibility(causal):
    """HeadVisibility::queries_for_key (head_semantics.h, through a test hook) gives exactly the
    queries that see each key under the reference's rule, as one range (empty: hi <= lo)."""
    for Sq, Sk in [(1, 1), (5, 5), (3, 9), (9, 3), (12, 12), (1, 7), (7, 1)]:
        for window in [-1, 1, 2, 3, 5, Sk + Sq - 1, Sk + Sq, Sk + Sq + 1, 2**62, 2**63 - 1]:
            for sinks in [0, 1, 2, Sk, Sk + 3]:
                vis = reference.visibility(Sq, Sk, causal=causal, window=window, sinks=sinks)[0, 0]
                for j in range(Sk):
                    lo, hi = headops._C.semantics.queries_for_key(causal, window, sinks, j, Sq, Sk)
                    want = vis[:, j].nonzero().flatten().tolist()
                    got = list(range(lo, hi)) if hi > lo else []
                    assert got == want, (causal, window, sinks, Sq, Sk, j, lo, hi)


@pytest.mark.parametrize("dtype,layout,Hkv", [(torch.float32, "bshd", 4), (torch.float32, "bhsd", 2),
                                              (torch.float32, "bhsd", 4), (torch.bfloat16, "bhsd", 4),
                                              (torch.float64, "bshd", 1)])
def test_gradients_returned_are_not_the_next_backwards_scratch(dtype, layout, Hkv):
    """dk and dv per query head are kept per thread between backward calls where the returned
    gradients are made from them (a GQA sum, a copy to bshd or to a 16-bit dtype): a gradient
    returned by one backward must not change with the next one's (and where they are returned
    as they are, nothing is kept)."""
    shape = lambda H: (2, 40, H, 16) if layout == "bshd" else (2, H, 40, 16)  # noqa: E731
    first = [torch.randn(shape(H), dtype=dtype, requires_grad=True) for H in (4, Hkv, Hkv)]
    grads = torch.autograd.grad(headops.attention(*first, layout=layout).sum(), first)
    kept = [g.clone() for g in grads]
    second = [torch.randn(shape(H), dtype=dtype, requires_grad=True) for H in (4, Hkv, Hkv)]
    torch.autograd.grad(headops.attention(*second, layout=layout).square().sum(), second)
    assert all(torch.equal(g, k) for g, k in zip(grads, kept))
