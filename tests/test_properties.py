"""Property-based tests (hypothesis) of headops.attention against the reference.

Random shapes (empty batch and sequences, Sq > Sk, Sq = 1, head dims 1..70, GQA/MQA), both
layouts, transposed (strided) views, float64 and float32, and random subsets of every per-head
argument in each accepted form. Every case matches headops.reference.attention (NaN never where
the reference has none). A fixed number of examples with a printed seed keeps CI bounded
(HEADOPS_HYPOTHESIS_EXAMPLES raises it for a longer run).
"""

import math
import os

import pytest
import torch

import headops
from headops import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("HEADOPS_HYPOTHESIS_EXAMPLES", "2000"))
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (3e-5, 1e-4)}


@st.composite
def attention_case(draw):
    B = draw(st.integers(0, 2))
    Sq = draw(st.integers(0, 9))
    Sk = draw(st.integers(0, 11))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 17, 32, 64, 70]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    layout = draw(st.sampled_from(["bshd", "bhsd"]))
    causal = draw(st.booleans())
    strided = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def tensor(S, H):
        if strided:  # stored in the other layout, then transposed: a view with other strides
            other = (B, H, S, D) if layout == "bshd" else (B, S, H, D)
            return torch.randn(other, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
        shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v = tensor(Sq, Hq), tensor(Sk, Hkv), tensor(Sk, Hkv)
    kw = {}

    def per_head(values, integer=False):
        form = draw(st.sampled_from(["scalar", "heads", "batch"]))
        dt = torch.int64 if integer else torch.float64
        if form == "scalar":
            return values[0]
        if form == "heads":
            return torch.tensor(values[:Hq] + [values[0]] * max(0, Hq - len(values)), dtype=dt)[:Hq]
        return torch.tensor([values[:1] * Hq] * max(B, 1), dtype=dt)[:max(B, 1)] if B <= 1 else torch.tensor(
            [[values[(b + h) % len(values)] for h in range(Hq)] for b in range(B)], dtype=dt)

    if draw(st.booleans()):
        kw["window"] = per_head(draw(st.lists(st.sampled_from([-1, 1, 2, 3, 5, 8, 100]), min_size=1, max_size=6)),
                                integer=True)
    if draw(st.booleans()):
        kw["sinks"] = per_head(draw(st.lists(st.integers(0, 4), min_size=1, max_size=6)), integer=True)
    if draw(st.booleans()):
        kw["gate"] = per_head(draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, -2.0]), min_size=1, max_size=6)))
    if draw(st.booleans()):
        kw["softmax_scale"] = per_head(draw(st.lists(st.floats(0.05, 2.0), min_size=1, max_size=6)))
    if draw(st.booleans()):
        kw["sink_logit"] = per_head(draw(st.lists(st.sampled_from([-math.inf, -3.0, 0.0, 2.5]), min_size=1,
                                                  max_size=6)))
    alpha = draw(st.booleans())
    if alpha:
        kw["alpha"] = per_head(draw(st.lists(st.sampled_from([0.0, 1.0, 0.25, 0.9]), min_size=1, max_size=6)))
    if draw(st.booleans()):
        shape = draw(st.sampled_from(["keys", "heads_keys", "full"]))
        size = {"keys": (Sk,), "heads_keys": (Hq, Sk), "full": (B, Hq, Sk)}[shape]
        bias = torch.randn(size, generator=gen, dtype=torch.float64)
        if draw(st.booleans()) and bias.numel():
            bias[..., 0] = -math.inf  # a masked key
        kw["key_bias"] = bias
    if draw(st.booleans()):
        kw["out_scale"] = torch.randn(Hq, D, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        kw["out_bias"] = torch.randn(B if draw(st.booleans()) and B else 1, Hq, D, generator=gen,
                                     dtype=torch.float64).squeeze(0) if B <= 1 else torch.randn(
            B, Hq, D, generator=gen, dtype=torch.float64)
    return q, k, v, dict(kw, causal=causal, layout=layout), seed


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_case())
def test_attention_matches_the_reference(case):
    q, k, v, kw, seed = case
    out = headops.attention(q, k, v, **kw)
    want = reference.attention(q.double(), k.double(), v.double(), **kw)
    assert out.shape == want.shape and out.dtype == q.dtype
    nan_here, nan_there = torch.isnan(out), torch.isnan(want)
    assert not bool((nan_here & ~nan_there).any()), f"NaN where the reference has none (seed {seed})"
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), want, atol=atol * max(1.0, want.abs().max().item() if want.numel()
                                                                   else 1.0), rtol=rtol, equal_nan=True,
                               msg=lambda m: f"seed {seed}: {m}")


@settings(max_examples=max(1, EXAMPLES // 2), deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_case(), st.sampled_from(["q", "k", "v"]), st.sampled_from([math.nan, math.inf, -math.inf]),
       st.integers(0, 10**6))
def test_nan_and_inf_inputs_behave_as_in_the_reference(case, which, value, where):
    """One NaN or +-inf in q, k or v: NaN in every row whose visible keys meet it, as in the
    reference (whose invisible keys contribute nothing), and the same values where neither is
    NaN. A gated-off head, or an alpha branch of weight 0, is not part of the output: the NaN
    does not reach it. For q and k NaN appears exactly where the reference has it. A NaN/inf
    *value* may also reach a row of the same tile that cannot see its key (0 * NaN in the tile's
    P V product, as in FlashAttention): more NaN, never a finite wrong value."""
    q, k, v, kw, seed = case
    inputs = {"q": q, "k": k, "v": v}
    if inputs[which].numel() == 0:
        return
    poisoned = inputs[which].clone(memory_format=torch.contiguous_format)
    poisoned.view(-1)[where % poisoned.numel()] = value  # clone() of a view is contiguous
    inputs[which] = poisoned
    out = headops.attention(inputs["q"], inputs["k"], inputs["v"], **kw)
    want = reference.attention(inputs["q"].double(), inputs["k"].double(), inputs["v"].double(), **kw)
    nan_out, nan_want = torch.isnan(out), torch.isnan(want)
    same = torch.equal(nan_out, nan_want) if which != "v" else not bool((nan_want & ~nan_out).any())
    assert same, f"seed {seed}: NaN at {int(nan_out.sum())} places, the reference at {int(nan_want.sum())}"
    finite = ~nan_want & ~nan_out
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.double()[finite], want[finite], atol=atol, rtol=rtol,
                               msg=lambda m: f"seed {seed}: {m}")
