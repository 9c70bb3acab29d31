"""Property-based tests (hypothesis) of the 16-bit fast paths against the reference.

test_properties.py draws shapes of at most a dozen tokens in float64 and float32: its calls never
reach the paths that most of a bfloat16 or float16 call takes on a real model, which pack K and V
into tiles (brgemm, or headops' own AMX loops) and, for float16 on AMX without AMX-FP16, split
every operand into two bfloat16 parts once a key is read by enough query rows
(isa_dispatch.h, kHalfSplitRows). Here the draws are shaped for them: query and key lengths
across tile edges (1 to ~300), GQA groups that push the rows per key past that threshold or keep
them under it, head dims of whole AMX tiles and others, both layouts, strided views, and random
subsets of every per-head argument (per head or per batch row).

Each forward matches the float64 reference within the conftest tolerances of its dtype; a
float16 call that takes the two-part split matches it within half a float16 ulp plus 2e-5 of
max|out|. One NaN or +-inf in q, k or v behaves as in the reference. Each backward matches the
reference's gradients within test_autograd's tolerances (and the split's dq, dk, dv within half
an ulp plus 3e-5 where the split runs). A fixed number of derandomized examples keeps CI
bounded; a failure prints its draw (HEADOPS_HYPOTHESIS_EXAMPLES scales them: 1/10 and 1/20 of
it).
"""

import math
import os

import pytest
import torch

import headops

from conftest import (ALL_FEATURES, OUT_ATOL, OUT_RTOL, check_against_reference, half_ulp_excess, head_params,
                      make_qkv, reference_f64)
from test_autograd import grad_errors, grad_tol, kernel_and_reference_grads, round_params

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("HEADOPS_HYPOTHESIS_EXAMPLES", "2000"))
SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HALF = (torch.bfloat16, torch.float16)
# learning these sums dS over a head's rows: a float16 backward that learns one keeps float32
# tiles (attention_bwd_cpu.cpp, backward_splits_half)
SUMS_DS = {"softmax_scale", "key_bias"}


@st.composite
def half_case(draw):
    lengths = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 64, 127,
                                                               128, 129, 255, 256, 257]))
    Sq = draw(lengths)
    Sk = draw(st.one_of(st.just(Sq), lengths))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3, 4, 8]))
    B = draw(st.integers(1, 2))
    D = draw(st.sampled_from([32, 64, 96, 128, 128, 40, 80]))
    features = draw(st.lists(st.sampled_from(ALL_FEATURES + ["alpha"]), unique=True, max_size=5))
    return dict(
        shape=(B, Sq, Sk, Hq, Hkv, D),
        dtype=draw(st.sampled_from(HALF)),
        layout=draw(st.sampled_from(["bshd", "bhsd"])),
        strided=draw(st.booleans()),
        causal=draw(st.booleans()),
        features=sorted(features),
        per_batch=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def inputs(case):
    """q, k, v and the keyword arguments (floating per-head tensors rounded to float32, the values
    a 16-bit call computes with) of one drawn case, from its own seed."""
    torch.manual_seed(case["seed"])
    B, Sq, Sk, Hq, Hkv, D = case["shape"]
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, case["dtype"], case["layout"], case["strided"])
    kw = round_params(head_params(B, Hq, Sk, D, case["features"], per_batch=case["per_batch"]), case["dtype"])
    return q, k, v, dict(kw, causal=case["causal"], layout=case["layout"])


def splits_half(case, learns=()):
    """Whether this case's float16 call runs as two bfloat16 parts on this CPU (forward when
    `learns` is empty, else the backward of a call learning those arguments)."""
    B, Sq, Sk, Hq, Hkv, D = case["shape"]
    return (case["dtype"] == torch.float16 and not SUMS_DS & set(learns)
            and headops._C.cpu_call_splits_half_into_bf16_tiles(D, Sq * (Hq // Hkv)))


@settings(max_examples=max(1, EXAMPLES // 10), **SETTINGS)
@given(half_case())
def test_half_forward_matches_the_reference(case):
    print(case)
    q, k, v, kw = inputs(case)
    out, _ = check_against_reference(q, k, v, **kw)
    if splits_half(case):
        want = reference_f64(q, k, v, **kw)
        if want.abs().max() > 1e-3:
            assert half_ulp_excess(out, want) < 2e-5


@settings(max_examples=max(1, EXAMPLES // 20), **SETTINGS)
@given(half_case())
def test_half_backward_matches_the_reference(case):
    print(case)
    q, k, v, kw = inputs(case)
    got, want = kernel_and_reference_grads(q, k, v, kw)
    assert {got[n].dtype for n in "qkv"} == {case["dtype"]}
    B, Sq, Sk, Hq, Hkv, D = case["shape"]
    rows = Sq * (Hq // Hkv)  # the query rows that read one key
    for name, (err, size) in grad_errors(got, want).items():
        # With one visible key dq, dk and softmax_scale's gradient are 0 in the reference
        # (dP = delta), where the kernel's float dP - delta leaves rounding of their size, which
        # dk sums over the key's rows (1e-4 at 138 rows, D = 32; 1.4e-4 for softmax_scale at one
        # row): far below these gradients' usual size, above GRAD_FLOOR.
        floor = 1e-4 * max(1.0, rows / 16) * (10 if size < 1e-9 else 1)
        assert err <= grad_tol(case["dtype"], name) * size + floor, \
            f"d{name}: max error {err:.3e}, max|ref| {size:.3e}"
    if splits_half(case, learns=[n for n, t in kw.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]):
        for name in "qkv":
            if want[name].abs().max() > 1e-3:
                assert half_ulp_excess(got[name], want[name]) < 3e-5, name


@settings(max_examples=max(1, EXAMPLES // 20), **SETTINGS)
@given(half_case(), st.sampled_from("qkv"), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 10**6))
def test_half_nan_and_inf_inputs_behave_as_in_the_reference(case, which, value, where):
    """One NaN or +-inf in q, k or v of a 16-bit call (test_properties' property, on the packed
    tiles, the own AMX loops, and the float16 call the split hands to brgemm's float16): NaN
    exactly where the reference has it for q and k, at least there for v (an inf value also
    reaches rows of its tile that cannot see its key: 0 * inf), the reference's values elsewhere."""
    print(case, which, value, where)
    q, k, v, kw = inputs(case)
    given_ = {"q": q, "k": k, "v": v}
    poisoned = given_[which].clone(memory_format=torch.contiguous_format)
    poisoned.view(-1)[where % poisoned.numel()] = value
    given_[which] = poisoned
    out = headops.attention(given_["q"], given_["k"], given_["v"], **kw)
    want = reference_f64(given_["q"], given_["k"], given_["v"], **kw)
    nan_out, nan_want = out.isnan(), want.isnan()
    if which == "v":
        assert not (nan_want & ~nan_out).any()
    else:
        assert torch.equal(nan_out, nan_want), \
            f"NaN at {int(nan_out.sum())} places, the reference at {int(nan_want.sum())}"
    finite = ~nan_out & ~nan_want
    scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(out.double()[finite], want[finite], atol=OUT_ATOL[q.dtype] * scale,
                               rtol=OUT_RTOL[q.dtype])
