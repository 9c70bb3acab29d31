"""The CPU kernel (headops.attention) against the reference, on fresh random inputs.

float64 first (tolerance ~1e-9: the same math, only the summation order differs), then
float32, bfloat16 and float16 against the reference run in float64 on the rounded inputs
(tolerances in conftest.OUT_ATOL / OUT_RTOL / LSE_ATOL, with their reasons).
"""

import math

import pytest
import torch

import headops
from headops import reference

from conftest import (ALL_FEATURES as ALL, LAYOUTS, OUT_ATOL, OUT_RTOL, assert_close, assert_no_new_nonfinite,
                      check_against_reference, half_ulp_excess, head_params, make_qkv, reference_f64)

F64 = torch.float64

# B, Sq, Sk, Hq, Hkv, D
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 7, 7, 4, 4, 64),
    (1, 7, 127, 4, 1, 80),  # MQA, Sq < Sk
    (2, 127, 7, 8, 4, 128),  # Sq > Sk: causal rows with no visible key
    (1, 1, 127, 8, 1, 96),  # a decode step
    (2, 127, 127, 4, 2, 40),
    (1, 33, 65, 4, 4, 33),  # odd head dim
    (2, 130, 600, 8, 8, 64),  # several query tiles and key blocks
    (1, 1000, 1000, 1, 1, 64),
    (1, 1000, 7, 2, 1, 33),
    (1, 300, 1000, 4, 1, 128),
]
shape_id = lambda s: "B{}-Sq{}-Sk{}-Hq{}-Hkv{}-D{}".format(*s)  # noqa: E731


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_plain_float64(shape, layout, causal):
    q, k, v = make_qkv(*shape, F64, layout)
    check_against_reference(q, k, v, causal=causal, layout=layout)




@pytest.mark.parametrize("features", [[], ALL, ALL + ["alpha"]], ids=["plain", "all", "all+alpha"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 7, 7, 4, 4, 64), (1, 127, 300, 8, 2, 80), (2, 70, 33, 4, 1, 33)],
                         ids=shape_id)
def test_strided_inputs(shape, layout, features):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = make_qkv(*shape, F64, layout, strided=True)
    check_against_reference(q, k, v, layout=layout, **head_params(B, Hq, Sk, D, features))


# --------------------------------------------------------------------------- one feature at a time

B_, HQ, HKV, D_ = 2, 4, 2, 64


def _vec(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def _ints(values):
    return torch.tensor(values, dtype=torch.int64)


_WIN, _SINKS = [1, 16, 100, 8], [3, 0, 70, 5]
_randn = lambda *shape: torch.randn(shape, dtype=F64)  # noqa: E731

# name -> (Sk -> keyword arguments), for B = 2, Hq = 4, D = 64
FEATURE_CASES = {
    "scale_float": lambda Sk: dict(softmax_scale=0.37),
    "scale_tensor": lambda Sk: dict(softmax_scale=_vec([0.05, 0.125, 0.3, 1.0])),
    "window_1": lambda Sk: dict(window=1),
    "window_mixed": lambda Sk: dict(window=_ints([1, 37, 300, -1])),
    "window_beyond_sk": lambda Sk: dict(window=Sk + 50),
    "sinks_alone": lambda Sk: dict(sinks=_ints([0, 1, 4, 300])),
    "window_sinks": lambda Sk: dict(window=_ints([1, 16, 100, -1]), sinks=_ints(_SINKS)),
    "window_sinks_overlap": lambda Sk: dict(window=_ints([64, 256, 2, 3]), sinks=_ints([64, 255, Sk + 100, 1])),
    "alpha": lambda Sk: dict(alpha=_vec([0.25, 0.5, 0.9, 0.1]), window=_ints(_WIN), sinks=_ints(_SINKS)),
    "alpha_exact_0_1": lambda Sk: dict(alpha=_vec([0.0, 1.0, 0.5, 0.0]), window=_ints(_WIN), sinks=_ints(_SINKS)),
    "alpha_scalar_no_window": lambda Sk: dict(alpha=0.3),
    "key_bias_Sk": lambda Sk: dict(key_bias=_randn(Sk)),
    "key_bias_11Sk": lambda Sk: dict(key_bias=_randn(1, 1, Sk)),
    "key_bias_BHSk": lambda Sk: dict(key_bias=_randn(B_, HQ, Sk)),
    "key_bias_H1": lambda Sk: dict(key_bias=_randn(HQ, 1)),
    "key_bias_B11_float32": lambda Sk: dict(key_bias=_randn(B_, 1, 1).float()),
    "key_bias_transposed": lambda Sk: dict(key_bias=_randn(Sk, HQ).t()),
    "key_bias_minus_inf": lambda Sk: dict(key_bias=torch.where(torch.rand(B_, HQ, Sk) < 0.7, -math.inf, 0.0).double()),
    "sink_logit": lambda Sk: dict(sink_logit=_vec([-2.0, 0.0, 1.5, 3.0])),
    "sink_logit_window": lambda Sk: dict(sink_logit=_vec([-2.0, 0.0, 1.5, 3.0]), window=_ints(_WIN)),
    "out_scale_bias": lambda Sk: dict(out_scale=_randn(HQ, D_), out_bias=_randn(HQ, D_)),
    "out_scale_bias_per_batch": lambda Sk: dict(out_scale=_randn(B_, HQ, D_), out_bias=_randn(B_, HQ, D_)),
    "gate": lambda Sk: dict(gate=_vec([0.5, 0.0, -1.25, 1.0])),
    "gate_per_batch": lambda Sk: dict(gate=_vec([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.5, -0.0]])),
    "gate_all_zero": lambda Sk: dict(gate=0.0, out_bias=_randn(HQ, D_)),
    "per_batch_1xHq": lambda Sk: dict(window=_ints([[1, 2, 3, -1]]), softmax_scale=_vec([[0.1, 0.2, 0.3, 0.4]])),
    "all": lambda Sk: head_params(B_, HQ, Sk, D_, ALL),
    "all_alpha": lambda Sk: head_params(B_, HQ, Sk, D_, ALL + ["alpha"]),
    "all_per_batch": lambda Sk: head_params(B_, HQ, Sk, D_, ALL, per_batch=True),
    "all_alpha_per_batch": lambda Sk: head_params(B_, HQ, Sk, D_, ALL + ["alpha"], per_batch=True),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("Sq,Sk", [(130, 1100), (70, 33)])  # several query tiles and key blocks; Sq > Sk
@pytest.mark.parametrize("feature", list(FEATURE_CASES))
def test_feature_float64(feature, Sq, Sk, causal):
    q, k, v = make_qkv(B_, Sq, Sk, HQ, HKV, D_, F64)
    check_against_reference(q, k, v, causal=causal, **FEATURE_CASES[feature](Sk))


# --------------------------------------------------------------------------- low precision

LOWP_CASES = [
    # shape, features, causal, layout, strided
    ((2, 130, 600, 4, 2, 64), ALL, True, "bshd", False),
    ((1, 1, 300, 8, 1, 128), [], True, "bhsd", False),
    ((2, 70, 50, 4, 4, 80), ["window", "sinks", "sink_logit"], True, "bshd", False),
    ((1, 65, 257, 4, 2, 33), ["window", "sinks", "key_bias", "gate"], False, "bhsd", False),
    ((1, 127, 127, 2, 1, 96), ["alpha", "window", "sinks", "scale"], True, "bshd", True),
    ((1, 1000, 1000, 2, 2, 64), [], True, "bshd", False),
    ((2, 300, 513, 4, 4, 128), ALL + ["alpha"], False, "bshd", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: shape_id(c[0]) + "-" + "+".join(c[1] or ["plain"]))
def test_low_precision(case, dtype):
    shape, features, causal, layout, strided = case
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = make_qkv(*shape, dtype, layout, strided=strided)
    check_against_reference(q, k, v, causal=causal, layout=layout, **head_params(B, Hq, Sk, D, features))


SPLIT_HALF_CASES = [
    # shape, features, causal
    ((2, 130, 600, 4, 2, 64), ALL, True),
    ((1, 333, 333, 2, 1, 128), ALL + ["alpha"], True),
    ((1, 7, 300, 8, 1, 96), [], True),  # a few queries, each key read by 7 x 8 rows (kHalfSplitRows: 48)
    ((1, 200, 700, 3, 1, 128), ["window", "sinks"], False),
]


@pytest.mark.parametrize("case", SPLIT_HALF_CASES, ids=lambda c: shape_id(c[0]) + "-" + "+".join(c[1] or ["plain"]))
def test_float16_in_two_bfloat16_parts_is_float_accurate(case):
    # On AMX without AMX-FP16 a float16 forward that keeps no precise probabilities (learns none
    # of softmax_scale, sink_logit, alpha, key_bias), and reads each key with enough query rows,
    # runs each operand as two bfloat16 parts (operands.h, SplitHalfOperands; isa_dispatch.h,
    # kHalfSplitRows): its outputs stay within half a float16
    # ulp plus 2e-5 of max|out| of the float64 reference (measured: 3.9e-6), where P rounded to
    # float16 for the product (brgemm's float16 path) lands at 2.5e-4.
    (B, Sq, Sk, Hq, Hkv, D), features, causal = case
    if not headops._C.cpu_splits_half_into_bf16_tiles(D):
        pytest.skip("float16 runs as two bfloat16 parts only on AMX without AMX-FP16")
    assert headops._C.cpu_call_splits_half_into_bf16_tiles(D, Sq * Hq // Hkv)
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.float16)
    kw = {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
          for n, t in head_params(B, Hq, Sk, D, features).items()}
    out = headops.attention(q, k, v, causal=causal, **kw)
    assert half_ulp_excess(out, reference_f64(q, k, v, causal=causal, **kw)) < 2e-5


@pytest.mark.parametrize("learns", [False, True], ids=["inference", "learns-scale"])
@pytest.mark.parametrize("case", SPLIT_HALF_CASES, ids=lambda c: shape_id(c[0]) + "-" + "+".join(c[1] or ["plain"]))
def test_float16_widened_to_float_tiles_is_float_accurate(case, learns):
    # Where brgemm runs float tiles but has no float16 layout (AVX-512 without AVX512-FP16: the
    # Zen 4/5 EPYCs) a float16 forward with enough rows per key widens Q, K and V to float and
    # takes float32's packed tiles (operands.h, WidenedHalfOperands), P in float: within half a
    # float16 ulp plus 2e-5 of max|out| of the float64 reference, for a call saved for its
    # backward (learning softmax_scale) as for one that is not; and its backward's gradients too.
    (B, Sq, Sk, Hq, Hkv, D), features, causal = case
    if not headops._C.cpu_widens_half_to_float_tiles(D):
        pytest.skip("float16 is widened to float tiles only where brgemm runs float but not float16 tiles")
    assert headops._C.cpu_call_widens_half_to_float_tiles(D, Sq * Hq // Hkv)
    assert headops._C.cpu_tile_shape(torch.float16, D) == headops._C.cpu_tile_shape(torch.float32, D)
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.float16)
    kw = {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
          for n, t in head_params(B, Hq, Sk, D, features).items()}
    if learns:
        kw["softmax_scale"] = torch.full((Hq,), D**-0.5, requires_grad=True)
        q.requires_grad_(True)
    out = headops.attention(q, k, v, causal=causal, **kw)
    want = reference_f64(q.detach(), k, v, causal=causal, **{n: t.detach() if isinstance(t, torch.Tensor) else t
                                                              for n, t in kw.items()})
    assert half_ulp_excess(out.detach(), want) < 2e-5
    if learns:
        out.float().pow(2).sum().backward()
        q64 = q.detach().double().requires_grad_(True)
        scale64 = kw["softmax_scale"].detach().double().requires_grad_(True)
        ref = reference_f64(q64, k, v, causal=causal, **{**kw, "softmax_scale": scale64})
        ref.pow(2).sum().backward()
        assert_close(q.grad, q64.grad, 2e-2 * q64.grad.abs().max().item(), what="dq")
        assert_close(kw["softmax_scale"].grad, scale64.grad, 1e-3 * scale64.grad.abs().max().item(),
                     what="dsoftmax_scale")


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_float16_inf_or_nan_input_leaves_the_bfloat16_parts(which, value):
    # an inf query element times a key element whose low part is 0 would make NaN of the split
    # products where the one product gives -inf (that key masked out): such a call takes the
    # float16 path, whose non-finite values behave as the reference's (test_properties)
    q, k, v = make_qkv(1, 100, 150, 2, 1, 64, torch.float16)
    k[..., 3] = k[..., 3].abs() + 0.01  # a -inf q[.., 3] then masks every key of its row out
    inputs = {"q": q, "k": k, "v": v}
    poisoned = inputs[which].clone()
    poisoned[0, 40, 0, 3] = value
    inputs[which] = poisoned
    kw = dict(causal=True, window=torch.tensor([-1, 30]))
    out = headops.attention(inputs["q"], inputs["k"], inputs["v"], **kw)
    want = reference_f64(inputs["q"], inputs["k"], inputs["v"], **kw)
    nan_out, nan_want = out.isnan(), want.isnan()
    if which == "v":  # (an inf value may also reach rows of its tile that cannot see it: 0 * inf)
        assert not (nan_want & ~nan_out).any()
    else:
        assert torch.equal(nan_out, nan_want)
    finite = ~nan_out & ~nan_want
    assert_close(out[finite], want[finite], OUT_ATOL[torch.float16], OUT_RTOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_large_logits_stay_finite(dtype):
    # logits of several hundred: the online softmax must rescale, never overflow to inf/NaN
    q, k, v = make_qkv(1, 200, 300, 2, 2, 64, dtype)
    q = (q.to(F64) * 30).to(dtype)
    check_against_reference(q, k, v, window=torch.tensor([7, -1]), sinks=torch.tensor([2, 0]), lse_atol=2e-3)


# logit offsets of consecutive runs of 200 keys: the running max jumps by less and by more than
# the kernel lets a row's reference max lag (lazy rescaling), falls, or starts high
MAX_JUMPS = {
    "up_small_and_large": [0, 15, 40, -30, 19.9, 20.5, 60],
    "down_then_flat": [0, -60, 10, 10, 10, 10, 10],
    "first_highest": [50, 0, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sink", [None, 30.0], ids=["no_sink", "sink_logit"])
@pytest.mark.parametrize("jumps", list(MAX_JUMPS))
def test_running_max_jumps_across_key_blocks(jumps, sink, dtype):
    Sk = 200 * len(MAX_JUMPS[jumps])
    key_bias = torch.tensor(MAX_JUMPS[jumps], dtype=F64).repeat_interleave(200)
    q, k, v = make_qkv(1, 40, Sk, 2, 1, 64, dtype)
    extra = {} if sink is None else dict(sink_logit=torch.tensor([sink, -sink - 20], dtype=F64))
    check_against_reference(q, k, v, causal=False, key_bias=key_bias, **extra)
    check_against_reference(q, k, v, causal=True, key_bias=key_bias, window=torch.tensor([-1, 450]), **extra)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_extreme_sink_logits_and_key_bias(causal, dtype):
    # sink logits far below / far above every logit (-inf: a sink that never weighs), and keys
    # pushed out by a huge negative bias (a huge positive one is tested in float64 only: in
    # float32, logit + 1e4 keeps ~3 decimals, so the float64 oracle cannot be matched closely)
    q, k, v = make_qkv(2, 70, 1100, 4, 2, 64, dtype)
    key_bias = torch.zeros(1100, dtype=F64)
    key_bias[[3, 600, 1099]] = 1e4 if dtype == F64 else -1e4
    check_against_reference(q, k, v, causal=causal, sink_logit=_vec([-1e30, -math.inf, 1e4, 80.0]),
                            key_bias=key_bias, window=_ints([-1, 300, 5, 1]))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_infinite_sink_logit_takes_the_row(dtype):
    # a +inf sink holds every row's mass: o = 0 (the epilogue still applies), lse = +inf, its
    # probability 1 and the row's entropy 0, never NaN -- also where the keys come in two ranges
    # (sinks + window: the running max moves between two +inf values) and in the decode's merges
    q, k, v = make_qkv(1, 40, 300, 4, 2, 32, dtype)
    sink = _vec([math.inf, 0.5, math.inf, -1.0])
    kw = dict(sink_logit=sink, window=_ints([2, 40, 100, -1]), sinks=_ints([1, 4, 0, 0]))
    out, ref = check_against_reference(q, k, v, causal=True, **kw)
    assert torch.equal(out[0, :, [0, 2]], torch.zeros_like(out[0, :, [0, 2]]))
    bias = torch.randn(4, 32, dtype=F64)
    out = headops.attention(q, k, v, out_bias=bias, alpha=_vec([0.0, 0.0, 0.5, 1.0]), **kw)
    assert torch.equal(out[0, :, 0], bias[0].to(out.dtype).expand(40, 32))
    _, lse = headops.attention(q, k, v, return_lse=True, **kw)
    assert torch.isposinf(lse[0, [0, 2]]).all() and not lse.isnan().any()
    # the decode kernel, its walk split in pieces of 16 keys whose partials are merged
    cache = headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, dtype=dtype,
                                    kinds=["full", "full"], window=[2, 40, 100, -1], sinks=[1, 4, 0, 0],
                                    split_keys=16)
    Sk = k.shape[1]
    cache.append(0, k[:, :Sk - 1], v[:, :Sk - 1])
    step = cache.attention(0, q[:, -1:], k[:, -1:], v[:, -1:], sink_logit=sink)
    assert_close(step, ref[:, -1:], atol=OUT_ATOL[dtype], rtol=OUT_RTOL[dtype])
    _, stats = headops.attention(q, k, v, probe=headops.Probe(sink_mass=True, entropy=True), **kw)
    assert torch.equal(stats.sink_mass[0, [0, 2]], torch.ones(2, 40))
    assert torch.equal(stats.entropy[0, [0, 2]], torch.zeros(2, 40))
    assert not stats.entropy.isnan().any() and not stats.sink_mass.isnan().any()
    # gradients: nothing reaches q, k, v through the +inf heads and the sink's own gradient is 0
    # (the oracle's autograd gives NaN there: exp(inf - inf)); the other heads match the oracle
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sink_leaf = sink.clone().requires_grad_()
    dout = torch.randn(out.shape, dtype=F64).to(dtype)
    headops.attention(*leaves, causal=True, **dict(kw, sink_logit=sink_leaf)).backward(dout)
    ref_leaves = [t.detach().to(F64).requires_grad_() for t in (q, k, v)]
    ref_sink = sink.clone().requires_grad_()
    reference.attention(*ref_leaves, causal=True, **dict(kw, sink_logit=ref_sink)).backward(dout.to(F64))
    assert sink_leaf.grad[[0, 2]].eq(0).all()
    assert torch.equal(leaves[0].grad[0, :, [0, 2]], torch.zeros_like(leaves[0].grad[0, :, [0, 2]]))
    assert not any(t.grad.isnan().any() for t in leaves)
    if dtype == F64:  # (rounded inputs' gradients are compared in test_autograd)
        assert_close(sink_leaf.grad[[1, 3]], ref_sink.grad[[1, 3]], atol=1e-9, rtol=1e-9)
        for got, want in zip(leaves, ref_leaves):
            assert_close(got.grad, want.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_zero_gate_gradient_ignores_a_nan_it_multiplies(dtype):
    # a head gated to exactly 0 outputs 0 whatever its average holds (a NaN from its input
    # included), so d(gate) there adds 0 for such terms, as the oracle's does, not NaN
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8, dtype)
    q[0, 2, 0, 3] = float("nan")
    dout = torch.randn(1, 5, 2, 8, dtype=F64).to(dtype)
    grads = []
    for fn, cast in ((headops.attention, dtype), (reference.attention, F64)):
        gate = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
        out = fn(q.to(cast), k.to(cast), v.to(cast), gate=gate, out_bias=torch.ones(2, 8, dtype=F64))
        grads.append(torch.autograd.grad(out, gate, dout.to(cast))[0])
    assert torch.isfinite(grads[0]).all()
    assert_close(grads[0], grads[1], atol=1e-9 if dtype == F64 else 3e-2, rtol=1e-9 if dtype == F64 else 3e-2)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_output_and_lse_dtype_shape_layout(dtype):
    for layout in LAYOUTS:
        q, k, v = make_qkv(2, 5, 9, 4, 2, 16, dtype, layout)
        out, lse = headops.attention(q, k, v, layout=layout, return_lse=True)
        assert out.dtype == dtype and out.shape == q.shape
        assert lse.shape == (2, 4, 5)
        assert lse.dtype == (F64 if dtype == F64 else torch.float32)


# --------------------------------------------------------------------------- rows with no visible key


def _no_key_case(name):
    """(Sq, Sk, kwargs, rows with no visible key) with Hq = 2."""
    if name == "causal_sq_gt_sk":  # positions -3..1: rows 0-2 see nothing
        return 5, 2, dict(causal=True), slice(0, 3)
    if name == "noncausal_window_far":  # positions -15..4, window 3: rows 0-12 see nothing
        return 20, 5, dict(causal=False, window=3), slice(0, 13)
    if name == "key_bias_all_minus_inf":
        return 6, 9, dict(causal=False, key_bias=torch.full((9,), float("-inf"), dtype=F64)), slice(0, 6)
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_sink", [False, True], ids=["plain", "sink_logit"])
@pytest.mark.parametrize("case", ["causal_sq_gt_sk", "noncausal_window_far", "key_bias_all_minus_inf"])
def test_rows_without_visible_key(case, with_sink, dtype):
    Sq, Sk, kw, rows = _no_key_case(case)
    q, k, v = make_qkv(1, Sq, Sk, 2, 1, 16, dtype)
    gate = torch.tensor([0.5, -2.0], dtype=F64)
    bias = torch.randn(2, 16, dtype=F64)
    logit = torch.tensor([0.25, -1.5], dtype=F64)
    extra = dict(sink_logit=logit) if with_sink else {}
    out, lse = headops.attention(q, k, v, gate=gate, out_bias=bias, out_scale=torch.randn(2, 16, dtype=F64),
                                 return_lse=True, **kw, **extra)
    assert not out.isnan().any() and not lse.isnan().any()
    # o = 0, so out = gate * (0 * out_scale + out_bias): one product in the accumulation dtype
    acc = F64 if dtype == F64 else torch.float32
    want = (gate.to(acc).view(2, 1) * bias.to(acc)).to(dtype).expand(out[0, rows].shape)
    assert torch.equal(out[0, rows], want)
    lse_rows = lse[0, :, rows]
    if with_sink:
        assert torch.equal(lse_rows, logit.to(lse.dtype).view(2, 1).expand_as(lse_rows))
    else:
        assert torch.isneginf(lse_rows).all()
    check_against_reference(q, k, v, gate=gate, out_bias=bias, **kw, **extra)


def test_empty_keys():
    # Sk = 0: every row sees nothing (the reference cannot take an empty key axis)
    q = torch.randn(2, 3, 4, 8, dtype=F64)
    k = v = torch.empty(2, 0, 2, 8, dtype=F64)
    bias = torch.randn(4, 8, dtype=F64)
    out, lse = headops.attention(q, k, v, out_bias=bias, return_lse=True)
    assert torch.equal(out, bias.expand(2, 3, 4, 8))
    assert torch.isneginf(lse).all()
    out, lse = headops.attention(q, k, v, sink_logit=torch.tensor([0.0, 1.0, 2.0, 3.0]), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64).view(1, 4, 1).expand(2, 4, 3))


def test_empty_queries():
    q = torch.randn(2, 0, 4, 8)
    k = v = torch.randn(2, 5, 2, 8)
    out, lse = headops.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)


# --------------------------------------------------------------------------- strides and threads


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_overlapping_and_expanded_rows(dtype):
    # sequence strides below D (a key expanded along the sequence; overlapping rows)
    B, S, H, D = 1, 9, 2, 16
    q = torch.randn(B, S, H, D, dtype=F64).to(dtype)
    k = torch.randn(B, 1, H, D, dtype=F64).to(dtype).expand(B, S, H, D)
    base = torch.randn(B * S * H * D, dtype=F64).to(dtype)
    v = base.as_strided((B, S, H, D), (S * H * D, D // 2, D * S // 2, 1))  # rows overlap by half
    check_against_reference(q, k, v)


def _odd_size_one(B, S, H, D, dtype):
    """[B, S, H, D] whose size-1 sequence dim has stride 1 (< D): legal, the last dim is contiguous."""
    assert S == 1
    t = torch.randn(B, H, D, S, dtype=F64).to(dtype).permute(0, 3, 1, 2)
    assert t.stride(1) == 1 and t.stride(-1) == 1
    return t


# a length-1 sequence axis may carry any stride; BLAS still checks it as a leading dimension
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_size_one_sequence_dim_with_small_stride(which, dtype):
    B, H, D = 1, 2, 8
    Sq, Sk = (1, 9) if which == "q" else (6, 1)
    q, k, v = make_qkv(B, Sq, Sk, H, H, D, dtype)
    if which == "q":
        q = _odd_size_one(B, Sq, H, D, dtype)
    elif which == "k":
        k = _odd_size_one(B, Sk, H, D, dtype)
    else:
        v = _odd_size_one(B, Sk, H, D, dtype)
    check_against_reference(q, k, v, causal=False)


def test_result_independent_of_thread_count():
    q, k, v = make_qkv(2, 300, 700, 4, 2, 64, torch.float32)
    kw = head_params(2, 4, 700, 64, ALL + ["alpha"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = headops.attention(q, k, v, **kw)
        torch.set_num_threads(max(2, threads))
        many = headops.attention(q, k, v, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_inputs_not_modified():
    q, k, v = make_qkv(2, 65, 130, 4, 2, 32, torch.bfloat16, strided=True)
    kw = head_params(2, 4, 130, 32, ALL)
    saved = [t.clone() for t in (q, k, v, *kw.values())]
    headops.attention(q, k, v, **kw)
    for before, after in zip(saved, (q, k, v, *kw.values())):
        assert torch.equal(before, after)


def test_gqa_head_mapping():
    # query head h reads kv head h // (Hq // Hkv): give each kv head a constant value to see it
    B, S, Hq, Hkv, D = 1, 4, 8, 2, 8
    q, k, _ = make_qkv(B, S, S, Hq, Hkv, D, F64)
    v = torch.arange(Hkv, dtype=F64).view(1, 1, Hkv, 1).expand(B, S, Hkv, D).contiguous()
    out = headops.attention(q, k, v)
    want = (torch.arange(Hq) // (Hq // Hkv)).to(F64).view(1, 1, Hq, 1).expand_as(out)
    assert_close(out, want, 1e-12)


def test_softmax_scale_default_and_float():
    q, k, v = make_qkv(1, 9, 9, 2, 2, 80, F64)
    a = headops.attention(q, k, v)
    b = headops.attention(q, k, v, softmax_scale=1 / math.sqrt(80))
    c = headops.attention(q, k, v, softmax_scale=torch.full((2,), 1 / math.sqrt(80), dtype=F64))
    assert_close(a, b, 1e-12)
    assert_close(a, c, 1e-12)
    ref = reference_f64(q, k, v, softmax_scale=2.0)
    assert_close(headops.attention(q, k, v, softmax_scale=2.0), ref, OUT_ATOL[F64])


def test_gate_nan_propagates_like_reference():
    # a NaN gate is not "exactly 0": the head is computed and gives NaN, as in the reference
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8, F64)
    gate = torch.tensor([float("nan"), 1.0], dtype=F64)
    out = headops.attention(q, k, v, gate=gate)
    ref = reference_f64(q, k, v, gate=gate)
    assert out[:, :, 0].isnan().all()
    assert_no_new_nonfinite(out, ref)
    assert_close(out[:, :, 1], ref[:, :, 1], 1e-9)


def test_per_head_parameter_dtype_float32_with_float64_inputs():
    # per-head values of another float dtype are accepted and converted
    q, k, v = make_qkv(2, 20, 30, 4, 2, 16, F64)
    kw = {name: (t.to(torch.float32) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
          for name, t in head_params(2, 4, 30, 16, ALL).items()}
    check_against_reference(q, k, v, **kw)


def test_per_batch_parameters_broadcast_from_single_row():
    q, k, v = make_qkv(3, 20, 30, 4, 2, 16, F64)
    kw = head_params(1, 4, 30, 16, ["window", "sinks", "gate", "sink_logit", "scale"], per_batch=True)
    assert all(t.shape[0] == 1 for t in kw.values())
    check_against_reference(q, k, v, **kw)
    unbatched = {name: t[0] for name, t in kw.items()}
    assert torch.equal(headops.attention(q, k, v, **kw), headops.attention(q, k, v, **unbatched))


def test_per_head_scalar_python_numbers():
    q, k, v = make_qkv(2, 30, 40, 4, 4, 16, F64)
    kw = dict(window=5, sinks=2, gate=0.5, sink_logit=1.0, alpha=0.25, softmax_scale=0.3)
    check_against_reference(q, k, v, **kw)


INT64_MAX = torch.iinfo(torch.int64).max
@pytest.mark.parametrize("window", [-7, 2**62, INT64_MAX - 10, INT64_MAX],
                         ids=["minus7", "2**62", "max-10", "int64_max"])
@pytest.mark.parametrize("causal,Sq,Sk", [(False, 5, 5), (True, 8, 3)], ids=["noncausal", "causal_sq_gt_sk"])
def test_huge_or_negative_window_is_unlimited(causal, Sq, Sk, window):
    q, k, v = make_qkv(1, Sq, Sk, 2, 1, 8, F64)
    unlimited = headops.attention(q, k, v, causal=causal)
    assert_close(headops.attention(q, k, v, causal=causal, window=window), unlimited, 1e-12)
    check_against_reference(q, k, v, causal=causal, window=torch.tensor([window, 3]))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_non_contiguous_per_head_parameters(dtype):
    # per-head values are read through their strides, without a copy where the dtype matches
    B, Sq, Sk, H, D = 2, 40, 300, 4, 16
    q, k, v = make_qkv(B, Sq, Sk, H, 2, D, dtype)
    acc = F64 if dtype == F64 else torch.float32
    kw = dict(
        window=_ints([5, 0, 1, 0, 64, 0, -1, 0])[::2],
        sinks=_ints([[2, 0, 7, 1], [0, 3, 1, 9]]).t().contiguous().t(),  # [B, Hq] with transposed strides
        gate=torch.rand(H, 3, dtype=acc)[:, 1],
        softmax_scale=(torch.rand(B, 2 * H, dtype=acc) + 0.05)[:, ::2],
        sink_logit=torch.randn(H, B, dtype=acc).t(),
        out_scale=torch.randn(D, H, dtype=acc).t(),  # stride along D = H
        out_bias=torch.randn(B, D, H, dtype=acc).transpose(1, 2),
        key_bias=torch.randn(Sk, B, H, dtype=acc).permute(1, 2, 0),
    )
    assert not any(t.is_contiguous() for t in kw.values())
    check_against_reference(q, k, v, **kw)
