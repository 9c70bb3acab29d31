"""Probe statistics (DESIGN section 5) from the fused CPU kernel against the ones the reference
computes from its materialised probabilities (float64): every statistic, every per-head
feature, GQA, Sq != Sk, per-batch forms, rows with no visible key, gated-off heads."""

import math

import pytest
import torch

from headops import reference

from conftest import ALL_FEATURES, head_params, make_qkv, use_row_blocks

F64 = torch.float64
# float32 statistics (DESIGN: probes report float32); from float64 inputs the kernel computes in double
STAT_ATOL = {torch.float64: 2e-6, torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def probe_op(q, k, v, *, causal=True, layout="bshd", softmax_scale=None, window=None, sinks=None, key_bias=None,
             sink_logit=None, out_scale=None, out_bias=None, gate=None, spans=None, distances=None, sink_mass=False,
             topk=0, entropy=False, key_mass_rows=None):
    """The raw op, with per-head arguments laid out as headops.attention lays them out."""
    heads_first = layout == "bhsd"
    B, D = q.shape[0], q.shape[3]
    Hq = q.shape[1] if heads_first else q.shape[2]
    Sk = k.shape[2] if heads_first else k.shape[1]
    acc = F64 if q.dtype == F64 else torch.float32

    def ph(t, dtype=acc):
        return None if t is None else torch.as_tensor(t).to(dtype).expand(B, Hq).contiguous()

    def row(t, n):
        return None if t is None else t.to(acc).expand(B, Hq, n).contiguous()

    scale = None if softmax_scale is None or isinstance(softmax_scale, float) else ph(softmax_scale)
    default_scale = softmax_scale if isinstance(softmax_scale, float) else 1 / math.sqrt(D)
    res = torch.ops.headops.attention_probe(
        q, k, v, causal, heads_first, default_scale, scale, ph(window, torch.int64), ph(sinks, torch.int64),
        row(key_bias, Sk), ph(sink_logit), row(out_scale, D), row(out_bias, D), ph(gate),
        None if spans is None else torch.as_tensor(spans, dtype=torch.int64),
        None if distances is None else torch.as_tensor(distances, dtype=torch.int64), sink_mass, topk, entropy,
        key_mass_rows)
    names = ("out", "lse", "span_mass", "distance_mass", "sink_mass", "entropy", "topk_index", "topk_prob", "key_mass")
    return dict(zip(names, res))


def compare(got, want, dtype):
    atol = STAT_ATOL[dtype]
    for name, w in want.items():
        if w is None:
            continue
        g = got[name]
        if name == "topk_index":
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g.double(), w, atol=atol, rtol=1e-4, equal_nan=True, msg=name)


def all_statistics(Sq, Sk, B=1, per_batch_spans=False):
    """Spans (first token, a middle run, an empty one, all keys), distances (the diagonal, the
    previous token, a run, beyond every key), sink mass, top-3, entropy, key mass of the last rows."""
    spans = [[0, 1], [Sk // 3, Sk // 3 + max(1, Sk // 4)], [Sk // 2, Sk // 2], [0, Sk]]
    if per_batch_spans:
        spans = [[[s0 + b % 2 if s0 < s1 else s0, s1] for s0, s1 in spans] for b in range(B)]
    return dict(spans=spans, distances=[[0, 1], [1, 2], [2, 7], [Sk + Sq, 2**62]], sink_mass=True, topk=3,
                entropy=True, key_mass_rows=(max(0, Sq - 5), Sq))


def reference_probe(q, k, v, kw, stats, **options):
    """reference.probe under headops.attention's per-head arguments `kw` (out_scale and out_bias,
    applied after the softmax, do not change the pattern)."""
    return reference.probe(q, k, v, **{n: t for n, t in kw.items() if n not in ("out_scale", "out_bias")}, **stats,
                           **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Sq,Sk,Hq,Hkv,D", [(1, 1, 1, 1, 1, 8), (2, 37, 37, 4, 2, 16), (1, 9, 300, 6, 3, 32),
                                             (2, 70, 20, 4, 4, 8), (1, 300, 600, 2, 1, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_statistics_match_reference(dtype, B, Sq, Sk, Hq, Hkv, D, causal):
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES)
    stats = all_statistics(Sq, Sk)
    got = probe_op(q, k, v, causal=causal, **kw, **stats)
    want = reference_probe(q, k, v, kw, stats, causal=causal)
    compare(got, want, dtype)
    # the output and lse are the forward's (a head gated off exactly is skipped: lse -inf)
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True, **kw)
    computed = kw["gate"] != 0
    torch.testing.assert_close(got["lse"][:, computed].double(), lse[:, computed].double(),
                               atol=2e-5 if dtype != F64 else 1e-9, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_statistics_when_logits_climb_past_the_lazy_reference(dtype, causal):
    """Logits that rise by 0.1 a key: later key blocks (512 or 256 keys) exceed a row's reference
    by far more than the lazy-rescale limit, so the one-pass attempt (which stored its logits for
    the probes) is redone on the exact path; rows whose logits fall stay one-pass throughout."""
    B, Sq, Sk, Hq, Hkv, D = 1, 40, 1200, 4, 2, 16
    u = torch.zeros(D, dtype=F64)
    u[0] = 4.0
    sign = torch.where(torch.arange(Sq) % 2 == 0, 1.0, -1.0).to(F64)
    q = (sign[None, :, None, None] * u + 0.3 * torch.randn(B, Sq, Hq, D, dtype=F64)).to(dtype)
    ramp = 0.1 * (torch.arange(Sk, dtype=F64) - Sk / 2)  # q.k / sqrt(D) = +-0.1 (j - Sk/2)
    k = (ramp[None, :, None, None] * u / 4.0 + 0.3 * torch.randn(B, Sk, Hkv, D, dtype=F64)).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, dtype=F64).to(dtype)
    kw = dict(window=torch.tensor([-1, 700, 7, -1]), sinks=torch.tensor([0, 2, 0, 0]),
              key_bias=torch.randn(Hq, Sk, dtype=F64), sink_logit=torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=F64))
    stats = all_statistics(Sq, Sk)
    got = probe_op(q, k, v, causal=causal, **kw, **stats)
    want = reference.probe(q, k, v, causal=causal, **kw, **stats)
    compare(got, want, dtype)
    lse = reference.attention(q, k, v, causal=causal, return_lse=True, **kw)[1]
    torch.testing.assert_close(got["lse"].double(), lse.double(), atol=1e-4 if dtype != F64 else 1e-9, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_per_batch_forms_and_layouts(layout):
    B, Sq, Sk, Hq, Hkv, D = 3, 40, 90, 4, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64, layout=layout, strided=True)
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES, per_batch=True)
    stats = all_statistics(Sq, Sk, B, per_batch_spans=True)
    got = probe_op(q, k, v, layout=layout, **kw, **stats)
    want = reference_probe(q, k, v, kw, stats, layout=layout)
    compare(got, want, F64)


def test_rows_with_no_visible_key_and_gated_off_heads():
    # non-causal window 1 with Sq > Sk: the first rows see nothing (their position is below 0)
    B, Sq, Sk, Hq, D = 1, 12, 4, 3, 8
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hq, D, F64)
    gate = torch.tensor([1.0, 0.0, 1.0])
    stats = all_statistics(Sq, Sk)
    got = probe_op(q, k, v, window=1, gate=gate, **stats)
    want = reference.probe(q, k, v, window=1, gate=gate, **stats)
    compare(got, want, F64)
    blind = got["lse"][0, 0] == -math.inf
    assert bool(blind.any())
    assert bool((got["topk_index"][0, 0][blind] == -1).all()) and bool((got["entropy"][0, 0][blind] == 0).all())
    assert bool((got["topk_index"][0, 1] == -1).all()) and bool((got["span_mass"][0, 1] == 0).all())
    assert bool((got["key_mass"][0, 1] == 0).all())


def test_ties_go_to_the_lower_position():
    # identical keys: every logit of a row ties
    q = torch.randn(1, 6, 1, 8, dtype=F64)
    k = torch.ones(1, 10, 1, 8, dtype=F64)
    got = probe_op(q, k, k, causal=False, topk=4)
    assert torch.equal(got["topk_index"][0, 0], torch.tensor([[0, 1, 2, 3]] * 6))
    torch.testing.assert_close(got["topk_prob"][0, 0], torch.full((6, 4), 0.1, dtype=torch.float32))


def test_fewer_keys_than_topk():
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8, F64)
    got = probe_op(q, k, v, topk=8)
    want = reference.probe(q, k, v, topk=8)
    compare(got, want, F64)
    assert bool((got["topk_index"][0, :, 0, 1:] == -1).all())  # the first row sees one key


def test_masses_sum_to_one():
    """Span [0, Sk) plus the sink's mass is every row's whole probability."""
    q, k, v = make_qkv(2, 50, 80, 4, 2, 16, torch.float32)
    got = probe_op(q, k, v, window=torch.tensor([3, -1, 10, 1]), sinks=2, sink_logit=torch.zeros(4),
                   spans=[[0, 80]], sink_mass=True)
    torch.testing.assert_close(got["span_mass"][..., 0] + got["sink_mass"], torch.ones(2, 4, 50), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nan_reaches_only_rows_that_see_it(dtype):
    q, k, v = make_qkv(1, 30, 30, 2, 1, 8, dtype)
    k[0, 20, 0, 3] = float("nan")
    stats = dict(all_statistics(30, 30), key_mass_rows=(18, 30))
    got = probe_op(q, k, v, window=5, **stats)
    want = reference.probe(q, k, v, window=5, **stats)
    lse = got["lse"][0, 0]
    assert bool(torch.isnan(lse[20:25]).all()) and not bool(torch.isnan(lse[:20]).any())
    for name in ("span_mass", "distance_mass", "entropy", "topk_prob"):
        assert bool(torch.isnan(got[name][0, 0, 20:25]).all()), name
        assert torch.equal(torch.isnan(got[name]), torch.isnan(want[name])), name
        torch.testing.assert_close(got[name][0, :, :20].double(), want[name][0, :, :20], atol=STAT_ATOL[dtype],
                                   rtol=1e-4)
    # the key mass of the rows 18..29: NaN on the keys that a row seeing the NaN key also sees
    # (16..24), never a number there (ATen's fast exp of a NaN is not NaN: row_ops.h vexp)
    assert torch.equal(torch.isnan(got["key_mass"]), torch.isnan(want["key_mass"]))
    key_mass = got["key_mass"][0, 0]
    assert bool(torch.isnan(key_mass[16:25]).all()) and not bool(torch.isnan(key_mass[25:]).any())


@pytest.mark.parametrize("bad,match", [
    (dict(spans=[[3, 2]]), "spans"), (dict(spans=[[0, 99]]), "spans"), (dict(spans=[[-1, 2]]), "spans"),
    (dict(spans=[0, 1]), "spans"), (dict(distances=[[-1, 2]]), "distances"), (dict(distances=[[3, 2]]), "distances"),
    (dict(topk=9), "topk"), (dict(topk=-1), "topk"), (dict(key_mass_rows=(3, 2)), "key_mass_rows"),
    (dict(key_mass_rows=(0, 99)), "key_mass_rows"), (dict(key_mass_rows=(0, 1, 2)), "key_mass_rows"),
])
def test_raw_op_refuses_bad_probes(bad, match):
    q, k, v = make_qkv(1, 10, 12, 2, 2, 8, F64)
    with pytest.raises(RuntimeError, match=match):
        probe_op(q, k, v, **bad)


def test_no_s_by_s_memory():
    """A 65,536-token probe (one span, top-1, entropy) holds O(S) beside the inputs."""
    import resource

    S, H, D = 65536, 1, 16
    q, k, v = (torch.randn(1, S, H, D) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = probe_op(q, k, v, window=256, spans=[[0, 1]], topk=1, entropy=True)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert got["entropy"].shape == (1, 1, S)
    assert grown_mib < 256, f"peak RSS grew by {grown_mib:.0f} MiB (S x S floats would be 16 GiB)"


def test_fake_kernel_matches_the_op():
    """torch.library.opcheck: schema, fake tensor and AOT tracing of attention_probe."""
    q, k, v = make_qkv(2, 9, 13, 4, 2, 8, torch.float32)
    args = dict(q=q, k=k, v=v, causal=True, heads_first=False, default_scale=0.3, softmax_scale=None, window=None,
                sinks=None, key_bias=None, sink_logit=torch.zeros(2, 4), out_scale=None, out_bias=None, gate=None,
                spans=torch.tensor([[0, 1], [2, 5]]), distances=torch.tensor([[0, 1]]), sink_mass=True, topk=2,
                entropy=True, key_mass_rows=[7, 9])
    torch.library.opcheck(torch.ops.headops.attention_probe.default, (), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------------------------------------
# headops.attention(..., probe=headops.Probe(...))

def test_attention_with_a_probe_matches_the_reference():
    import headops

    B, Sq, Sk, Hq, Hkv, D = 2, 33, 70, 4, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64, layout="bhsd")
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES, per_batch=True)
    stats = all_statistics(Sq, Sk)
    out, lse, got = headops.attention(q, k, v, layout="bhsd", return_lse=True, probe=headops.Probe(**stats), **kw)
    want = reference_probe(q, k, v, kw, stats, layout="bhsd")
    compare(vars(got), want, F64)
    # the forward's output (probing rows take the same one-pass path, which also keeps their logits)
    torch.testing.assert_close(out, headops.attention(q, k, v, layout="bhsd", **kw), atol=1e-12, rtol=0)
    only_entropy = headops.attention(q, k, v, layout="bhsd", probe=headops.Probe(entropy=True))[1]
    assert only_entropy.entropy.shape == (B, Hq, Sq) and only_entropy.span_mass is None and only_entropy.key_mass is None


@pytest.mark.parametrize("path", ["kernel", "row_blocks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Sq,Sk,Hq,Hkv,D,causal", [(1, 1, 1, 1, 1, 8, True), (2, 37, 37, 4, 2, 16, True),
                                                    (1, 9, 300, 6, 3, 32, True), (2, 70, 20, 4, 4, 8, False),
                                                    (2, 70, 20, 4, 4, 8, True)])
def test_pattern_rows_match_the_reference(B, Sq, Sk, Hq, Hkv, D, causal, dtype, path, monkeypatch):
    """probe.pattern_rows: the whole attention distribution of a few query rows (first, middle, last
    by a negative index, one twice), every per-head feature (a head gated off: 0), as the
    reference's materialised probabilities; each row's probabilities and its sink mass sum to 1
    where it sees a key."""
    import headops

    if path == "row_blocks":
        use_row_blocks(monkeypatch, 4)
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES)
    rows = [0, Sq // 2, -1, 0]
    _, got = headops.attention(q, k, v, causal=causal, probe=headops.Probe(pattern_rows=rows, sink_mass=True), **kw)
    want = reference_probe(q, k, v, kw, dict(pattern_rows=rows, sink_mass=True), causal=causal)
    assert got.pattern.shape == (B, Hq, 4, Sk) and got.pattern.dtype == torch.float32
    compare(vars(got), want, dtype)
    total = got.pattern.double().sum(-1) + got.sink_mass.double()[:, :, [r % Sq for r in rows]]
    sees = want["pattern"].sum(-1) > 0
    torch.testing.assert_close(total[sees], torch.ones_like(total[sees]), atol=1e-4, rtol=0)


def test_attention_with_a_probe_keeps_gradients():
    import headops

    q, k, v = (t.requires_grad_() for t in make_qkv(1, 12, 12, 2, 2, 8, F64))
    out, stats = headops.attention(q, k, v, probe=headops.Probe(topk=1))
    out.sum().backward()
    assert q.grad is not None and stats.topk_index.shape == (1, 2, 12, 1)
    torch.testing.assert_close(out, headops.attention(q, k, v), atol=0, rtol=0)


@pytest.mark.parametrize("probe,kw,error,match", [
    (dict(spans=[[2, 1]]), {}, ValueError, "probe.spans"),
    (dict(spans=[[0, 13]]), {}, ValueError, "probe.spans"),
    (dict(spans=[0, 1]), {}, ValueError, "probe.spans"),
    (dict(spans=[[0.5, 1]]), {}, TypeError, "probe.spans"),
    (dict(distances=[[-1, 1]]), {}, ValueError, "probe.distances"),
    (dict(topk=9), {}, ValueError, "probe.topk"),
    (dict(topk=True), {}, ValueError, "probe.topk"),
    (dict(entropy=1), {}, TypeError, "probe.entropy"),
    (dict(key_mass_rows=(2, 1)), {}, ValueError, "probe.key_mass_rows"),
    (dict(key_mass_rows=(0, 13)), {}, ValueError, "probe.key_mass_rows"),
    (dict(topk=1), dict(alpha=0.5), ValueError, "alpha"),
    (dict(pattern_rows=[12]), {}, ValueError, "probe.pattern_rows"),
    (dict(pattern_rows=[-13]), {}, ValueError, "probe.pattern_rows"),
    (dict(pattern_rows=[]), {}, ValueError, "probe.pattern_rows"),
    (dict(pattern_rows=[0.5]), {}, ValueError, "probe.pattern_rows"),
    (dict(pattern_rows=3), {}, ValueError, "probe.pattern_rows"),
    (dict(pattern_rows=list(range(12)) * 6), {}, ValueError, "probe.pattern_rows"),
])
def test_bad_probes_name_the_field(probe, kw, error, match):
    import headops

    q, k, v = make_qkv(1, 12, 12, 2, 2, 8, F64)
    with pytest.raises(error, match=match):
        headops.attention(q, k, v, probe=headops.Probe(**probe), **kw)
    with pytest.raises(TypeError, match="probe must be a headops.Probe"):
        headops.attention(q, k, v, probe=dict(topk=1))


# ---------------------------------------------------------------------------------------------
# the row-block path (CUDA tensors): the statistics from the forward's lse, a block of rows at a time


@pytest.fixture
def row_blocks(monkeypatch):
    """headops.attention's probes by the row-block path, 3 query rows a block; call it for another size."""
    use_row_blocks(monkeypatch)
    return lambda rows: use_row_blocks(monkeypatch, rows)


def probe_by_rows(q, k, v, **kw):
    """(out, lse, statistics by name) of headops.attention with the probe fields among `kw`."""
    import headops

    fields = {n: kw.pop(n) for n in ("spans", "distances", "sink_mass", "topk", "entropy", "key_mass_rows")
              if n in kw}
    out, lse, stats = headops.attention(q, k, v, return_lse=True, probe=headops.Probe(**fields), **kw)
    return out, lse, vars(stats)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Sq,Sk,Hq,Hkv,D", [(1, 1, 1, 1, 1, 8), (2, 37, 37, 4, 2, 16), (1, 9, 300, 6, 3, 32),
                                             (2, 70, 20, 4, 4, 8)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 1000])
def test_row_blocks_match_the_reference_and_the_kernel(dtype, B, Sq, Sk, Hq, Hkv, D, causal, rows, row_blocks):
    import headops

    row_blocks(rows)
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES)
    stats = all_statistics(Sq, Sk)
    out, lse, got = probe_by_rows(q, k, v, causal=causal, **kw, **stats)
    want = reference_probe(q, k, v, kw, stats, causal=causal)
    compare(got, want, dtype)
    kernel = probe_op(q, k, v, causal=causal, **kw, **stats)
    compare(got, {n: t if n == "topk_index" else t.double() for n, t in kernel.items() if n in want}, dtype)
    # out and lse are the plain forward's
    plain_out, plain_lse = headops.attention(q, k, v, causal=causal, return_lse=True, **kw)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)


def test_row_blocks_per_batch_forms_bhsd_and_odd_rows(row_blocks):
    B, Sq, Sk, Hq, Hkv, D = 3, 40, 90, 4, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, F64, layout="bhsd", strided=True)
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES, per_batch=True)
    stats = all_statistics(Sq, Sk, B, per_batch_spans=True)
    _, _, got = probe_by_rows(q, k, v, layout="bhsd", **kw, **stats)
    want = reference_probe(q, k, v, kw, stats, layout="bhsd")
    compare(got, want, F64)


def test_row_blocks_blind_rows_gated_heads_ties_and_few_keys(row_blocks):
    # the first rows see nothing (non-causal window 1, Sq > Sk); head 1 is gated off
    q, k, v = make_qkv(1, 12, 4, 3, 3, 8, F64)
    stats = all_statistics(12, 4)
    gate = torch.tensor([1.0, 0.0, 1.0])
    _, _, got = probe_by_rows(q, k, v, window=1, gate=gate, **stats)
    compare(got, reference.probe(q, k, v, window=1, gate=gate, **stats), F64)
    assert bool((got["topk_index"][0, 1] == -1).all()) and bool((got["key_mass"][0, 1] == 0).all())
    # a gate of 0 that wants its gradient computes the head (for the gradient), reports it as off
    want_grad = gate.clone().requires_grad_()
    _, _, off = probe_by_rows(q, k, v, window=1, gate=want_grad, **stats)
    assert bool((off["topk_index"][0, 1] == -1).all()) and bool((off["entropy"][0, 1] == 0).all())
    # identical keys: every logit of a row ties, the lower positions come first
    q1, k1 = torch.randn(1, 6, 1, 8, dtype=F64), torch.ones(1, 10, 1, 8, dtype=F64)
    _, _, ties = probe_by_rows(q1, k1, k1, causal=False, topk=4)
    assert torch.equal(ties["topk_index"][0, 0], torch.tensor([[0, 1, 2, 3]] * 6))
    # fewer keys than topk: -1 and probability 0 past them
    q2, k2, v2 = make_qkv(1, 5, 5, 2, 2, 8, F64)
    _, _, few = probe_by_rows(q2, k2, v2, topk=8)
    compare(few, reference.probe(q2, k2, v2, topk=8), F64)
    assert bool((few["topk_index"][0, :, 0, 1:] == -1).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_blocks_nan_reaches_what_the_kernel_says(dtype, row_blocks):
    q, k, v = make_qkv(1, 30, 30, 2, 1, 8, dtype)
    k[0, 20, 0, 3] = float("nan")
    stats = dict(all_statistics(30, 30), key_mass_rows=(18, 30))
    _, _, got = probe_by_rows(q, k, v, window=5, **stats)
    want = reference.probe(q, k, v, window=5, **stats)
    kernel = probe_op(q, k, v, window=5, **stats)
    for name, w in want.items():
        if w is not None:
            assert torch.equal(torch.isnan(got[name]), torch.isnan(w)), name
            assert torch.equal(torch.isnan(got[name]), torch.isnan(kernel[name])), name
    compare(got, want, dtype)
    assert bool(torch.isnan(got["entropy"][0, 0, 20:25]).all())


def test_row_blocks_keep_the_forward_differentiable(row_blocks):
    """The row-block path's out is the differentiable forward's (no second pass for a gradient)."""
    import headops

    q, k, v = (t.requires_grad_() for t in make_qkv(1, 12, 12, 2, 2, 8, F64))
    gate = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    sink_logit = torch.zeros(2, dtype=F64, requires_grad=True)
    out, stats = headops.attention(q, k, v, gate=gate, sink_logit=sink_logit.detach(),
                                   probe=headops.Probe(topk=1, sink_mass=True, entropy=True))
    _, trained = headops.attention(q, k, v, gate=gate, sink_logit=sink_logit, probe=headops.Probe(sink_mass=True))
    assert not trained.sink_mass.requires_grad and torch.equal(trained.sink_mass, stats.sink_mass)
    out.square().sum().backward()
    want = [t.grad.clone() for t in (q, k, v, gate)]
    for t in (q, k, v, gate):
        t.grad = None
    headops.attention(q, k, v, gate=gate, sink_logit=sink_logit.detach()).square().sum().backward()
    for got, w in zip((q.grad, k.grad, v.grad, gate.grad), want):
        assert torch.equal(got, w)
    assert stats.topk_index.shape == (1, 2, 12, 1) and not stats.topk_prob.requires_grad


def test_row_blocks_hold_no_s_by_s_memory(monkeypatch):
    """A 16,384-token probe by row blocks of the default size holds O(rows * S) beside the inputs."""
    import resource

    import headops
    from headops import probes

    monkeypatch.setattr(probes, "kernel_probes", lambda device: False)
    S, H, D = 16384, 1, 16
    q, k, v = (torch.randn(1, S, H, D) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, stats = headops.attention(q, k, v, window=256, probe=headops.Probe(spans=[[0, 1]], topk=1, entropy=True,
                                                                         key_mass_rows=(S - 64, S)))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert stats.entropy.shape == (1, 1, S) and int(stats.topk_index[0, 0, -1, 0]) > S - 257
    assert grown_mib < 256, f"peak RSS grew by {grown_mib:.0f} MiB (S x S floats would be 1 GiB)"


# ---------------------------------------------------------------------------------------------
# headops.probe(model, ...): every layer of a patched model


def test_model_probe_records_every_layer_and_call():
    import headops
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (2, 20))
    headops.patch(model, headops.HeadSpec.dense(model))
    try:
        with torch.no_grad():
            plain = model(ids).logits
            with headops.probe(model, spans=[[0, 1]], topk=2, entropy=True) as rec:
                probed = model(ids).logits
                model.generate(ids, max_new_tokens=3, do_sample=False)
            after = model(ids).logits
        assert len(rec) == 2 and all(len(calls) == 1 + 1 + 2 for calls in rec.layers)  # forward, prefill, 2 steps
        first = rec[1][0]
        assert first.span_mass.shape == (2, 4, 20, 1) and first.topk_index.shape == (2, 4, 20, 2)
        step = rec[0][-1]
        assert step.span_mass.shape == (2, 4, 1, 1) and int(step.topk_index.max()) <= 21
        torch.testing.assert_close(probed, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after, plain, atol=0, rtol=0)  # nothing recorded (or changed) outside
        # the statistics are the layer's own: layer 0's q/k recomputed by the reference
        assert bool((first.entropy >= 0).all()) and bool((first.span_mass <= 1 + 1e-6).all())
        with pytest.raises(RuntimeError, match="not patched"):
            with headops.probe(tiny_llama()[0], topk=1):
                pass
    finally:
        headops.unpatch(model)


def test_model_probe_keeps_what_reduce_returns_of_each_call():
    import headops
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (2, 20))
    headops.patch(model, headops.HeadSpec.dense(model))
    try:
        with torch.no_grad():
            with headops.probe(model, entropy=True, pattern_rows=[-1]) as whole:
                model.generate(ids, max_new_tokens=3, do_sample=False)
            seen = []
            with headops.probe(model, entropy=True, pattern_rows=[-1],
                               reduce=lambda layer, r: seen.append(layer) or r.entropy[:, :, -1].sum()) as kept:
                model.generate(ids, max_new_tokens=3, do_sample=False)
        assert seen == [0, 1] * 3  # each call as it is made, in the model's layer order
        for layer in range(2):
            assert kept[layer] == [r.entropy[:, :, -1].sum() for r in whole[layer]]
        with pytest.raises(TypeError, match="reduce must be None or a function"):
            with headops.probe(model, topk=1, reduce=3):
                pass
    finally:
        headops.unpatch(model)


def test_a_models_pattern_rows_are_its_eager_attention_weights_and_the_caches_agree():
    """headops.probe(model, pattern_rows=...): on a left-padded batch, the rows of a patched model's
    attention pattern equal the unpatched model's eager attention weights (output_attentions) at
    every layer, at the caller's positions; while generating, each step's last row (-1) through a
    HeadSparseCache equals the one through transformers' cache, and under StreamingLLM it is 0 on
    every key the cache no longer keeps."""
    import headops
    from headops.testing import tiny_llama

    from conftest import left_padded_ids

    model, _ = tiny_llama()
    model.config._attn_implementation = "eager"
    ids, mask = left_padded_ids()
    with torch.no_grad():
        weights = model(ids, attention_mask=mask, output_attentions=True).attentions
    dense = headops.HeadSpec.dense(model)
    headops.patch(model, dense)
    try:
        rows = [5, -1, 0]
        with torch.no_grad(), headops.probe(model, pattern_rows=rows) as rec:
            model(ids, attention_mask=mask)
        for layer in range(2):
            got = rec[layer][0].pattern.double()
            want = weights[layer][:, :, [5, 12, 0]].double()
            torch.testing.assert_close(got[:, :, :2], want[:, :, :2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[0, :, 2], want[0, :, 2], atol=1e-5, rtol=1e-5)  # (row 1's 0: padding)
            assert bool((got[1, :, :, :3] == 0).all())  # no mass on the padding
        gen = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            with headops.probe(model, pattern_rows=[-1]) as own:
                model.generate(ids, **gen)
            with headops.probe(model, pattern_rows=[-1]) as through:
                model.generate(ids, cache=headops.HeadSparseCache(model, dense), **gen)
        for layer in range(2):
            for a, b in zip(own[layer], through[layer]):
                assert a.pattern.shape == b.pattern.shape
                torch.testing.assert_close(b.pattern, a.pattern, atol=1e-5, rtol=1e-5)
        streaming = headops.HeadSpec.streaming_llm(model, window=4, sinks=1)
        headops.set_spec(model, streaming)
        with torch.no_grad(), headops.probe(model, pattern_rows=[-1]) as rec:
            model.generate(ids, cache=headops.HeadSparseCache(model, streaming, max_step=1), **gen)
        for step, stats in enumerate(rec[0][1:]):
            position = 13 + step  # (the caller's positions: row 1's padding comes first)
            pattern = stats.pattern[:, :, 0, :position + 1]
            keys = torch.arange(position + 1)
            kept = torch.stack([(keys == first) | (keys > position - 4) for first in (0, 3)])  # its sink, window
            assert bool((pattern[~kept[:, None].expand_as(pattern)] == 0).all())
            torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5, rtol=0)
    finally:
        headops.unpatch(model)
