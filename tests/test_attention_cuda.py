"""The CUDA forward and backward (headops.attention on CUDA tensors) against the float64 reference.

The CPU sweep of test_attention_cpu.py (shapes, layouts, strides, every per-head feature,
rows with no visible key, extreme logits) run on the GPU: inputs are drawn in float64, rounded
to the dtype under test, moved to the GPU, and the oracle runs in float64 on the CPU on the
same rounded values. float64 itself is CPU only, so the float64 cases of the CPU file run here
in float32 (tolerances of conftest.OUT_ATOL / LSE_ATOL for the dtype).

bfloat16/float16 with head dim 64 or 128 and 16-byte aligned rows run the tensor-core kernel;
everything else runs the generic kernel. Tests marked `both_kernels` run once per kernel
(HEADOPS_CUDA_KERNEL=generic forces the generic one).

Gradients (the generic CUDA backward, backward_kernel.cu) are compared with autograd through
headops.reference in float64 on the CPU, on the same rounded inputs, to test_autograd.py's
tolerances (section "gradients" at the end of this file).

Also: planning arguments (window, sinks, gate, alpha) given on the host, the forward with no
device-to-host sync (torch.cuda.set_sync_debug_mode("error")) and captured in a CUDA graph, the
current stream, a non-default device index, the host's kernel choice.

Skipped without a GPU. First run on an H200 (bench/gpu_suite.sh, 2026-12-04): all passing.
"""

import math
import os
import warnings

import pytest
import torch

import headops
from headops import reference

from conftest import ALL_FEATURES as ALL, CUDA_DRY_RUN, CUDA_TEST_DEVICE, LAYOUTS, LSE_ATOL, OUT_ATOL, OUT_RTOL, \
    assert_close, check_lse, gpu_only, head_params, make_qkv, needs_cuda
from test_attention_cpu import FEATURE_CASES, LOWP_CASES, MAX_JUMPS, SHAPES, shape_id

# HEADOPS_TEST_CUDA_DEVICE=cpu: a dry run on the CPU kernel (conftest.CUDA_TEST_DEVICE)
CUDA, DRY_RUN = CUDA_TEST_DEVICE, CUDA_DRY_RUN
pytestmark = needs_cuda

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def synchronize():
    if not DRY_RUN:
        torch.cuda.synchronize()


@pytest.fixture(params=["auto", "generic"])
def kernel(request, monkeypatch):
    """Runs a test with the kernel the inputs choose, then with the generic kernel forced (the
    second run is skipped where "auto" takes the generic kernel already: see only_if_tensor_cores)."""
    if request.param == "generic":
        monkeypatch.setenv("HEADOPS_CUDA_KERNEL", "generic")
    else:
        monkeypatch.delenv("HEADOPS_CUDA_KERNEL", raising=False)
    return request.param


def only_if_tensor_cores(kernel, dtype, D, alpha=False):
    """Skips the forced-generic run of a case whose "auto" run takes the generic kernel anyway
    (float32, head dims other than 64/128): the same kernel twice. Decided by the host's own
    choice function (headops._C.cuda_forward_choice) for an sm_90 GPU with aligned rows; a case
    with unaligned rows still runs twice."""
    if kernel != "generic":
        return
    if not getattr(headops._C, "cuda_compiled", False):
        return
    name = {BF16: "bfloat16", F16: "float16"}.get(dtype, "float32")
    if headops._C.cuda_forward_choice(name, D, alpha, True, 9, 232448) == "generic":
        pytest.skip("auto takes the generic kernel already")


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def on_cuda(q, k, v, kw):
    """Copies of q, k, v (strides kept: a strided view stays a strided view) and the per-head
    arguments on the GPU."""
    def keep_strides(t):
        try:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=CUDA).copy_(t)
        except RuntimeError:  # overlapping or broadcast strides
            return t.to(CUDA)
    return keep_strides(q), keep_strides(k), keep_strides(v), {n: _to(t, CUDA) for n, t in kw.items()}


def check_cuda(q, k, v, *, atol=None, rtol=None, lse_atol=None, **kw):
    """headops.attention on the GPU against the float64 reference on the CPU (same rounded inputs)."""
    dtype = q.dtype
    if dtype == F64:  # float64 is CPU only: the float64 cases run in float32 on the GPU
        q, k, v, dtype = q.to(F32), k.to(F32), v.to(F32), F32
    atol = OUT_ATOL[dtype] if atol is None else atol
    rtol = OUT_RTOL[dtype] if rtol is None else rtol
    want_lse = kw.get("alpha") is None
    qc, kc, vc, kwc = on_cuda(q, k, v, kw)
    got = headops.attention(qc, kc, vc, return_lse=want_lse, **kwc)
    synchronize()
    ref = reference.attention(q.to(F64), k.to(F64), v.to(F64), return_lse=want_lse, **kw)
    if want_lse:
        (got, got_lse), (ref, ref_lse) = got, ref
    assert got.device.type == torch.device(CUDA).type and got.dtype == dtype and got.shape == q.shape
    assert_close(got.cpu(), ref, atol, rtol)
    if want_lse:
        got_lse = got_lse.cpu()
        assert got_lse.dtype == F32
        check_lse(got_lse, ref_lse, q, kw, LSE_ATOL[dtype] if lse_atol is None else lse_atol)
    return got, ref


# --------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_plain(shape, layout, causal, dtype, kernel):
    only_if_tensor_cores(kernel, dtype, shape[-1])
    q, k, v = make_qkv(*shape, dtype, layout)
    check_cuda(q, k, v, causal=causal, layout=layout)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("features", [[], ALL, ALL + ["alpha"]], ids=["plain", "all", "all+alpha"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 7, 7, 4, 4, 64), (1, 127, 300, 8, 2, 80), (2, 70, 33, 4, 1, 33),
                                   (1, 200, 300, 4, 2, 128)], ids=shape_id)
def test_strided_inputs(shape, layout, features, dtype):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = make_qkv(*shape, dtype, layout, strided=True)
    check_cuda(q, k, v, layout=layout, **head_params(B, Hq, Sk, D, features))


# --------------------------------------------------------------------------- one feature at a time


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("Sq,Sk", [(130, 1100), (70, 33)])
@pytest.mark.parametrize("feature", list(FEATURE_CASES))
def test_feature(feature, Sq, Sk, causal, dtype, kernel):
    only_if_tensor_cores(kernel, dtype, 64)
    q, k, v = make_qkv(2, Sq, Sk, 4, 2, 64, dtype)
    # lse to 3e-4 in bfloat16: the CPU kernel (this file's dry run) misses conftest's 1e-4 by a hair
    # on a few rows here (the CPU suite runs these features in float64 only)
    lse_atol = 3e-4 if dtype == BF16 else None
    check_cuda(q, k, v, causal=causal, lse_atol=lse_atol, **FEATURE_CASES[feature](Sk))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: shape_id(c[0]) + "-" + "+".join(c[1] or ["plain"]))
def test_low_precision(case, dtype, kernel):
    shape, features, causal, layout, strided = case
    B, Sq, Sk, Hq, Hkv, D = shape
    only_if_tensor_cores(kernel, dtype, D, "alpha" in (features or []))
    q, k, v = make_qkv(*shape, dtype, layout, strided=strided)
    check_cuda(q, k, v, causal=causal, layout=layout, **head_params(B, Hq, Sk, D, features))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_long_sequences_many_key_blocks(D, dtype, kernel):
    # many 64-key blocks (the cp.async double buffer turns over), query tiles of 128 rows that
    # end mid-tile, streaming heads whose window edges fall inside blocks, alpha in one pass
    B, S, Hq, Hkv = 1, 2100, 8, 2
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, dtype)
    window = torch.tensor([-1, 1024, 100, 1, 64, 65, 3000, 7])
    sinks = torch.tensor([0, 4, 0, 1, 64, 3, 0, 200])
    check_cuda(q, k, v, window=window, sinks=sinks)
    check_cuda(q, k, v, window=window, sinks=sinks, alpha=torch.tensor([0.5, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5, 0.5],
                                                                       dtype=F64))
    check_cuda(q, k, v, causal=False, window=window, sinks=sinks, key_bias=torch.randn(S, dtype=F64),
               sink_logit=torch.randn(Hq, dtype=F64))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_large_logits_stay_finite(dtype, kernel):
    only_if_tensor_cores(kernel, dtype, 64)
    q, k, v = make_qkv(1, 200, 300, 2, 2, 64, dtype)
    q = (q.to(F64) * 30).to(dtype)
    check_cuda(q, k, v, window=torch.tensor([7, -1]), sinks=torch.tensor([2, 0]), lse_atol=2e-3)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("sink", [None, 30.0], ids=["no_sink", "sink_logit"])
@pytest.mark.parametrize("jumps", list(MAX_JUMPS))
def test_running_max_jumps_across_key_blocks(jumps, sink, dtype, kernel):
    only_if_tensor_cores(kernel, dtype, 64)
    Sk = 200 * len(MAX_JUMPS[jumps])
    key_bias = torch.tensor(MAX_JUMPS[jumps], dtype=F64).repeat_interleave(200)
    q, k, v = make_qkv(1, 40, Sk, 2, 1, 64, dtype)
    extra = {} if sink is None else dict(sink_logit=torch.tensor([sink, -sink - 20], dtype=F64))
    check_cuda(q, k, v, causal=False, key_bias=key_bias, **extra)
    check_cuda(q, k, v, causal=True, key_bias=key_bias, window=torch.tensor([-1, 450]), **extra)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_extreme_sink_logits_and_key_bias(causal, dtype, kernel):
    only_if_tensor_cores(kernel, dtype, 64)
    q, k, v = make_qkv(2, 70, 1100, 4, 2, 64, dtype)
    key_bias = torch.zeros(1100, dtype=F64)
    key_bias[[3, 600, 1099]] = -1e4
    check_cuda(q, k, v, causal=causal, sink_logit=torch.tensor([-1e30, -math.inf, 1e4, 80.0], dtype=F64),
               key_bias=key_bias, window=torch.tensor([-1, 300, 5, 1]))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_infinite_sink_logit_takes_the_row(dtype, kernel):
    # a +inf sink: o = 0 and lse = +inf in every row, also where the keys come in two ranges
    # (sinks + window) and the running max is moved between two +inf values
    only_if_tensor_cores(kernel, dtype, 64)
    q, k, v = make_qkv(1, 90, 300, 4, 2, 64, dtype)
    check_cuda(q, k, v, causal=True, sink_logit=torch.tensor([math.inf, 0.5, math.inf, -1.0], dtype=F64),
               window=torch.tensor([2, 40, 100, -1]), sinks=torch.tensor([1, 4, 0, 0]))


# --------------------------------------------------------------------------- rows with no visible key


def _no_key_case(name):
    if name == "causal_sq_gt_sk":
        return 5, 2, dict(causal=True), slice(0, 3)
    if name == "noncausal_window_far":
        return 20, 5, dict(causal=False, window=3), slice(0, 13)
    if name == "key_bias_all_minus_inf":
        return 6, 9, dict(causal=False, key_bias=torch.full((9,), float("-inf"), dtype=F64)), slice(0, 6)
    raise KeyError(name)


@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("with_sink", [False, True], ids=["plain", "sink_logit"])
@pytest.mark.parametrize("case", ["causal_sq_gt_sk", "noncausal_window_far", "key_bias_all_minus_inf"])
def test_rows_without_visible_key(case, with_sink, dtype, D):
    Sq, Sk, kw, rows = _no_key_case(case)
    q, k, v = make_qkv(1, Sq, Sk, 2, 1, D, dtype)
    gate = torch.tensor([0.5, -2.0], dtype=F64)
    bias = torch.randn(2, D, dtype=F64)
    logit = torch.tensor([0.25, -1.5], dtype=F64)
    extra = dict(sink_logit=logit) if with_sink else {}
    all_kw = dict(gate=gate, out_bias=bias, out_scale=torch.randn(2, D, dtype=F64), **kw, **extra)
    qc, kc, vc, kwc = on_cuda(q, k, v, all_kw)
    out, lse = headops.attention(qc, kc, vc, return_lse=True, **kwc)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    want = (gate.to(F32).view(2, 1) * bias.to(F32)).to(dtype).expand(out[0, rows].shape)
    assert torch.equal(out[0, rows], want)
    lse_rows = lse[0, :, rows]
    if with_sink:
        # the tensor-core kernel keeps the max in log2 units: the sink comes back to ~1 ulp
        torch.testing.assert_close(lse_rows, logit.to(F32).view(2, 1).expand_as(lse_rows), atol=1e-6, rtol=1e-6)
    else:
        assert torch.isneginf(lse_rows).all()
    check_cuda(q, k, v, gate=gate, out_bias=bias, **kw, **extra)


def test_empty_keys_and_queries():
    q = torch.randn(2, 3, 4, 8, device=CUDA)
    k = v = torch.empty(2, 0, 2, 8, device=CUDA)
    bias = torch.randn(4, 8, device=CUDA)
    out, lse = headops.attention(q, k, v, out_bias=bias, return_lse=True)
    assert torch.equal(out, bias.expand(2, 3, 4, 8))
    assert torch.isneginf(lse).all()
    q = torch.randn(2, 0, 4, 8, device=CUDA)
    k = v = torch.randn(2, 5, 2, 8, device=CUDA)
    out, lse = headops.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)


# --------------------------------------------------------------------------- kernels, devices, contract


@gpu_only
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_learning_a_cancelling_sum_runs_the_generic_kernel(dtype, monkeypatch):
    # precise_probabilities (headops.attention asks for it when softmax_scale, sink_logit or alpha
    # is learnt): the generic kernel, whose P V reads float P
    q, k, v = (t.to(CUDA) for t in make_qkv(1, 160, 160, 2, 2, 128, dtype))
    sink = torch.tensor([0.5, -1.0], device=CUDA)
    learnt = headops.attention(q, k, v, sink_logit=sink.clone().requires_grad_())
    plain = headops.attention(q, k, v, sink_logit=sink)
    monkeypatch.setenv("HEADOPS_CUDA_KERNEL", "generic")
    assert torch.equal(learnt, headops.attention(q, k, v, sink_logit=sink))
    assert not torch.equal(plain, learnt)  # the tensor-core kernel rounds P


@gpu_only
def test_kernel_choice():
    q, k, v = (t.to(CUDA) for t in make_qkv(1, 16, 16, 2, 2, 128, BF16))
    assert headops._C.cuda_kernel_for(q, k, v, False) == "tensor_core"
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert headops._C.cuda_kernel_for(q32, k32, v32, False) == "generic"
    # rows not 16-byte aligned: made on the GPU (.to(CUDA) of a strided view copies it contiguous)
    qs, ks, vs = (torch.randn(1, 16, 2, 132, dtype=BF16, device=CUDA)[..., 1:129] for _ in range(3))
    assert headops._C.cuda_kernel_for(qs, ks, vs, False) == "generic"
    q80, k80, v80 = (t.to(CUDA) for t in make_qkv(1, 16, 16, 2, 2, 80, BF16))
    assert headops._C.cuda_kernel_for(q80, k80, v80, False) == "generic"


@gpu_only
def test_gated_heads_are_not_computed():
    """The host plan: the counters are counted on the host from the work list the kernels get (the
    kernels count nothing), so this checks the plan -- and, from the output, that a skipped head
    was written by the skipped-heads kernel (zeros, -inf), not computed."""
    q, k, v = (t.to(CUDA) for t in make_qkv(2, 300, 300, 8, 2, 128, BF16))
    gate = torch.tensor([1.0, 0.0] * 4, device=CUDA)
    with headops.count_work() as w:
        out, lse = headops.attention(q, k, v, gate=gate, return_lse=True)
    assert w.heads_skipped == 2 * 4
    assert w.work_items == 2 * 4 * 3  # 300 rows = 3 tiles of 128
    assert torch.equal(out[:, :, 1::2], torch.zeros_like(out[:, :, 1::2]))
    assert torch.isneginf(lse[:, 1::2]).all()


@gpu_only
def test_window_walks_only_visible_blocks():
    """The host plan (counters from the work list, not from the kernels): a windowed head's items
    walk only the key blocks its window and sinks reach."""
    S, w = 4096, 256
    q, k, v = (t.to(CUDA) for t in make_qkv(1, S, S, 1, 1, 128, BF16))
    with headops.count_work() as dense:
        headops.attention(q, k, v)
    with headops.count_work() as windowed:
        headops.attention(q, k, v, window=w, sinks=4)
    assert windowed.key_blocks * 4 < dense.key_blocks
    assert windowed.score_elements <= S * (w + 128 + 64 + 4)


@gpu_only
def test_float64_refused():
    q, k, v = (t.to(CUDA) for t in make_qkv(1, 4, 4, 2, 2, 8, F64))
    with pytest.raises(TypeError, match="float64 is CPU only"):
        headops.attention(q, k, v)


@gpu_only
def test_parameters_on_another_device_refused():
    q, k, v = (t.to(CUDA) for t in make_qkv(1, 4, 4, 2, 2, 8, F32))
    # the planning arguments (window, sinks, gate, alpha) may be on the host; the others may not
    with pytest.raises(ValueError, match="sink_logit must be on q's device"):
        headops.attention(q, k, v, sink_logit=torch.ones(2))
    with pytest.raises(ValueError, match="gate must be on q's device .* when it requires grad"):
        headops.attention(q, k, v, gate=torch.ones(2, requires_grad=True))
    with pytest.raises(RuntimeError, match="sink_logit must be on"):  # the raw op checks too
        torch.ops.headops.attention_fwd(q, k, v, True, False, 1.0, None, None, None, None, None,
                                        torch.ones(1, 2), None, None, None, True, True, False)


def test_planning_arguments_on_the_host_match_the_device():
    """window, sinks, gate and alpha as CPU tensors (read by the host, no sync; their values reach
    the kernel in the uploaded work list) give what the same tensors on the GPU give, bit for bit."""
    B, S, Hq, Hkv, D = 2, 300, 8, 2, 64
    q, k, v = (t.to(CUDA) for t in make_qkv(B, S, S, Hq, Hkv, D, BF16))
    host = dict(window=torch.tensor([-1, 64, 7, 300, 1, 128, -1, 33]), sinks=torch.tensor([0, 4, 2, 0, 1, 0, 9, 3]),
                gate=torch.tensor([[1.0, 0.0, 0.5, -1.0, 1.0, 1.0, 0.0, 2.0]] * B),
                alpha=torch.tensor([0.0, 0.5, 1.0, 0.25, 0.0, 0.0, 0.5, 1.0]))
    device = {n: t.to(CUDA) for n, t in host.items()}
    extra = dict(out_scale=torch.randn(Hq, D, device=CUDA), softmax_scale=0.2)
    got = headops.attention(q, k, v, **host, **extra)
    want = headops.attention(q, k, v, **device, **extra)
    assert torch.equal(got, want)
    # numbers for planning arguments stay on the host too
    assert torch.equal(headops.attention(q, k, v, window=64, sinks=4, gate=0.5),
                       headops.attention(q, k, v, window=host["window"][1:2].expand(Hq).contiguous(),
                                         sinks=torch.full((Hq,), 4), gate=torch.full((Hq,), 0.5)))
    # gradients with planning arguments on the host (window/sinks/alpha/gate without grad)
    qg = q.float().requires_grad_()
    out = headops.attention(qg, k.float(), v.float(), **host)
    (dq,) = torch.autograd.grad(out.sum(), qg)
    qd = q.float().requires_grad_()
    (dq_device,) = torch.autograd.grad(headops.attention(qd, k.float(), v.float(), **device).sum(), qd)
    assert torch.equal(dq, dq_device)


@gpu_only
def test_forward_with_host_planning_does_not_synchronise():
    """torch.cuda.set_sync_debug_mode("error") around forwards whose planning arguments are on the
    host (and other per-head arguments on the GPU that have no value rule): nothing waits for the
    device. Both uploads: the pinned copy and the kernel-parameter one (HEADOPS_CUDA_UPLOAD)."""
    B, S, Hq, Hkv, D = 1, 700, 8, 2, 128
    q, k, v = (t.to(CUDA) for t in make_qkv(B, S, S, Hq, Hkv, D, BF16))
    kw = dict(window=torch.tensor([-1, 256] * 4), sinks=torch.tensor([0, 4] * 4),
              gate=torch.tensor([1.0, 0.0, 1.0, 0.5] * 2), out_scale=torch.randn(Hq, D, device=CUDA),
              out_bias=torch.randn(Hq, D, device=CUDA))
    headops.attention(q, k, v, **kw)  # warm-up (allocator, pinned host pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = headops.attention(q, k, v, **kw)
        out_alpha = headops.attention(q, k, v, alpha=torch.full((Hq,), 0.5), **kw)
        out_numbers = headops.attention(q, k, v, window=256, sinks=4, softmax_scale=0.1)
        os.environ["HEADOPS_CUDA_UPLOAD"] = "kernel"
        out_kernel_upload = headops.attention(q, k, v, **kw)
    finally:
        os.environ.pop("HEADOPS_CUDA_UPLOAD", None)
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(out, out_kernel_upload)
    assert torch.isfinite(out_alpha).all() and torch.isfinite(out_numbers).all()


@gpu_only
def test_kernel_parameter_upload_matches_the_pinned_copy(monkeypatch):
    # a work list of several 1000-word chunks, skipped heads and every planning value on the host
    B, S, Hq, Hkv, D = 2, 2100, 8, 2, 64
    q, k, v = (t.to(CUDA) for t in make_qkv(B, S, S, Hq, Hkv, D, BF16))
    kw = dict(window=torch.tensor([-1, 100, 7, 2100, 1, 128, -1, 33]), sinks=torch.tensor([0, 4, 2, 0, 1, 0, 9, 3]),
              gate=torch.tensor([1.0, 0.0, 0.5, -1.0, 1.0, 1.0, 0.0, 2.0]),
              alpha=torch.tensor([0.0, 0.5, 1.0, 0.25, 0.0, 0.0, 0.5, 1.0]))
    want = headops.attention(q, k, v, **kw)
    monkeypatch.setenv("HEADOPS_CUDA_UPLOAD", "kernel")
    got = headops.attention(q, k, v, **kw)
    assert torch.equal(got, want)


@gpu_only
def test_forward_captured_in_a_cuda_graph():
    """A forward captured in a torch.cuda.CUDAGraph (work list uploaded through kernel parameters,
    planning values from the host baked in at capture) replays equal to eager, and a replay reads
    new values written into the captured inputs."""
    B, S, Hq, Hkv, D = 1, 300, 8, 2, 128
    q, k, v = (t.to(CUDA) for t in make_qkv(B, S, S, Hq, Hkv, D, BF16))
    kw = dict(window=torch.tensor([-1, 64] * 4), sinks=torch.tensor([0, 4] * 4),
              gate=torch.tensor([1.0, 0.0, 1.0, 0.5] * 2), alpha=torch.tensor([0.0, 0.5] * 4),
              sink_logit=torch.randn(Hq, device=CUDA), out_scale=torch.randn(Hq, D, device=CUDA))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        headops.attention(q, k, v, **kw)  # warm-up outside the capture (shared memory opt-in, allocator)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = headops.attention(q, k, v, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, headops.attention(q, k, v, **kw))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, headops.attention(q, k, v, **kw))


@gpu_only
def test_device_planning_argument_under_capture_is_refused_by_name():
    """window on the GPU during a graph's capture: the host cannot read it without a sync, so the
    call says which argument to pass on the CPU instead of failing inside the copy."""
    q, k, v = (t.to(CUDA) for t in make_qkv(1, 64, 64, 2, 2, 64, BF16))
    window = torch.tensor([-1, 16], device=CUDA)
    headops.attention(q, k, v, window=torch.tensor([-1, 16]))  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="window is read on the host"):
        with torch.cuda.graph(graph):
            headops.attention(q, k, v, window=window)


@gpu_only
def test_inputs_not_modified_and_current_stream_used():
    """The side stream is busy (a sleep, then the copy of the query) when headops is called on it:
    a kernel launched on any other stream would read the query before the copy lands."""
    q, k, v = (t.to(CUDA) for t in make_qkv(2, 65, 130, 4, 2, 64, BF16))
    kw = {n: _to(t, CUDA) for n, t in head_params(2, 4, 130, 64, ALL).items()}
    kw.update(window=torch.tensor([-1, 40, 7, -1]), sinks=torch.tensor([0, 2, 1, 0]))  # planning on the host
    new_q = torch.randn_like(q)
    saved = [t.clone() for t in (k, v, new_q, *kw.values())]
    expected = headops.attention(new_q, k, v, **kw)
    target = torch.zeros_like(q)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copy
        target.copy_(new_q)
        got = headops.attention(target, k, v, **kw)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)  # deterministic: one CTA per item, no atomics
    for before, after in zip(saved, (k, v, new_q, *kw.values())):
        assert torch.equal(before, after)


@pytest.mark.skipif(DRY_RUN or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_non_default_device_index():
    """q, k, v on cuda:1 while cuda:0 is current: the ops guard the device (allocations, launches,
    the upload) and give what cuda:0 gives; planning arguments on the host and on cuda:1."""
    q, k, v = make_qkv(1, 200, 200, 4, 2, 64, BF16)
    kw = dict(window=torch.tensor([-1, 32, 7, -1]), sinks=torch.tensor([0, 2, 1, 0]), gate=torch.tensor([1.0, 0.0, 1.0, 2.0]))
    assert torch.cuda.current_device() == 0
    want = headops.attention(q.to("cuda:0"), k.to("cuda:0"), v.to("cuda:0"), **kw).cpu()
    q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
    got_host = headops.attention(q1, k1, v1, **kw)
    got_dev = headops.attention(q1, k1, v1, **{n: t.to("cuda:1") for n, t in kw.items()})
    assert got_host.device == torch.device("cuda:1")
    assert torch.equal(got_host.cpu(), want) and torch.equal(got_dev.cpu(), want)
    qg = q1.float().requires_grad_()
    (dq,) = torch.autograd.grad(headops.attention(qg, k1.float(), v1.float(), **kw).sum(), qg)
    assert dq.device == torch.device("cuda:1") and torch.isfinite(dq).all()


@pytest.mark.skipif(not getattr(headops._C, "cuda_compiled", False), reason="a build without the CUDA kernels")
def test_alpha_d128_falls_back_to_generic_where_shared_memory_is_short():
    """The host's kernel choice as a pure function (no GPU needed): the tensor-core D = 128 variant
    with alpha needs 100.25 KiB of shared memory, past the 99 KiB that sm_86/sm_89 offer per block,
    so those GPUs run it on the generic kernel; sm_80 and sm_90 take the tensor-core one."""
    choice = headops._C.cuda_forward_choice
    sm80, sm86, sm89, sm90 = (8, 166912), (8, 101376), (8, 101376), (9, 232448)
    for major, optin in (sm80, sm90):
        assert choice("bfloat16", 128, True, True, major, optin) == "tensor_core"
    for major, optin in (sm86, sm89):
        assert choice("bfloat16", 128, True, True, major, optin) == "generic"
        assert choice("float16", 128, True, True, major, optin) == "generic"
        assert choice("bfloat16", 128, False, True, major, optin) == "tensor_core"
        assert choice("bfloat16", 64, True, True, major, optin) == "tensor_core"
    assert choice("float32", 128, False, True, 9, 232448) == "generic"
    assert choice("bfloat16", 80, False, True, 9, 232448) == "generic"
    assert choice("bfloat16", 128, False, False, 9, 232448) == "generic"  # rows not 16-byte aligned
    assert choice("bfloat16", 128, False, True, 7, 232448) == "generic"  # below sm_80


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("D", [264, 512])
@pytest.mark.parametrize("features", [[], ALL + ["alpha"]], ids=["plain", "all+alpha"])
def test_head_dims_past_256(features, D, dtype):
    """Gemma 4's full-attention layers' head dim (512) and one just past 256: the generic kernel's
    wide variant (16 output columns a lane; 161 KiB of shared memory at D = 512, opted in per
    launch), over several key blocks, a GQA group and every per-head feature, as the reference."""
    B, Sq, Sk, Hq, Hkv = 2, 37, 70, 4, 2
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    check_cuda(q, k, v, causal=True, **head_params(B, Hq, Sk, D, features))


def test_gqa_head_mapping():
    B, S, Hq, Hkv, D = 1, 4, 8, 2, 64
    q, k, _ = make_qkv(B, S, S, Hq, Hkv, D, BF16)
    v = torch.arange(Hkv, dtype=BF16).view(1, 1, Hkv, 1).expand(B, S, Hkv, D).contiguous()
    out = headops.attention(q.to(CUDA), k.to(CUDA), v.to(CUDA)).cpu()
    want = (torch.arange(Hq) // (Hq // Hkv)).to(F64).view(1, 1, Hq, 1).expand_as(out)
    # P is rounded to bf16 before P V while the row sum is not: v is reproduced to bf16 accuracy
    assert_close(out, want, OUT_ATOL[BF16], OUT_RTOL[BF16])


def test_matches_cpu_kernel():
    # the same rounded bf16 inputs through both devices' kernels
    q, k, v = make_qkv(2, 300, 513, 4, 2, 128, BF16)
    kw = head_params(2, 4, 513, 128, ALL + ["alpha"])
    cpu = headops.attention(q, k, v, **kw).to(F64)
    qc, kc, vc, kwc = on_cuda(q, k, v, kw)
    gpu = headops.attention(qc, kc, vc, **kwc).cpu().to(F64)
    assert_close(gpu, cpu, 2 * OUT_ATOL[BF16], 2 * OUT_RTOL[BF16])


# --------------------------------------------------------------------------- gradients
# The CUDA backward (backward_kernel.cu, generic float32 kernel) against autograd through the
# float64 reference on the CPU, on the same rounded inputs; tolerances of test_autograd.py.

from test_autograd import (GRAD_FLOOR, PARAMS, assert_grads_close, grad_errors, grad_tol, grads,  # noqa: E402
                           random_cotangents, round_params)


def cuda_and_reference_grads(q, k, v, kw, *, with_lse=False, **opts):
    """Gradients of sum(out * dout) [+ sum(lse * dlse)] through headops.attention on the GPU and
    through the float64 reference on the CPU (per-head tensors rounded to float32 for both)."""
    kw = round_params(kw, q.dtype)
    dout, dlse = random_cotangents(q, kw.get("layout", "bshd"), with_lse)
    qc, kc, vc, kwc = on_cuda(q, k, v, kw)
    got = grads(headops.attention, qc, kc, vc, kwc, dout.to(CUDA), None if dlse is None else dlse.to(CUDA), **opts)
    synchronize()
    got = {n: t.cpu() for n, t in got.items()}
    want = grads(reference.attention, *(t.to(F64) for t in (q, k, v)), kw, dout, dlse, **opts)
    return got, want


def cuda_grad_tol(dtype, name):
    """test_autograd's tolerances, except float16 per-head gradients: the CPU forward keeps P in
    float32 for float16, the CUDA tensor-core forward rounds it to float16 before P V (as for
    bfloat16), and the saved averages enter every per-head gradient. Not yet measured on a GPU."""
    tol = grad_tol(dtype, name)
    if dtype == F16 and not DRY_RUN:
        tol = max(tol, 1e-2 if name in ("alpha", "sink_logit", "softmax_scale") else 1.5e-3)
    return tol


def check_cuda_grads(q, k, v, *, with_lse=False, params=PARAMS, **kw):
    got, want = cuda_and_reference_grads(q, k, v, kw, with_lse=with_lse, params=params)
    errs = grad_errors(got, want)
    print("error / max|ref|: " + " ".join(f"{n}={e / m if m else e:.1e}" for n, (e, m) in errs.items()))
    for n, (err, scale) in errs.items():
        t = cuda_grad_tol(q.dtype, n)
        assert err <= t * scale + GRAD_FLOOR[q.dtype], \
            f"d{n}: max error {err:.3e} > {t:g} * max|ref| ({scale:.3e}) [{q.dtype}]"
    return got, want


GRAD_CASES = [
    (2, 7, 7, 4, 4, 64),
    (1, 70, 150, 4, 2, 24),  # Sq < Sk, GQA
    (2, 45, 17, 4, 2, 5),  # Sq > Sk: causal rows with no visible key; odd head dim
    (1, 1, 90, 4, 1, 32),  # a decode step, MQA
    (1, 40, 40, 2, 1, 128),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("features", [[], ALL, ALL + ["alpha"]], ids=["plain", "all", "all+alpha"])
@pytest.mark.parametrize("shape", GRAD_CASES, ids=shape_id)
def test_grads_float32(shape, features, causal, layout):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = make_qkv(*shape, F32, layout)
    check_cuda_grads(q, k, v, causal=causal, layout=layout, **head_params(B, Hq, Sk, D, features))


@pytest.mark.parametrize("features", [[], ALL + ["alpha"]], ids=["plain", "all+alpha"])
def test_grads_head_dim_512(features):
    """The backward at Gemma 4's full-attention head dim (its passes keep a row of D floats per warp
    in shared memory) after the wide forward, against the reference."""
    B, Sq, Sk, Hq, Hkv, D = 1, 21, 40, 4, 2, 512
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F32)
    check_cuda_grads(q, k, v, causal=True, **head_params(B, Hq, Sk, D, features))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("features", [[], ALL + ["alpha"]], ids=["plain", "all+alpha"])
@pytest.mark.parametrize("shape", [(2, 33, 65, 4, 2, 64), (1, 50, 50, 2, 2, 128), (1, 20, 31, 2, 1, 40)],
                         ids=shape_id)
def test_grads_low_precision(shape, features, dtype, kernel):
    # the saved averages come from the tensor-core forward or the generic one (the kernel fixture).
    # sink_logit's gradient is one sum over a head's rows whose terms cancel: relative to its
    # size the low-precision forward's rounding is unbounded (0.55 seen on the CPU kernel in
    # bfloat16 here); it is compared in float32 (test_grads_float32)
    B, Sq, Sk, Hq, Hkv, D = shape
    only_if_tensor_cores(kernel, dtype, D, "alpha" in features)
    q, k, v = make_qkv(*shape, dtype)
    check_cuda_grads(q, k, v, params=tuple(n for n in PARAMS if n != "sink_logit"),
                     **head_params(B, Hq, Sk, D, features))


@pytest.mark.parametrize("features", [[], ALL], ids=["plain", "all"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_grads_through_lse(causal, features):
    q, k, v = make_qkv(2, 30, 50, 4, 2, 16, F32)
    check_cuda_grads(q, k, v, with_lse=True, causal=causal, **head_params(2, 4, 50, 16, features))


def test_grads_per_batch_strided():
    B, Sq, Sk, Hq, Hkv, D = 2, 40, 70, 4, 2, 24
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F32, "bhsd", strided=True)
    check_cuda_grads(q, k, v, layout="bhsd", **head_params(B, Hq, Sk, D, ALL + ["alpha"], per_batch=True))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_grads_alpha_exactly_0_and_1(alpha):
    q, k, v = make_qkv(1, 30, 30, 2, 2, 16, F32)
    check_cuda_grads(q, k, v, alpha=torch.full((2,), alpha, dtype=F64), window=4, sinks=2)


def test_grads_gate_exactly_0():
    # with the gate's gradient wanted the head is computed; without, it is skipped (q, k, v only)
    q, k, v = make_qkv(1, 20, 20, 4, 2, 16, F32)
    gate = torch.tensor([1.0, 0.0, -0.5, 0.0], dtype=F64)
    check_cuda_grads(q, k, v, gate=gate)
    got, want = cuda_and_reference_grads(q, k, v, {"gate": gate}, params=())
    assert_grads_close(got, want, F32)


def test_grads_rows_without_visible_key():
    # Sq > Sk non-causal with a short window: some rows see no key at all
    q, k, v = make_qkv(1, 40, 10, 2, 1, 8, F32)
    check_cuda_grads(q, k, v, causal=False, window=3, sink_logit=0.5)
    check_cuda_grads(q, k, v, causal=True, window=2, sinks=1, key_bias=torch.randn(2, 10, dtype=F64))


@gpu_only
def test_backward_is_deterministic():
    q, k, v = (t.to(CUDA) for t in make_qkv(2, 100, 130, 4, 2, 64, BF16))
    kw = {n: _to(t, CUDA) for n, t in head_params(2, 4, 130, 64, ALL + ["alpha"]).items()}
    dout = torch.randn(q.shape, device=CUDA, dtype=BF16)

    def run():
        leaves_ = [t.detach().requires_grad_() for t in (q, k, v)]
        params = {n: (t.detach().float().requires_grad_() if t.is_floating_point() else t) for n, t in kw.items()}
        out = headops.attention(*leaves_, **params)
        return torch.autograd.grad((out.float() * dout.float()).sum(),
                                   leaves_ + [t for t in params.values() if t.requires_grad])

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # no atomics: a fixed order of every sum


@gpu_only
def test_backward_uses_current_stream():
    q, k, v = (t.to(CUDA).requires_grad_() for t in make_qkv(1, 64, 64, 2, 2, 32, F32))
    expected = torch.autograd.grad(headops.attention(q, k, v).sum(), (q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = torch.autograd.grad(headops.attention(q, k, v).sum(), (q, k, v))
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@gpu_only
def test_the_cuda_backward_says_once_what_it_costs():
    from headops import _autograd

    _autograd.warn_cuda_backward.cache_clear()
    q = torch.randn(1, 8, 2, 64, device=CUDA, requires_grad=True)
    with pytest.warns(UserWarning, match="reference-speed kernel"):
        headops.attention(q, q.detach(), q.detach()).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        headops.attention(q, q.detach(), q.detach()).sum().backward()  # once per process


# --------------------------------------------------------------------------- packed rows


def packed_ids(lengths_per_row):
    return torch.stack([torch.arange(len(row)).repeat_interleave(torch.tensor(row)) for row in lengths_per_row])


@pytest.mark.parametrize("ids_on", ["host", "device"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_packed_rows(dtype, ids_on):
    """sequence_ids (a CPU tensor beside CUDA q, or on the device: one copy to the host) over rows
    packed unlike, both kernels' head dims: each sequence alone, as the float64 reference."""
    B, S, Hq, Hkv, D = 2, 300, 4, 2, 128
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, S, D, ["window", "sinks", "gate", "key_bias", "out_scale"])
    ids = packed_ids([[100, 100, 37, 63], [300]])
    qc, kc, vc, kwc = on_cuda(q, k, v, kw)
    got = headops.attention(qc, kc, vc, sequence_ids=ids if ids_on == "host" else ids.to(CUDA), **kwc)
    synchronize()
    want = reference.attention(*(t.to(F64) for t in (q, k, v)), sequence_ids=ids, **kw)
    assert_close(got.cpu(), want, OUT_ATOL[dtype], OUT_RTOL[dtype])


def test_grads_packed_rows():
    """The CUDA backward over packed rows: every gradient as autograd through the reference."""
    B, S, Hq, Hkv, D = 2, 40, 4, 2, 32
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, F32)
    check_cuda_grads(q, k, v, sequence_ids=packed_ids([[10, 10, 20], [7, 33]]), **head_params(B, Hq, S, D, ALL))


@gpu_only
def test_device_sequence_ids_under_capture_are_refused_by_name():
    """sequence_ids on the GPU during a graph's capture: read on the host, which a capture cannot
    do; the error says to pass them on the CPU."""
    q, k, v = (t.to(CUDA) for t in make_qkv(1, 64, 64, 2, 2, 64, BF16))
    ids = packed_ids([[32, 32]])
    on_device = ids.to(CUDA)
    headops.attention(q, k, v, sequence_ids=ids)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="sequence_ids on the GPU are read on the host"):
        with torch.cuda.graph(graph):
            headops.attention(q, k, v, sequence_ids=on_device)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_key_lengths(dtype):
    """key_lengths over a buffer (rows of different lengths, lengths on the host and on the
    device): each row over its keys, as the float64 reference; the backward's unread slots 0."""
    B, Sq, Sk, Hq, Hkv, D = 3, 4, 300, 4, 2, 128
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ["window", "sinks", "gate", "key_bias"])
    lengths = torch.tensor([37, 300, 129])
    qc, kc, vc, kwc = on_cuda(q, k, v, kw)
    want = reference.attention(*(t.to(F64) for t in (q, k, v)), key_lengths=lengths, **kw)
    for given in (lengths, lengths.to(CUDA)):
        got = headops.attention(qc, kc, vc, key_lengths=given, **kwc)
        synchronize()
        assert_close(got.cpu(), want, OUT_ATOL[dtype], OUT_RTOL[dtype])


def test_grads_key_lengths():
    B, Sq, Sk, Hq, Hkv, D = 2, 5, 40, 4, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F32)
    check_cuda_grads(q, k, v, key_lengths=torch.tensor([17, 33]), **head_params(B, Hq, Sk, D, ALL))


@pytest.mark.parametrize("dims", [(192, 128), (64, 96)], ids=["D192_Dv128", "D64_Dv96"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_values_of_another_head_dim(dims, dtype):
    """Multi-head latent attention's shapes (DeepSeek: q and k of 192 dims, v of 128; and wider
    values): the padded call on the device against the float64 reference; in float32 the
    gradients of q, k and v too."""
    D, Dv = dims
    B, S, Hq, Hkv = 1, 150, 4, 2
    q, k, _ = make_qkv(B, S, S, Hq, Hkv, D, dtype)
    v = torch.randn(B, S, Hkv, Dv, dtype=F64).to(dtype)
    kw = head_params(B, Hq, S, Dv, ["window", "sinks", "out_scale", "gate"])
    qc, kc, vc, kwc = on_cuda(q, k, v, kw)
    got = headops.attention(qc, kc, vc, **kwc)
    synchronize()
    want = reference.attention(q.to(F64), k.to(F64), v.to(F64), **kw)
    assert got.shape == (B, S, Hq, Dv)
    assert_close(got.cpu(), want, OUT_ATOL[dtype], OUT_RTOL[dtype])
    if dtype == F32:
        leaves = [t.requires_grad_(True) for t in (qc, kc, vc)]
        got_grads = torch.autograd.grad(headops.attention(*leaves, **kwc).square().sum(), leaves)
        ref_leaves = [t.to(F64).requires_grad_(True) for t in (q, k, v)]
        want_grads = torch.autograd.grad(reference.attention(*ref_leaves, **kw).square().sum(), ref_leaves)
        for name, a, b in zip("qkv", got_grads, want_grads):
            assert a.shape == b.shape
            assert_close(a.cpu(), b, 1e-4 * b.abs().max().item() + 1e-5, what=f"d{name}")
