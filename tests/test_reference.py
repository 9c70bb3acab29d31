"""The oracle itself (headops.reference) on small cases checked by hand or by identities.

Everything else trusts the reference, so it is checked here against DESIGN section 1 directly:
explicit numbers, and identities that do not go through its own code path twice.
"""

import math

import pytest
import torch

from headops import reference

from conftest import LAYOUTS, make_qkv

F64 = torch.float64


def ref(q, k, v, **kw):
    return reference.attention(q, k, v, **kw)


def assert_equal_f64(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=True)


# --------------------------------------------------------------------------- explicit numbers


def test_hand_computed_2x2():
    # B = H = 1, D = 1, softmax_scale = 1: q = [1, 2], k = [0, 1], v = [10, 20]
    q = torch.tensor([1.0, 2.0], dtype=F64).view(1, 2, 1, 1)
    k = torch.tensor([0.0, 1.0], dtype=F64).view(1, 2, 1, 1)
    v = torch.tensor([10.0, 20.0], dtype=F64).view(1, 2, 1, 1)
    e, e2 = math.e, math.e ** 2

    # causal: row 0 sees key 0 (logit 0); row 1 sees keys 0, 1 (logits 0, 2)
    out, lse = ref(q, k, v, softmax_scale=1.0, causal=True, return_lse=True)
    assert_equal_f64(out.flatten(), torch.tensor([10.0, (10 + 20 * e2) / (1 + e2)], dtype=F64))
    assert_equal_f64(lse.flatten(), torch.tensor([0.0, math.log(1 + e2)], dtype=F64))

    # non-causal: row 0 logits (0, 1), row 1 logits (0, 2)
    out, lse = ref(q, k, v, softmax_scale=1.0, causal=False, return_lse=True)
    assert_equal_f64(out.flatten(), torch.tensor([(10 + 20 * e) / (1 + e), (10 + 20 * e2) / (1 + e2)], dtype=F64))
    assert_equal_f64(lse.flatten(), torch.tensor([math.log(1 + e), math.log(1 + e2)], dtype=F64))

    # a sink logit 0 (zero value) halves row 0 and joins row 1's normaliser
    out, lse = ref(q, k, v, softmax_scale=1.0, causal=True, sink_logit=0.0, return_lse=True)
    assert_equal_f64(out.flatten(), torch.tensor([10.0 / 2, (10 + 20 * e2) / (2 + e2)], dtype=F64))
    assert_equal_f64(lse.flatten(), torch.tensor([math.log(2), math.log(2 + e2)], dtype=F64))

    # softmax_scale 0.5 halves the logits; window 1 leaves each row its diagonal only
    out = ref(q, k, v, softmax_scale=0.5, causal=False)
    assert_equal_f64(out.flatten(), torch.tensor([(10 + 20 * e ** 0.5) / (1 + e ** 0.5), (10 + 20 * e) / (1 + e)],
                                                 dtype=F64))
    out = ref(q, k, v, softmax_scale=1.0, window=1)
    assert_equal_f64(out.flatten(), torch.tensor([10.0, 20.0], dtype=F64))

    # epilogue: gate * (o * out_scale + out_bias)
    out = ref(q, k, v, softmax_scale=1.0, out_scale=torch.tensor([[3.0]]), out_bias=torch.tensor([[1.0]]),
              gate=torch.tensor([-2.0]))
    assert_equal_f64(out.flatten(), -2 * (3 * torch.tensor([10.0, (10 + 20 * e2) / (1 + e2)], dtype=F64) + 1))


def test_visibility_table():
    # Sq = Sk = 6, causal, window 2, sinks 1: the diagonal, the key before it, and key 0
    vis = reference.visibility(6, 6, causal=True, window=2, sinks=1)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.int32)
    assert torch.equal(vis, expected)
    # non-causal, bottom-right aligned (Sq = 2, Sk = 5: positions 3, 4), window 2: |pos - j| < 2
    vis = reference.visibility(2, 5, causal=False, window=2)[0, 0].int()
    assert torch.equal(vis, torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.int32))
    # sinks never lift causality: Sq = 3 > Sk = 2 (positions -1, 0, 1) with sinks 2
    vis = reference.visibility(3, 2, causal=True, window=1, sinks=2)[0, 0].int()
    assert torch.equal(vis, torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.int32))
    # a negative window is unlimited
    assert reference.visibility(4, 4, causal=False, window=-1).all()


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("Sq,Sk", [(5, 5), (3, 7)])
def test_window_one_causal_returns_diagonal_value(Sq, Sk):
    q, k, v = make_qkv(2, Sq, Sk, 3, 3, 8)
    out, lse = ref(q, k, v, window=1, return_lse=True)
    # query i sees exactly key Sk - Sq + i: the softmax of one element is exactly 1
    assert torch.equal(out, v[:, Sk - Sq:])
    logits = (q * k[:, Sk - Sq:]).sum(-1) / math.sqrt(8)  # [B, Sq, H]
    assert_equal_f64(lse, logits.transpose(1, 2))


def test_alpha_one_is_full_and_alpha_zero_is_streaming():
    q, k, v = make_qkv(2, 9, 13, 4, 2, 8)
    window, sinks = torch.tensor([1, 3, 5, -1]), torch.tensor([0, 2, 1, 4])
    full = ref(q, k, v)
    streaming = ref(q, k, v, window=window, sinks=sinks)
    assert not torch.allclose(full, streaming)
    assert_equal_f64(ref(q, k, v, window=window, sinks=sinks, alpha=1.0), full)
    assert_equal_f64(ref(q, k, v, window=window, sinks=sinks, alpha=0.0), streaming)
    a = torch.tensor([0.0, 0.3, 1.0, 0.8], dtype=F64)
    mixed = ref(q, k, v, window=window, sinks=sinks, alpha=a)
    assert_equal_f64(mixed, a.view(1, 1, 4, 1) * full + (1 - a.view(1, 1, 4, 1)) * streaming)


@pytest.mark.parametrize("causal", [True, False])
def test_sink_logit_is_an_extra_key_with_zero_value(causal):
    # A key prepended at position 0 with k = 0 (q.k = 0), v = 0 and key_bias = logit has logit
    # exactly `logit`; prepending keeps every relative position (bottom-right alignment), and
    # position 0 is causally visible to every query when Sq <= Sk.
    B, Sq, Sk, H, D = 2, 4, 6, 3, 8
    q, k, v = make_qkv(B, Sq, Sk, H, H, D)
    logit = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    zeros = torch.zeros(B, 1, H, D, dtype=F64)
    k_ext, v_ext = torch.cat([zeros, k], dim=1), torch.cat([zeros, v], dim=1)
    bias = torch.cat([logit.view(H, 1), torch.zeros(H, Sk, dtype=F64)], dim=1)
    out, lse = ref(q, k, v, causal=causal, sink_logit=logit, return_lse=True)
    out_ext, lse_ext = ref(q, k_ext, v_ext, causal=causal, key_bias=bias, return_lse=True)
    assert_equal_f64(out, out_ext)
    assert_equal_f64(lse, lse_ext)


def test_sink_logit_not_scaled_by_softmax_scale():
    q, k, v = make_qkv(1, 3, 3, 2, 2, 4)
    logit = torch.tensor([0.7, -0.2], dtype=F64)
    a = ref(q, k, v, sink_logit=logit, softmax_scale=0.5)
    b = ref(q * 0.5, k, v, sink_logit=logit, softmax_scale=1.0)
    assert_equal_f64(a, b)


def test_key_bias_log2_duplicates_a_key():
    # key_bias log(2) on key j weighs it like two copies of that key
    q, k, v = make_qkv(1, 4, 5, 2, 2, 8)
    bias = torch.zeros(5, dtype=F64)
    bias[2] = math.log(2)
    dup = torch.cat([k, k[:, 2:3]], dim=1), torch.cat([v, v[:, 2:3]], dim=1)
    assert_equal_f64(ref(q, k, v, causal=False, key_bias=bias), ref(q, *dup, causal=False))


def test_softmax_scale_tensor_equals_scaled_queries():
    q, k, v = make_qkv(2, 5, 5, 3, 3, 8)
    scale = torch.tensor([0.1, 1.0, 2.5], dtype=F64)
    assert_equal_f64(ref(q, k, v, softmax_scale=scale), ref(q * scale.view(1, 1, 3, 1), k, v, softmax_scale=1.0))


def test_gate_zero_gives_zeros():
    q, k, v = make_qkv(2, 5, 7, 3, 3, 8)
    gate = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    out = ref(q, k, v, gate=gate, out_bias=torch.randn(3, 8, dtype=F64))
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert (out[:, :, 0] != 0).all()


def test_rows_without_visible_key_are_zero_with_lse_minus_inf():
    # causal, Sq = 5 > Sk = 3: positions -2..2, rows 0 and 1 see nothing
    q, k, v = make_qkv(1, 5, 3, 2, 2, 4)
    out, lse = ref(q, k, v, return_lse=True)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.isneginf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()
    assert not out.isnan().any()
    # the epilogue still applies: out_bias shows through
    bias = torch.randn(2, 4, dtype=F64)
    out = ref(q, k, v, out_bias=bias, out_scale=torch.full((2, 4), 3.0, dtype=F64))
    assert torch.equal(out[0, :2], bias.expand(2, 2, 4))
    # with a sink logit, such rows keep o = 0 and lse = sink_logit
    logit = torch.tensor([0.25, -1.0], dtype=F64)
    out, lse = ref(q, k, v, sink_logit=logit, return_lse=True)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.equal(lse[0, :, :2], logit.view(2, 1).expand(2, 2))


def test_epilogue_order():
    q, k, v = make_qkv(2, 4, 6, 3, 3, 5)
    scale, bias = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    gate = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=F64)
    plain = ref(q, k, v)
    out = ref(q, k, v, out_scale=scale, out_bias=bias, gate=gate)
    assert_equal_f64(out, gate.view(2, 1, 3, 1) * (plain * scale + bias))


def test_gqa_equals_repeated_kv_heads():
    q, k, v = make_qkv(2, 6, 9, 8, 2, 8)
    rep = lambda t: t.repeat_interleave(4, dim=2)  # noqa: E731  (head h reads kv head h // 4)
    window = torch.tensor([1, 2, 3, 4, -1, 5, 6, 7])
    assert_equal_f64(ref(q, k, v, window=window), ref(q, rep(k), rep(v), window=window))


@pytest.mark.parametrize("causal", [True, False])
def test_layout_bhsd_equals_transposed_bshd(causal):
    q, k, v = make_qkv(2, 5, 8, 4, 2, 8, layout="bshd")
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    kw = dict(causal=causal, window=torch.tensor([2, -1, 3, 1]), sink_logit=torch.zeros(4, dtype=F64))
    out, lse = ref(q, k, v, return_lse=True, **kw)
    out_h, lse_h = ref(t(q), t(k), t(v), layout="bhsd", return_lse=True, **kw)
    assert_equal_f64(out, t(out_h))
    assert_equal_f64(lse, lse_h)


def test_per_batch_parameters_equal_per_row_calls():
    q, k, v = make_qkv(2, 4, 6, 3, 3, 8)
    gate = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 1.0]], dtype=F64)
    window = torch.tensor([[1, 2, -1], [3, -1, 1]])
    out = ref(q, k, v, gate=gate, window=window)
    for b in range(2):
        row = ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], gate=gate[b], window=window[b])
        assert_equal_f64(out[b:b + 1], row)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_sdpa(layout):
    # an independent implementation for plain (causal, square) attention
    q, k, v = make_qkv(2, 7, 7, 4, 4, 8, layout=layout)
    t = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
    want = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True)
    assert_equal_f64(ref(q, k, v, layout=layout), t(want))


def test_probe_compensation_key_is_a_key_every_row_sees_without_a_position():
    # the positionless compensation key (DESIGN section 6) against the same key placed first in
    # the sequence, where sinks + 1 keep it visible to every row and shift nothing else: its
    # mass is that position's, the entropy and the other keys' masses are the same
    torch.manual_seed(3)
    B, Sq, Sk, Hq, D = 2, 4, 9, 3, 5
    q, k, v = torch.randn(B, Sq, Hq, D, dtype=F64), torch.randn(B, Sk, Hq, D, dtype=F64), torch.randn(B, Sk, Hq, D,
                                                                                                       dtype=F64)
    comp_key = torch.randn(B, Hq, D, dtype=F64)
    comp_bias = torch.tensor([[math.log(7), 0.0, -math.inf], [0.3, -math.inf, math.log(2)]], dtype=F64)
    window, sinks, scale = torch.tensor([3, 2, -1]), torch.tensor([1, 0, 2]), torch.tensor([0.4, 0.9, 0.6], dtype=F64)
    stats = dict(spans=[[0, 2], [4, Sk]], sink_mass=True, entropy=True, compensation_mass=True)
    got = reference.probe(q, k, v, window=window, sinks=sinks, softmax_scale=scale, sink_logit=torch.tensor(
        [0.5, -1.0, 0.0], dtype=F64), compensation_key=comp_key, compensation_bias=comp_bias, **stats)
    first = torch.cat([comp_key[:, None], k], 1)  # [B, 1 + Sk, Hq, D]
    bias = torch.cat([comp_bias[..., None], torch.zeros(B, Hq, Sk, dtype=F64)], -1)
    placed = reference.probe(q, first, torch.cat([v[:, :1], v], 1), window=window, sinks=sinks + 1,
                             softmax_scale=scale, sink_logit=torch.tensor([0.5, -1.0, 0.0], dtype=F64), key_bias=bias,
                             spans=[[0, 1], [1, 3], [5, Sk + 1]], sink_mass=True, entropy=True)
    assert_equal_f64(got["compensation_mass"], placed["span_mass"][..., 0])
    assert_equal_f64(got["span_mass"], placed["span_mass"][..., 1:])
    assert_equal_f64(got["entropy"], placed["entropy"])
    assert_equal_f64(got["sink_mass"], placed["sink_mass"])
    assert bool((got["compensation_mass"][1, 1] == 0).all()) and bool((got["compensation_mass"][0, 2] == 0).all())
