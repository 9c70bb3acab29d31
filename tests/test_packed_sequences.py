"""headops.attention's sequence_ids: sequences packed into the rows of one call, each attended alone.

Every case is compared with the float64 reference (which attends each run of one id as a batch of
its own) and with headops.attention over each sequence alone: outputs, lse and the gradients of
q, k, v and every floating per-head argument. Raw op calls with bad sequence_ids raise.
"""

import pytest
import torch

import headops
from headops import reference

from conftest import (OUT_ATOL, assert_close, assert_compiled_as_eager, assert_reference_with_gradients, drawn_heads,
                      gradient_inputs, head_params, make_qkv, weighted_loss)

FEATURES = ("scale", "window", "sinks", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate")


def ids_of(lengths_per_row):
    """[B, S] sequence ids from each row's sequence lengths."""
    return torch.stack([torch.arange(len(row)).repeat_interleave(torch.tensor(row)) for row in lengths_per_row])


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["per_head", "per_batch"])
@pytest.mark.parametrize("features", [(), ("window", "sinks"), ("alpha", "window", "sinks"), FEATURES],
                         ids=["plain", "streaming", "alpha", "all"])
def test_packed_rows_match_the_reference_with_gradients(layout, per_batch, features):
    """Two rows packed unlike (one of them with two sequences of one length side by side, one run),
    GQA, every per-head argument, float64: out, lse (without alpha) and every gradient."""
    lengths = [[3, 4, 4, 1, 5], [17]] if per_batch else [[5, 5, 7], [2, 6, 9]]
    B, S, Hq, Hkv, D = 2, 17, 6, 3, 8
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, layout=layout, strided=True)
    kw = head_params(B, Hq, S, D, features, per_batch=per_batch)
    if "gate" in kw:
        kw["gate"] = kw["gate"].masked_fill(kw["gate"] == 0, 0.5)  # (a gated-off head's grad is skipped)
    assert_reference_with_gradients(q, k, v, kw, layout=layout, sequence_ids=ids_of(lengths))


def test_drawn_packings_are_each_sequence_alone():
    """Drawn batches and packings (rows packed alike or not, runs of equal lengths), per-head
    windows, sinks, alpha, per-batch gates and key_bias by position, causal or not: each sequence's
    output and gradients equal headops.attention over it alone, its positions from its own first
    token, and the reference's."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @st.composite
    def case(draw):
        B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
        S = draw(st.integers(1, 20))

        def packing():
            cuts = sorted(set(draw(st.lists(st.integers(1, max(1, S - 1)), max_size=4)))) if S > 1 else []
            bounds = [0] + cuts + [S]
            return [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        first = packing()
        lengths = [first if draw(st.booleans()) else packing() for _ in range(B)]
        Hq = Hkv * group
        window = [draw(st.sampled_from([-1, 1, 3])) for _ in range(Hq)]
        sinks = [draw(st.sampled_from([0, 1, 2])) for _ in range(Hq)]
        alpha = [draw(st.sampled_from([0.0, 0.5])) for _ in range(Hq)] if draw(st.booleans()) else None
        gate = draw(st.sampled_from([None, "heads", "rows"]))
        return (B, Hq, Hkv, S, lengths, window, sinks, alpha, gate, draw(st.integers(0, 4)),
                draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))

    @settings(max_examples=100, deadline=None, derandomize=True)
    @given(case())
    def check(c):
        B, Hq, Hkv, S, lengths, window, sinks, alpha, gate, K, causal, seed = c
        q, k, v, args, g = drawn_heads(B, Hq, Hkv, S, S, window, sinks, alpha, seed)
        if gate is not None:
            args["gate"] = torch.rand(B if gate == "rows" else 1, Hq, generator=g, dtype=torch.float64) + 0.1
            if gate == "heads":
                args["gate"] = args["gate"][0]
        if K:  # a spec's key_bias over the first K keys, padded to the row (HeadSpec.layer_args)
            bias = torch.randn(Hq, K, generator=g, dtype=torch.float64)
            args["key_bias"] = torch.nn.functional.pad(bias[:, :S], (0, max(0, S - K)))
        for t in (q, k, v):
            t.requires_grad_(True)
        ids = ids_of(lengths)
        out = headops.attention(q, k, v, layout="bhsd", causal=causal, sequence_ids=ids, **args)
        torch.testing.assert_close(out, reference.attention(q, k, v, layout="bhsd", causal=causal, sequence_ids=ids,
                                                            **args), atol=1e-12, rtol=1e-12)
        weights = torch.ones_like(out) * torch.arange(S, dtype=out.dtype)[:, None]
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), weights)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = dict(args)
                if gate == "rows":
                    alone["gate"] = args["gate"][b]
                if K:
                    alone["key_bias"] = args["key_bias"][:, :n]
                part = [t[b:b + 1, :, start:start + n] for t in (q, k, v)]
                want = headops.attention(*part, layout="bhsd", causal=causal, **alone)
                torch.testing.assert_close(out[b:b + 1, :, start:start + n], want, atol=1e-12, rtol=1e-12)
                weight = torch.ones_like(want) * torch.arange(start, start + n, dtype=out.dtype)[:, None]
                for got, w in zip((dq, dk, dv), torch.autograd.grad(want, part, weight)):
                    torch.testing.assert_close(got[b:b + 1, :, start:start + n], w, atol=1e-12, rtol=1e-12)
                start += n

    check()
    # lengths 4, 3, 3, 2: the two of length 3 run as one call, between the others
    check.hypothesis.inner_test((1, 2, 1, 12, [[4, 3, 3, 2]], [-1, 2], [0, 1], None, None, 2, True, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_16_and_32_bit_packed_rows_match_the_reference(dtype):
    """The kernels of each dtype over packed rows (long enough for several key tiles) against the
    float64 reference on the same rounded inputs."""
    B, S, Hq, Hkv, D = 2, 300, 4, 2, 64
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, dtype=dtype)
    ids = ids_of([[100, 150, 50], [37, 263]])
    kw = head_params(B, Hq, S, D, ("window", "sinks", "gate"))
    got = headops.attention(q, k, v, sequence_ids=ids, **kw)
    want = reference.attention(*(t.double() for t in (q, k, v)), sequence_ids=ids, **kw)
    assert_close(got, want, OUT_ATOL[dtype])


def test_one_sequence_a_row_is_the_plain_call_bitwise():
    """sequence_ids that pack nothing (every row one id) give the plain call's results exactly, and
    so does the backward; a [S] tensor holds for every row."""
    q, k, v = make_qkv(2, 33, 33, 4, 2, 16, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    plain = headops.attention(q, k, v, window=5, sinks=1)
    for ids in (torch.zeros(2, 33, dtype=torch.int64), torch.full((33,), 7, dtype=torch.int32)):
        same = headops.attention(q, k, v, window=5, sinks=1, sequence_ids=ids)
        assert torch.equal(same, plain)
        g = torch.randn_like(plain)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(same, (q, k, v), g),
                                                     torch.autograd.grad(plain, (q, k, v), g, retain_graph=True)))


def test_packed_backward_is_deterministic():
    """Two backward passes over packed rows give bitwise the same gradients (the per-head sums run
    over the sequences in a fixed order)."""
    q, k, v = make_qkv(2, 40, 40, 4, 2, 16, dtype=torch.float32)
    kw = head_params(2, 4, 40, 16, ("scale", "key_bias", "sink_logit", "out_scale", "gate"), per_batch=True)
    _, inputs = gradient_inputs(q, k, v, kw)
    ids = ids_of([[10, 10, 10, 10], [3, 17, 20]])
    first, second = (torch.autograd.grad(weighted_loss(headops.attention(q, k, v, sequence_ids=ids, **kw), None),
                                         inputs, allow_unused=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_sequence_ids_are_refused_by_name():
    q, k, v = make_qkv(2, 6, 6, 2, 2, 8)
    good = torch.zeros(2, 6, dtype=torch.int64)
    cases = [
        (TypeError, r"sequence_ids must be an integer tensor, got torch.float64", good.double()),
        (TypeError, r"sequence_ids must be an integer tensor, got torch.bool", good.bool()),
        (TypeError, r"sequence_ids must be an integer tensor \(\[S\] or \[B, S\]\), got list", [0] * 6),
        (ValueError, r"sequence_ids must be of shape \[6\] or \[2, 6\]", torch.zeros(2, 5, dtype=torch.int64)),
        (ValueError, r"sequence_ids must be of shape", torch.zeros(3, 6, dtype=torch.int64)),
        (ValueError, r"sequence_ids must be of shape", torch.zeros(2, 6, 1, dtype=torch.int64)),
        (ValueError, r"sequence_ids must be on the CPU or on q's device", good.to("meta")),
    ]
    for error, message, ids in cases:
        with pytest.raises(error, match=message):
            headops.attention(q, k, v, sequence_ids=ids)
    with pytest.raises(ValueError, match=r"sequence_ids must be given only for self-attention .*6 and 4"):
        headops.attention(q, k[:, :4], v[:, :4], sequence_ids=good)
    with pytest.raises(NotImplementedError, match="probes over the key buffers"):
        headops.attention(q, k, v, key_lengths=4, probe=headops.Probe(sink_mass=True))


def _raw_forward(q, k, v, **kw):
    return torch.ops.headops.attention_fwd(q, k, v, True, False, 0.35, None, None, None, None, None, None, None,
                                           None, None, True, True, False, False, **kw)


def test_raw_ops_check_sequence_ids():
    """The ops re-check sequence_ids (TORCH_CHECK): a raw call with bad ones raises, never crashes."""
    q, k, v = make_qkv(2, 6, 6, 2, 2, 8)
    for ids, message in [(torch.zeros(2, 6), "integer tensor"),
                         (torch.zeros(2, 5, dtype=torch.int64), r"shape \[2, 6\]"),
                         (torch.zeros(1, 6, dtype=torch.int64), r"shape \[2, 6\]"),
                         (torch.zeros(2, 6, dtype=torch.bool), "integer tensor")]:
        with pytest.raises(RuntimeError, match=message):
            _raw_forward(q, k, v, sequence_ids=ids)
    with pytest.raises(RuntimeError, match="self-attention over packed rows"):
        _raw_forward(q, k[:, :4], v[:, :4], sequence_ids=torch.zeros(2, 6, dtype=torch.int64))
    out, lse, o_stream, *_ = torch.ops.headops.attention_fwd(
        q, k, v, True, False, 0.35, None, None, None, None, None, None, None, None, None, True, True, True, False,
        sequence_ids=ids_of([[2, 4], [6]]))
    grads_of = torch.ops.headops.attention_bwd
    with pytest.raises(RuntimeError, match=r"sequence_ids must have shape \[2, 6\]"):
        grads_of(torch.ones_like(out), None, q, k, v, o_stream, lse, None, None, True, False, 0.35, None, None, None,
                 None, None, None, None, None, None, True, [1] * 10, sequence_ids=torch.zeros(6, dtype=torch.int64))


def test_compiled_fullgraph_with_packed_rows():
    """sequence_ids computed from position_ids inside a compiled function (no branch on data): the
    op finds the sequences when it runs; out and gradients as eager."""
    q, k, v = make_qkv(1, 12, 12, 4, 2, 16, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v, position_ids):
        restarts = (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()
        ids = torch.nn.functional.pad(restarts.cumsum(-1), (1, 0))
        return headops.attention(q, k, v, window=3, sinks=1, sequence_ids=ids)

    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    assert_compiled_as_eager(f, (q, k, v), (torch.arange(12)[None], packed))


def test_a_gated_off_head_is_skipped_in_every_sequence():
    """A head whose gate is exactly 0 gives 0 and lse -inf in every sequence of a packed row, and
    is never computed (the work counters count no key block for it)."""
    q, k, v = make_qkv(2, 64, 64, 4, 2, 16, dtype=torch.float32)
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0])
    ids = ids_of([[20, 20, 24], [64]])
    out, lse = headops.attention(q, k, v, gate=gate, sequence_ids=ids, return_lse=True)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])) and torch.isneginf(lse[:, 1]).all()
    want, want_lse = reference.attention(q.double(), k.double(), v.double(), gate=gate, sequence_ids=ids,
                                         return_lse=True)
    assert_close(out, want, OUT_ATOL[torch.float32])
    assert_close(lse[:, [0, 2, 3]], want_lse[:, [0, 2, 3]], 2e-5, what="lse")
    with headops.count_work() as gated:
        headops.attention(q, k, v, gate=gate, sequence_ids=ids)
    with headops.count_work() as every:
        headops.attention(q, k, v, sequence_ids=ids)
    assert gated.key_blocks * 4 == every.key_blocks * 3 > 0  # (one head of four)


def test_runs_cut_to_a_bounded_size_are_the_reference():
    """Sequences of one length side by side join a run only up to 4 MiB of keys and values (a call
    packs all its K/V blocks first): eight of 128 tokens at 2 MiB each (float64, 16 KV heads,
    D = 64) run as four calls of two; the output and gradients are still each sequence alone's."""
    q, k, v = make_qkv(1, 1024, 1024, 16, 16, 64)
    for t in (q, k, v):
        t.requires_grad_(True)
    ids = ids_of([[128] * 8])
    out = headops.attention(q, k, v, sequence_ids=ids, window=100, sinks=1)
    want = reference.attention(q, k, v, sequence_ids=ids, window=100, sinks=1)
    assert_close(out, want, 1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert_close(a, b, 1e-10)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_probes_over_packed_rows_are_each_sequences_own(layout):
    """A probe over sequences packed into rows (before 2026-12-07 refused): each sequence's
    statistics are the reference's over that sequence alone (its sinks, window and key_bias from its
    first token), at the row's positions: top-k indices, spans, key mass and pattern keys moved by
    the sequence's start; a query row's pattern is 0 outside its own sequence; out and lse are the
    packed forward's."""
    from headops import reference

    g = torch.Generator().manual_seed(5)
    B, S, Hq, Hkv, D = 2, 20, 4, 2, 8
    q, k, v = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64) for H in (Hq, Hkv, Hkv))
    ids = torch.tensor([[0] * 7 + [1] * 5 + [2] * 8, [5] * 20])
    kw = dict(window=torch.tensor([-1, 3, 2, -1]), sinks=torch.tensor([0, 1, 0, 2]),
              key_bias=torch.randn(B, Hq, S, generator=g, dtype=torch.float64),
              sink_logit=torch.randn(Hq, generator=g, dtype=torch.float64))
    request = dict(spans=[[0, 1], [7, 9]], distances=[[1, 2]], topk=2, entropy=True, sink_mass=True,
                   key_mass_rows=(5, 15), pattern_rows=[0, 8, -1])
    given = (q, k, v) if layout == "bshd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    out, lse, stats = headops.attention(*given, layout=layout, sequence_ids=ids, return_lse=True,
                                        probe=headops.Probe(**request), **kw)
    want_out, want_lse = headops.attention(*given, layout=layout, sequence_ids=ids, return_lse=True, **kw)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    pattern_rows = [0, 8, S - 1]
    for b, s0, s1 in [(0, 0, 7), (0, 7, 12), (0, 12, 20), (1, 0, 20)]:
        n = s1 - s0
        rows = [r for r in pattern_rows if s0 <= r < s1]
        want = reference.probe(q[b:b + 1, s0:s1], k[b:b + 1, s0:s1], v[b:b + 1, s0:s1], window=kw["window"],
                               sinks=kw["sinks"], key_bias=kw["key_bias"][b:b + 1, :, :n],
                               sink_logit=kw["sink_logit"], spans=(torch.tensor(request["spans"]) - s0).clamp(0, n),
                               distances=request["distances"], topk=2, entropy=True, sink_mass=True,
                               key_mass_rows=(min(max(5 - s0, 0), n), min(max(15 - s0, 0), n)),
                               pattern_rows=[r - s0 for r in rows] or None)
        for name in ("span_mass", "distance_mass", "sink_mass", "entropy", "topk_prob"):
            torch.testing.assert_close(getattr(stats, name)[b:b + 1, :, s0:s1].double(), want[name], atol=1e-6,
                                       rtol=1e-6, msg=name)
        index = stats.topk_index[b:b + 1, :, s0:s1]
        assert torch.equal(index, torch.where(want["topk_index"] >= 0, want["topk_index"] + s0, -1))
        torch.testing.assert_close(stats.key_mass[b:b + 1, :, s0:s1].double(), want["key_mass"], atol=1e-6, rtol=1e-6)
        for i, r in enumerate(rows):
            got = stats.pattern[b, :, pattern_rows.index(r)]
            torch.testing.assert_close(got[:, s0:s1].double(), want["pattern"][0, :, i], atol=1e-6, rtol=1e-6)
            assert bool((got[:, :s0] == 0).all()) and bool((got[:, s1:] == 0).all())
