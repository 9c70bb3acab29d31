"""Padded batches: a row's positions count from its first token (docs/integration.md), so its
sinks are its own first tokens and a spec's key_bias over the first keys falls on them. Each
prompt of a left-padded batch (as tokenizers pad for generation) is attended, and generates, as
it would alone: through a patched model with no cache, transformers' DynamicCache or a
HeadSparseCache (which stores no padding: ``padding_side="left"``)."""

import pytest
import torch

import headops

transformers = pytest.importorskip("transformers")

from test_cache_rows import assert_same, held  # noqa: E402
from test_patch import CAUSAL, V, make  # noqa: E402

PADS = [0, 5, 2]  # per row; row 0 unpadded, as a tokenizer pads to the longest prompt
S = 14


def spec_of(kind, model):
    if kind == "sinks":
        return headops.HeadSpec.streaming(model, {0: [1], 1: [0, 1]}, window=3, sinks=2)
    if kind == "key_bias":  # ZeroTuning-style: a bias on the first keys' logits
        spec = headops.HeadSpec.dense(model)
        g = torch.Generator().manual_seed(1)
        spec.key_bias = torch.randn(2, model.config.num_attention_heads, 3, generator=g) * 2
        return spec
    if kind == "budget":  # budget heads that evict from the prompt on (sinks 1, budget 6)
        spec = headops.HeadSpec.budget(model, {0: [1], 1: [0]}, budget=6)
        spec.sinks[:, :] = 1
        return spec
    if kind == "sinks_and_key_bias":
        spec = headops.HeadSpec.streaming(model, {0: [0], 1: [1]}, window=2, sinks=1)
        spec.key_bias = torch.randn(2, model.config.num_attention_heads, 4, generator=torch.Generator().manual_seed(2))
        return spec
    raise ValueError(kind)


def left_padded(pads=PADS):
    torch.manual_seed(3)
    ids = torch.randint(1, V, (len(pads), S))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate makes them: each row's from its first token
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("kind", ["sinks", "key_bias", "sinks_and_key_bias"])
@pytest.mark.parametrize("family", CAUSAL)
def test_padded_rows_are_attended_as_each_prompt_alone(family, kind):
    model = make(family)
    headops.patch(model, spec_of(kind, model))
    ids, mask = left_padded()
    got = logits(model, ids, mask)
    for b, p in enumerate(PADS):
        alone = logits(model, ids[b:b + 1, p:], mask[b:b + 1, p:])
        torch.testing.assert_close(got[b, p:], alone[0], atol=2e-5, rtol=1e-5, msg=lambda m: f"row {b}: {m}")


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("cache", ["HeadSparseCache", "DynamicCache", "none"])
@pytest.mark.parametrize("kind", ["sinks", "key_bias", "budget", "sinks_and_key_bias"])
def test_left_padded_batch_generates_each_prompt_as_alone(kind, cache, beams):
    model = make("llama")
    spec = spec_of(kind, model)
    headops.patch(model, spec)

    def generate(ids, mask):
        kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                  num_beams=beams)
        if cache == "HeadSparseCache":
            kw["cache"] = headops.HeadSparseCache(model, spec, max_step=1, budget_recent=2)
        elif cache == "none":
            kw["use_cache"] = False
        return model.generate(ids, **kw)

    ids, mask = left_padded()
    got = generate(ids, mask)
    for b, p in enumerate(PADS):
        alone = generate(ids[b:b + 1, p:], mask[b:b + 1, p:])
        assert torch.equal(got[b, S:], alone[0, S - p:]), f"row {b} (padding {p})"


def test_a_probed_padded_row_reports_what_the_prompt_alone_does_at_padded_positions():
    model = make("llama")
    headops.patch(model, spec_of("sinks_and_key_bias", model))
    ids, mask = left_padded()
    request = dict(entropy=True, topk=2, key_mass_rows=(0, S))
    with headops.probe(model, **request) as padded:
        logits(model, ids, mask)
    for b, p in enumerate(PADS):
        with headops.probe(model, **dict(request, key_mass_rows=(0, S - p))) as alone:
            logits(model, ids[b:b + 1, p:], mask[b:b + 1, p:])
        for layer in range(2):
            got, want = padded[layer][0], alone[layer][0]
            torch.testing.assert_close(got.entropy[b, :, p:], want.entropy[0], atol=1e-5, rtol=1e-5)
            index = want.topk_index[0]
            assert torch.equal(got.topk_index[b, :, p:], torch.where(index >= 0, index + p, index))
            torch.testing.assert_close(got.key_mass[b, :, p:], want.key_mass[0], atol=1e-5, rtol=1e-5)
            assert not got.key_mass[b, :, :p].any()  # the padding has no mass


@pytest.mark.parametrize("kind", ["sinks", "budget", "razor"])
def test_probes_through_the_cache_report_a_padded_row_at_its_padded_positions(kind):
    """headops.probe over a left-padded batch generating through a HeadSparseCache (which holds each
    row without its padding): each row reports what its prompt alone does, at the padded
    sequence's positions (query rows after the padding, key positions moved by it, spans given
    per row in those positions), as the patched model without a cache reports; for the prefill
    and every decode step over the kept keys, compensation included (before 2026-12-06 refused)."""
    model = make("llama")
    spec = headops.HeadSpec.razor(model, {0: [1], 1: [0]}, window=3, sinks=1) if kind == "razor" \
        else spec_of(kind, model)
    headops.patch(model, spec)
    ids, mask = left_padded()
    first_two = torch.tensor([[[p, p + 2]] for p in PADS])  # each row's first two tokens
    request = dict(entropy=True, topk=2, sink_mass=True, distances=[[0, 2]], spans=first_two,
                   compensation_mass=kind == "razor")
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with headops.probe(model, **request) as padded:
        model.generate(ids, attention_mask=mask, cache=headops.HeadSparseCache(model, spec, max_step=1, budget_recent=2), **generate)
    for b, p in enumerate(PADS):
        with headops.probe(model, **dict(request, spans=[[0, 2]])) as alone:
            model.generate(ids[b:b + 1, p:], attention_mask=mask[b:b + 1, p:],
                           cache=headops.HeadSparseCache(model, spec, max_step=1, budget_recent=2), **generate)
        for layer in range(2):
            assert len(padded[layer]) == len(alone[layer]) == 4
            for call, (got, want) in enumerate(zip(padded[layer], alone[layer])):
                rows = slice(p, None) if call == 0 else slice(None)  # the prompt's query rows are padded
                for name in ("entropy", "sink_mass", "span_mass", "distance_mass", "topk_prob", "compensation_mass"):
                    if getattr(want, name) is not None:
                        torch.testing.assert_close(getattr(got, name)[b, :, rows], getattr(want, name)[0],
                                                   atol=1e-5, rtol=1e-5, msg=f"{name}, row {b}, call {call}")
                index = want.topk_index[0]
                assert torch.equal(got.topk_index[b, :, rows], torch.where(index >= 0, index + p, index))
                if call == 0:  # the padding's query rows: nothing
                    assert not got.entropy[b, :, :p].any() and (got.topk_index[b, :, :p] == -1).all()


def test_key_mass_through_the_cache_is_at_the_padded_positions():
    """key_mass over a left-padded prompt held by a HeadSparseCache: the rows' masses at the padded
    sequence's positions (the padding none), the rows asked for counted in the caller's rows."""
    model = make("llama")
    spec = spec_of("sinks", model)
    headops.patch(model, spec)
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        with headops.probe(model, key_mass_rows=(6, S)) as padded:
            model(ids, attention_mask=mask, position_ids=positions, cache=headops.HeadSparseCache(model, spec))
        for b, p in enumerate(PADS):
            with headops.probe(model, key_mass_rows=(max(0, 6 - p), S - p)) as alone:
                model(ids[b:b + 1, p:], cache=headops.HeadSparseCache(model, spec))
            for layer in range(2):
                got, want = padded[layer][0].key_mass[b], alone[layer][0].key_mass[0]
                assert not got[:, :p].any()
                torch.testing.assert_close(got[:, p:], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- the cache's padding_side


def cache_of(**options):
    return headops.HeadSparseCache(num_layers=1, num_heads=6, num_kv_heads=3, head_dim=16,
                                   kinds=["full", "streaming", "budget"], window=[-1, -1, 3, 2, -1, -1],
                                   sinks=[0, 0, 2, 1, 1, 1], budget=[None, None, 6], budget_recent=2, max_step=2,
                                   compensation=[None, "weighted", None], **options)


def draw(B, n, g):
    return tuple(torch.randn(B, n, h, 16, generator=g) for h in (6, 3, 3))


def test_a_left_padded_prompt_is_held_as_the_same_prompt_padded_on_the_right():
    g = torch.Generator().manual_seed(4)
    lengths = [S - p for p in PADS]
    right = draw(len(PADS), S, g)
    left = tuple(torch.stack([torch.roll(t[b], p, 0) for b, p in enumerate(PADS)]) for t in right)
    by_left, by_right = cache_of(), cache_of()
    out_left = by_left.attention(0, *left, lengths=lengths, padding_side="left", softmax_scale=0.3)
    out_right = by_right.attention(0, *right, lengths=lengths, softmax_scale=0.3)
    for b, p in enumerate(PADS):
        assert not out_left[b, :p].any()
        assert torch.equal(out_left[b, p:], out_right[b, :S - p])
    assert by_left.left_padding(0) == PADS and by_right.left_padding(0) == [0, 0, 0]
    assert by_left.get_seq_length() == S and by_left.longest_row(0) == S
    assert by_right.get_seq_length() == S
    assert_same(held(by_left), held(by_right))
    for n in (1, 2, 1, 1, 2):  # decode steps: the same positions, the same outputs
        step = draw(len(PADS), n, g)
        got, want = (cache.attention(0, *step, softmax_scale=0.3) for cache in (by_left, by_right))
        assert torch.equal(got, want)
    assert by_left.get_seq_length() == S + 7
    assert_same(held(by_left), held(by_right))
    by_left.reorder_cache(torch.tensor([1, 1, 0]))  # the padding follows its row
    assert by_left.left_padding(0) == [5, 5, 0]
    by_left.reset()
    assert by_left.left_padding(0) == [0, 0, 0] and by_left.get_seq_length() == 0


def test_refused_padding_arguments_change_nothing():
    g = torch.Generator().manual_seed(5)
    cache = cache_of()
    prompt = draw(3, S, g)
    lengths = [S - p for p in PADS]
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        cache.attention(0, *prompt, lengths=lengths, padding_side="middle")
    assert cache.longest_row(0) == 0 and cache.left_padding(0) == []
    cache.attention(0, *prompt, lengths=lengths, padding_side="left")
    before = held(cache)
    step = draw(3, 1, g)
    with pytest.raises(ValueError, match="lengths and padding_side are for the first call"):
        cache.attention(0, *step, padding_side="left")
    assert_same(held(cache), before)


def test_a_patched_model_refuses_masks_a_cache_cannot_follow():
    model = make("llama")
    spec = spec_of("sinks", model)
    headops.patch(model, spec)
    ids, mask = left_padded()
    holes = mask.clone()
    holes[0, 3] = 0  # a key masked after the row's first token
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    with pytest.raises(NotImplementedError, match="padded on the left"):
        model(ids, attention_mask=holes, cache=cache, use_cache=True)
    assert cache.longest_row(0) == 0
    model(ids, attention_mask=mask, cache=cache, use_cache=True)
    step = torch.randint(1, V, (3, 1))
    moved = torch.cat([torch.zeros(3, 1, dtype=mask.dtype), mask], 1)  # every row padded by one more token
    with pytest.raises(NotImplementedError,
                       match=r"pads the rows by \[1, 6, 3\] tokens on the left, where the prompt was padded by "
                             r"\[0, 5, 2\]"):
        model(step, attention_mask=moved, cache=cache, use_cache=True)


# ------------------------------------------------------------------------ as a property


def test_padding_arguments_attend_each_row_as_alone_for_drawn_specs():
    """The patched model's translation of a mask (headops._padding) over drawn shapes, paddings
    and per-head windows, sinks, alpha and key_bias by position: every padded row's output over its
    real queries equals headops.attention over the row alone, with the whole sequence's keys or
    a decode step's few queries (Sq < Sk)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    from conftest import drawn_heads
    from headops import _padding

    @st.composite
    def case(draw):
        B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
        Hq, Sk = Hkv * group, draw(st.integers(1, 24))
        pads = [draw(st.integers(0, Sk - 1)) for _ in range(B)]
        Sq = draw(st.sampled_from([Sk, 1, min(2, Sk)]))
        window = [draw(st.sampled_from([-1, 1, 2, 5])) for _ in range(Hq)]
        sinks = [draw(st.sampled_from([0, 1, 3])) for _ in range(Hq)]
        alpha = [draw(st.sampled_from([0.0, 0.5])) for _ in range(Hq)] if draw(st.booleans()) else None
        K = draw(st.integers(0, 4))
        return B, Hq, Hkv, Sq, Sk, pads, window, sinks, alpha, K, draw(st.integers(0, 2**31 - 1))

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(case())
    def check(c):
        B, Hq, Hkv, Sq, Sk, pads, window, sinks, alpha, K, seed = c
        q, k, v, args, g = drawn_heads(B, Hq, Hkv, Sq, Sk, window, sinks, alpha, seed)
        if K:  # a spec's key_bias over the first K keys, padded with zeros to Sk (HeadSpec.layer_args)
            bias = torch.randn(Hq, K, generator=g, dtype=torch.float64)
            args["key_bias"] = torch.nn.functional.pad(bias[:, :Sk], (0, max(0, Sk - K)))
        valid = torch.arange(Sk)[None] >= torch.tensor(pads)[:, None]
        padding = _padding.of_mask(valid[:, None, None, :])
        assert padding is None if not any(pads) else (padding.first.tolist() == pads and padding.left_only)
        padded = _padding.from_first_token(args, torch.tensor(pads))
        padded["key_bias"] = _padding.padding_bias(valid).double() + padded.get("key_bias", 0)
        out = headops.attention(q, k, v, layout="bhsd", **padded)
        for b, p in enumerate(pads):
            n = Sk - p
            alone = dict(args)
            if K:
                alone["key_bias"] = torch.nn.functional.pad(bias[:, :n], (0, max(0, n - K)))
            rows = slice(max(0, Sq - n), Sq)  # the queries at the row's real positions
            want = headops.attention(q[b:b + 1, :, rows], k[b:b + 1, :, p:], v[b:b + 1, :, p:], layout="bhsd",
                                     **alone)
            torch.testing.assert_close(out[b:b + 1, :, rows], want, atol=1e-12, rtol=1e-12)

    check()


def test_the_padding_is_read_once_a_forward(monkeypatch):
    """The layers of a forward share its mask: what the host decides on (each row's first token,
    left padding only) is read from it once, not once per layer (a device-to-host sync each on a
    GPU), and again for the next forward's mask."""
    from headops import _padding
    from headops.testing import tiny_llama

    reads = []

    def counting(what, tensors, read):
        def counted():
            reads.append(what)
            return read()
        return _padding_read_once(what, tensors, counted)

    _padding_read_once = _padding.read_once
    monkeypatch.setattr(_padding, "read_once", counting)
    model, _ = tiny_llama()
    headops.patch(model, headops.HeadSpec.dense(model))
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
        assert reads == ["padding"]
        model(ids, attention_mask=mask, use_cache=False)
    assert reads == ["padding", "padding"]
