"""Probe statistics through a HeadSparseCache (docs/probes.md): a prefill's over the prompt, a
decode step's over the keys each KV head keeps at their original positions, against the
reference's statistics (float64) over every token with the same visibility; and
``headops.probe`` while a patched model generates through the cache. Each test runs with the
CPU probe kernel and with the row-block path a CUDA cache takes (conftest ``probe_path``)."""

import math

import pytest
import torch

import headops
from headops import reference

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("probe_path")
STATISTICS = ("span_mass", "distance_mass", "sink_mass", "entropy", "topk_index", "topk_prob", "key_mass", "pattern")
PATTERN_ROWS = [0, -1]


def request(keys, Sq):
    return dict(spans=[[0, 1], [3, 9], [keys - 4, keys]], distances=[[0, 1], [1, 3], [4, 40]], sink_mass=True,
                topk=3, entropy=True, key_mass_rows=(0, Sq), pattern_rows=PATTERN_ROWS)


def pattern_rows_of(Sq, Sq_b):
    """The pattern rows a call of Sq query rows resolves PATTERN_ROWS to, those of a row's own Sq_b."""
    return [r % Sq for r in PATTERN_ROWS if r % Sq < Sq_b]


def mixed_cache(B=2, **options):
    """KV head 0 full, 1 streaming (its query heads' windows 5 and 4, sinks 2 and 1), 2 budget (7 tokens)."""
    return headops.HeadSparseCache(num_layers=1, num_heads=6, num_kv_heads=3, head_dim=8,
                                   kinds=["full", "streaming", "budget"], window=[-1, -1, 5, 4, -1, -1],
                                   sinks=[0, 0, 2, 1, 1, 1], budget=[None, None, 7], budget_recent=2, batch_size=B,
                                   dtype=F64, max_step=2, **options)


def oracle(cache, b, q, k, v, args, probe, keys):
    """reference.probe of row b over every token so far (k, v: [1, keys, Hkv, D]), with the
    cache's windows and sinks, and key_bias -inf where a budget head no longer keeps a token."""
    st = cache._layers[0]
    group = cache.num_heads // cache.num_kv_heads
    bias = torch.zeros(1, cache.num_heads, keys, dtype=F64)
    for h, kind in enumerate(st.kinds):
        if kind == 2:  # budget: its kept set (chosen by scores; tests/test_cache_methods.py checks the choice)
            kept = st.kept_positions(b, h)
            drop = torch.ones(keys, dtype=torch.bool)
            drop[kept] = False
            bias[0, h * group:(h + 1) * group, drop] = -math.inf
    if "key_bias" in args:
        bias = bias + args["key_bias"][b:b + 1, :, :keys]
    spans = torch.tensor(probe["spans"]).clamp(max=keys)
    per_head = {n: args[n][b:b + 1] for n in ("softmax_scale", "sink_logit", "gate") if n in args}
    return reference.probe(q, k, v, window=st.windows.view(1, -1), sinks=st.sinks.view(1, -1), key_bias=bias,
                           **per_head, **dict(probe, spans=spans))


def check(got, want, b, Sq_b, keys, Sq=None):
    for name in STATISTICS:
        g = getattr(got, name)
        w = want[name]
        if name == "pattern":  # (rows: PATTERN_ROWS of the call's Sq; a padding query's row is 0)
            rows = [r % (Sq or Sq_b) for r in PATTERN_ROWS]
            valid = [i for i, r in enumerate(rows) if r < Sq_b]
            assert bool((g[b, :, :, keys:] == 0).all()), "pattern past the row's keys"
            assert bool((g[b, :, [i for i in range(len(rows)) if i not in valid]] == 0).all()), "a padding row"
            g = g[b:b + 1, :, valid, :keys]
        elif name == "key_mass":
            g, w = g[b:b + 1, :, :keys], w
            assert bool((getattr(got, name)[b, :, keys:] == 0).all()), "key_mass past the row's keys"
        else:
            g = g[b:b + 1, :, :Sq_b]
        if name == "topk_index":
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g.double(), w, atol=2e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("lengths", [None, [23, 16]])
@pytest.mark.parametrize("prefill", ["spec", "full"])
def test_prefill_and_decode_statistics_equal_the_reference_over_the_kept_keys(lengths, prefill):
    torch.manual_seed(0)
    B, S, Hq, Hkv, D = 2, 23, 6, 3, 8
    steps = [1, 2, 1, 2, 1]
    total = S + sum(steps)
    cache = mixed_cache(B, prefill=prefill)
    q_all = torch.randn(B, total, Hq, D, dtype=F64)
    k_all, v_all = torch.randn(B, total, Hkv, D, dtype=F64), torch.randn(B, total, Hkv, D, dtype=F64)
    args = dict(softmax_scale=torch.rand(B, Hq, dtype=F64) + 0.2, sink_logit=torch.randn(B, Hq, dtype=F64),
                gate=torch.tensor([[1.0, 0.5, 1.0, 0.0, 1.0, 1.0]], dtype=F64).expand(B, Hq),
                key_bias=torch.randn(B, Hq, 64, dtype=F64))
    rows = lengths or [S] * B
    # prefill: q, k, v of each row's first rows[b] tokens (right padded)
    q0, k0, v0 = q_all[:, :S].clone(), k_all[:, :S].clone(), v_all[:, :S].clone()
    out, stats = cache.attention(0, q0, k0, v0, lengths=lengths, probe=headops.Probe(**request(S, S)),
                                 key_bias=args["key_bias"][..., :S], **{n: args[n] for n in ("softmax_scale",
                                                                                             "sink_logit", "gate")})
    plain = mixed_cache(B, prefill=prefill)
    torch.testing.assert_close(out, plain.attention(0, q0, k0, v0, lengths=lengths, key_bias=args["key_bias"][..., :S],
                                                    **{n: args[n] for n in ("softmax_scale", "sink_logit", "gate")}),
                               atol=1e-12, rtol=0)  # the probe changes no output
    for b, n in enumerate(rows):
        st = cache._layers[0]
        window = None if prefill == "full" else st.windows.view(1, -1)
        sinks = None if prefill == "full" else st.sinks.view(1, -1)
        want = reference.probe(q0[b:b + 1, :n], k0[b:b + 1, :n], v0[b:b + 1, :n], window=window, sinks=sinks,
                               key_bias=args["key_bias"][b:b + 1, :, :n],
                               **{k: args[k][b:b + 1] for k in ("softmax_scale", "sink_logit", "gate")},
                               **dict(request(S, S), spans=torch.tensor(request(S, S)["spans"]).clamp(max=n),
                                      pattern_rows=pattern_rows_of(S, n)))
        check(stats, want, b, n, n, S)
        assert bool((stats.topk_index[b, :, n:] == -1).all()) and bool((stats.span_mass[b, :, n:] == 0).all())
    # decode steps: each row's new tokens follow its own length
    held = list(rows)
    for Sq in steps:
        q = torch.stack([q_all[b, held[b]:held[b] + Sq] for b in range(B)])
        k = torch.stack([k_all[b, held[b]:held[b] + Sq] for b in range(B)])
        v = torch.stack([v_all[b, held[b]:held[b] + Sq] for b in range(B)])
        probe = request(max(held) + Sq, Sq)
        out, stats = cache.attention(0, q, k, v, probe=headops.Probe(**probe),
                                     **dict(args, key_bias=args["key_bias"][..., :max(held) + Sq]))
        held = [n + Sq for n in held]
        assert stats.key_mass.shape == (B, Hq, max(held))
        for b in range(B):
            keys = held[b]
            want = oracle(cache, b, q[b:b + 1], k_all[b:b + 1, :keys], v_all[b:b + 1, :keys], args, probe, keys)
            check(stats, want, b, Sq, keys)
        # the streaming head's top keys are sinks or in its window; the budget head's are kept
        st = cache._layers[0]
        for b in range(B):
            top = stats.topk_index[b, 2, -1]
            top = top[top >= 0]
            assert bool(((top < 2) | (top > held[b] - 1 - 5)).all())
            kept = set(st.kept_positions(b, 2).tolist())
            assert set(stats.topk_index[b, 4:6].flatten().tolist()) - {-1} <= kept
            assert bool((stats.entropy[b, 3] == 0).all()) and bool((stats.topk_index[b, 3] == -1).all())  # gate 0


def test_a_refused_probe_changes_nothing():
    torch.manual_seed(1)
    cache = mixed_cache(1)
    q, k, v = torch.randn(1, 12, 6, 8, dtype=F64), torch.randn(1, 12, 3, 8, dtype=F64), torch.randn(1, 12, 3, 8,
                                                                                                     dtype=F64)
    cache.attention(0, q, k, v)
    qs, ks, vs = q[:, :1].clone(), k[:, :1].clone(), v[:, :1].clone()
    before = cache._layers[0].held[:]
    with pytest.raises(ValueError, match="probe.spans"):
        cache.attention(0, qs, ks, vs, probe=headops.Probe(spans=[[0, 14]]))  # 13 keys after this step
    with pytest.raises(ValueError, match="probe.topk"):
        cache.attention(0, qs, ks, vs, probe=headops.Probe(topk=9))
    with pytest.raises(TypeError, match="headops.Probe"):
        cache.attention(0, qs, ks, vs, probe={"topk": 1})
    assert cache._layers[0].held == before
    out, stats = cache.attention(0, qs, ks, vs, probe=headops.Probe(spans=[[0, 13]]))
    torch.testing.assert_close(stats.span_mass, torch.ones(1, 6, 1, 1), atol=1e-6, rtol=0)  # every kept key


def test_what_the_cache_does_not_probe():
    q, k, v = torch.randn(1, 6, 2, 8, dtype=F64), torch.randn(1, 6, 1, 8, dtype=F64), torch.randn(1, 6, 1, 8,
                                                                                                   dtype=F64)
    full = headops.HeadSparseCache(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, batch_size=1, dtype=F64)
    with pytest.raises(ValueError, match="alpha"):
        full.attention(0, q, k, v, alpha=0.5, probe=headops.Probe(topk=1))
    assert full._layers[0].held == [0]


def compensation_oracle(cache, b, q, k, v, args, probe, keys):
    """reference.probe of row b over every token so far with each compensated streaming head's
    compensation key: the mean of the keys it no longer holds (counted here from what it keeps),
    bias log n (weighted), 0 (unweighted), -inf (no key: not compensated, or nothing evicted)."""
    st = cache._layers[0]
    Hq, D = cache.num_heads, k.shape[-1]
    group = Hq // cache.num_kv_heads
    comp_key = torch.zeros(1, Hq, D, dtype=F64)
    comp_bias = torch.full((1, Hq), -math.inf, dtype=F64)
    for kvh, form in enumerate(st.compensation):
        gone = sorted(set(range(keys)) - set(st.kept_positions(b, kvh).tolist()))
        if form is None or not gone:
            continue
        heads = slice(kvh * group, (kvh + 1) * group)
        comp_key[0, heads] = k[0, gone, kvh].mean(0)
        comp_bias[0, heads] = math.log(len(gone)) if form == "weighted" else 0.0
    per_head = {n: args[n][b:b + 1] for n in ("softmax_scale", "sink_logit", "gate") if n in args}
    return reference.probe(q, k, v, window=st.windows.view(1, -1), sinks=st.sinks.view(1, -1),
                           compensation_key=comp_key, compensation_bias=comp_bias, **per_head,
                           **dict(probe, spans=torch.tensor(probe["spans"]).clamp(max=keys)))


def test_compensated_streaming_heads_are_probed_with_their_compensation_key():
    # RazorAttention's compensation key (DESIGN section 6) is one more key of the row's softmax
    # with no position: every key's probability is measured against the softmax that holds it,
    # its own mass is compensation_mass and enters the entropy, and no span, distance, top-k or
    # key mass counts it (reference.probe's compensation_key)
    torch.manual_seed(2)
    B, S, Hq, Hkv, D = 2, 14, 6, 3, 8
    steps = [1, 2, 1, 3, 1]
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                    kinds=["full", "streaming", "streaming"], window=[-1, -1, 4, 3, 5, 5],
                                    sinks=[0, 0, 1, 2, 0, 1], compensation=[None, "weighted", "unweighted"],
                                    batch_size=B, dtype=F64, max_step=3)
    total = S + sum(steps)
    q_all = torch.randn(B, total, Hq, D, dtype=F64)
    k_all, v_all = torch.randn(B, total, Hkv, D, dtype=F64), torch.randn(B, total, Hkv, D, dtype=F64)
    args = dict(softmax_scale=torch.rand(B, Hq, dtype=F64) + 0.2, sink_logit=torch.randn(B, Hq, dtype=F64),
                gate=torch.tensor([[1.0, 0.5, 1.0, 1.0, 0.0, 1.0]], dtype=F64).expand(B, Hq))
    cache.attention(0, q_all[:, :S], k_all[:, :S], v_all[:, :S], **args)
    held = S
    for Sq in steps:
        q, k, v = (t[:, held:held + Sq] for t in (q_all, k_all, v_all))
        probe = dict(request(held + Sq, Sq), compensation_mass=True)
        probe["spans"] = probe["spans"] + [[0, held + Sq]]  # every key
        _, stats = cache.attention(0, q, k, v, probe=headops.Probe(**probe), **args)
        held += Sq
        for b in range(B):
            want = compensation_oracle(cache, b, q[b:b + 1], k_all[b:b + 1, :held], v_all[b:b + 1, :held], args,
                                       probe, held)
            check(stats, want, b, Sq, held)
            torch.testing.assert_close(stats.compensation_mass[b:b + 1].double(), want["compensation_mass"],
                                       atol=2e-6, rtol=1e-6)
        # the compensated heads (2..5, but 4 gated off) hold mass on their key once tokens left
        assert bool((stats.compensation_mass[:, 2:4] > 0).all()) and bool((stats.compensation_mass[:, 5] > 0).all())
        assert bool((stats.compensation_mass[:, :2] == 0).all()) and bool((stats.compensation_mass[:, 4] == 0).all())
        # the keys, the sink and the compensation key share each computed row's mass
        total_mass = stats.span_mass[..., -1] + stats.sink_mass + stats.compensation_mass
        computed = torch.tensor([0, 1, 2, 3, 5])
        torch.testing.assert_close(total_mass[:, computed], torch.ones(B, 5, Sq, dtype=total_mass.dtype),
                                   atol=1e-6, rtol=0)


def test_a_plain_call_reports_no_compensation_mass():
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    _, stats = headops.attention(q, k, v, probe=headops.Probe(compensation_mass=True, entropy=True))
    assert torch.equal(stats.compensation_mass, torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="probe.compensation_mass"):
        headops.attention(q, k, v, probe=headops.Probe(compensation_mass=1))


def test_generation_through_the_cache_is_probed_at_original_positions():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    dense = headops.HeadSpec.dense(model)
    request = headops.Probe(spans=[[0, 1]], distances=[[1, 2]], topk=2, entropy=True)
    headops.patch(model, dense)
    try:
        with torch.no_grad():
            with headops.probe(model, request) as own:  # the model's own cache
                want = model.generate(ids, max_new_tokens=4, do_sample=False)
            cache = headops.HeadSparseCache(model, dense, max_step=1)
            with headops.probe(model, request) as through:
                got = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
            assert torch.equal(got, want)
            assert [len(c) for c in through.layers] == [len(c) for c in own.layers] == [4, 4]
            for layer in range(2):
                for a, b in zip(own[layer], through[layer]):
                    assert torch.equal(a.topk_index, b.topk_index)
                    for name in ("span_mass", "distance_mass", "entropy", "topk_prob"):
                        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
            # StreamingLLM: a step's top keys are the sinks or the window's, at original positions
            streaming = headops.HeadSpec.streaming_llm(model, window=6, sinks=2)
            headops.set_spec(model, streaming)
            cache = headops.HeadSparseCache(model, streaming, max_step=1)
            with headops.probe(model, request) as rec:
                model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
            for layer in range(2):
                for step, stats in enumerate(rec[layer][1:]):
                    position = 24 + step
                    top = stats.topk_index[..., 0]
                    assert bool(((top < 2) | ((top > position - 6) & (top <= position))).all())
                    assert cache.get_seq_length(layer) == 24 + 3
    finally:
        headops.unpatch(model)
