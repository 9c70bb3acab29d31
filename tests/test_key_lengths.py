"""headops.attention's key_lengths: k and v as buffers of which each row's first keys exist.

Against the float64 reference (each row over its first key_lengths[b] keys, as a batch of its
own): outputs, lse and every gradient; the slots past the lengths are never read (NaN there
changes nothing) and get zero gradients; work only on the keys that exist; bad input refused by
name, and by the raw op.
"""

import pytest
import torch

import headops

from conftest import assert_compiled_as_eager, assert_reference_with_gradients, head_params, make_qkv

FEATURES = ("scale", "window", "sinks", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("features", [(), ("window", "sinks"), FEATURES], ids=["plain", "streaming", "all"])
@pytest.mark.parametrize("lengths", [[9, 17, 17, 4], [12, 12, 12, 12], [20, 20, 20, 20]],
                         ids=["per_row", "one_length", "every_key"])
def test_key_lengths_match_the_reference_with_gradients(lengths, features, causal, layout):
    """Rows with different key lengths (consecutive equal ones run as one call), one length for
    every row, and the whole buffer; decode-like Sq = 3 against a 20-slot buffer, GQA, float64."""
    B, Sq, Sk, Hq, Hkv, D = 4, 3, 20, 4, 2, 8
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, layout=layout, strided=True)
    kw = head_params(B, Hq, Sk, D, features, per_batch=True)
    if "gate" in kw:
        kw["gate"] = kw["gate"].masked_fill(kw["gate"] == 0, 0.5)
    # (the reference never reads the slots past the lengths: their gradients must be 0)
    assert_reference_with_gradients(q, k, v, kw, unread_is_zero=True, layout=layout, causal=causal,
                                    key_lengths=torch.tensor(lengths))


def test_slots_past_the_lengths_are_never_read():
    """NaN in every slot past each row's length: the output is finite and the same, and those
    slots' gradients are exactly 0; the work counters count only the keys that exist."""
    B, Sq, Sk, Hq, Hkv, D = 3, 2, 64, 4, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype=torch.float32)
    lengths = torch.tensor([5, 40, 64])
    for b, n in enumerate(lengths.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = headops.attention(q, k, v, key_lengths=lengths, window=8, sinks=2)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths.tolist()):
        alone = headops.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], window=8, sinks=2)
        assert torch.equal(out[b:b + 1], alone)
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    for b, n in enumerate(lengths.tolist()):
        assert not dk[b, n:].any() and not dv[b, n:].any()
        assert torch.isfinite(dk[b, :n]).all()
    with headops.count_work() as buffer:
        headops.attention(q.detach(), k.detach(), v.detach(), key_lengths=torch.tensor([5, 5, 5]))
    with headops.count_work() as exact:
        headops.attention(q.detach(), k.detach()[:, :5], v.detach()[:, :5])
    assert buffer.key_blocks == exact.key_blocks > 0


def test_forms_of_key_lengths():
    """An int, a one-element tensor and a [B] tensor (int32 too) mean the same."""
    q, k, v = make_qkv(2, 1, 10, 2, 1, 8)
    want = headops.attention(q, k[:, :6], v[:, :6])
    for n in (6, torch.tensor([6]), torch.tensor([6, 6], dtype=torch.int32)):
        assert torch.equal(headops.attention(q, k, v, key_lengths=n), want)


def test_bad_key_lengths_are_refused_by_name():
    q, k, v = make_qkv(2, 3, 10, 2, 2, 8)
    cases = [
        (TypeError, r"key_lengths must be an integer tensor, got torch.float32", torch.tensor([4.0, 5.0])),
        (TypeError, r"key_lengths must be an int or an integer tensor \(\[B\]\), got list", [4, 5]),
        (ValueError, r"key_lengths must be an int or of shape \[2\]", torch.tensor([4, 5, 6])),
        (ValueError, r"key_lengths must be in \[0, 10\] \(the keys given\), got \[4, 11\]", torch.tensor([4, 11])),
        (ValueError, r"key_lengths must be in \[0, 10\]", -1),
        (ValueError, r"key_lengths must be on the CPU or on q's device", torch.tensor([4, 5], device="meta")),
    ]
    for error, message, value in cases:
        with pytest.raises(error, match=message):
            headops.attention(q, k, v, key_lengths=value)
    with pytest.raises(ValueError, match="sequence_ids .* and key_lengths cannot be combined"):
        headops.attention(q, k[:, :3], v[:, :3], key_lengths=3, sequence_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="probes over .* key buffers"):
        headops.attention(q, k, v, key_lengths=4, probe=headops.Probe(sink_mass=True))


def _raw_forward(q, k, v, **kw):
    return torch.ops.headops.attention_fwd(q, k, v, True, False, 0.35, None, None, None, None, None, None, None,
                                           None, None, True, True, False, False, **kw)


def test_raw_ops_check_key_lengths():
    q, k, v = make_qkv(2, 3, 10, 2, 2, 8)
    for value, message in [(torch.tensor([4, 11]), r"key_lengths must be in \[0, 10\] .* got 11 for row 1"),
                           (torch.tensor([4]), r"key_lengths must have shape \[2\]"),
                           (torch.tensor([4.0, 5.0]), "key_lengths must be an integer tensor"),
                           (torch.tensor([-1, 5]), r"key_lengths must be in \[0, 10\]")]:
        with pytest.raises(RuntimeError, match=message):
            _raw_forward(q, k, v, key_lengths=value)
    with pytest.raises(RuntimeError, match="cannot be combined"):
        _raw_forward(q[:, :3], k[:, :3], v[:, :3], key_lengths=torch.tensor([3, 3]),
                     sequence_ids=torch.zeros(2, 3, dtype=torch.int64))


def test_compiled_fullgraph_with_key_lengths_from_a_tensor():
    """A static cache's pattern: the length computed in the graph from an offset tensor (no read
    while tracing); the op reads it when it runs. Out and gradients as eager, for two offsets
    through one graph."""
    q, k, v = make_qkv(2, 2, 16, 4, 2, 16, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v, offset):
        return headops.attention(q, k, v, window=4, sinks=1, key_lengths=(offset + q.shape[1]).expand(q.shape[0]))

    assert_compiled_as_eager(f, (q, k, v), (torch.tensor(3), torch.tensor(11)))
