"""Models whose last layers read earlier layers' keys and values (config.num_kv_shared_layers:
Gemma 3n, Gemma 4's small models E2B/E4B): such a layer has no k/v projections and no cache of its
own. A HeadSparseCache gives it its source layer's storage (stored once: the bytes of the layers
that store), a spec's constructors give it its source's cache rows, and its attention reads what
the source keeps: the prompt as given, then the kept tokens at each decode step."""

import pytest
import torch

import headops

from conftest import (GENERATE_LOGITS, assert_generated_alike, assert_prefill_cache_decodes_as_the_model_filled_it,
                      evaluate_every_family, left_padded_ids)

transformers = pytest.importorskip("transformers")

from headops.testing import tiny_per_layer_shapes  # noqa: E402

# 8 layers alternating sliding (window 8) and full attention; layers 4-7 read layers 2 (sliding) and 3 (full)
SOURCES = {4: 2, 5: 3, 6: 2, 7: 3}
STORED = [0, 1, 2, 3]


def shared_gemma4(other_kv_heads=False):
    return tiny_per_layer_shapes(other_kv_heads, num_hidden_layers=8, num_kv_shared_layers=4,
                                 layer_types=["sliding_attention", "full_attention"] * 4)[0]


def generate(model, ids, mask, cache, steps=10, **options):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              pad_token_id=0, cache=cache, **GENERATE_LOGITS, **options)


def recomputed_logits(model, out, mask, prompt):
    """Each generated step's logits recomputed without a cache over the whole sequence so far."""
    ids = out.sequences
    full = torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - prompt, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(ids, attention_mask=full, use_cache=False).logits
    return logits[:, prompt - 1:-1]


@pytest.mark.parametrize("other_kv_heads", [False, True])
def test_a_dense_cache_is_the_model_and_stores_each_key_once(other_kv_heads):
    """A dense spec's HeadSparseCache gives the model's own logits (a left-padded batch's prompt and
    each generated step's, greedy and beam search), with storages for the layers that store their
    keys only: its dense bytes are theirs."""
    model = shared_gemma4(other_kv_heads)
    assert headops._model_attention.kv_sources(model) == SOURCES
    ids, mask = left_padded_ids()
    with torch.no_grad():
        want_prompt = model(ids, attention_mask=mask).logits
    want = generate(model, ids, mask, None)
    beams = generate(model, ids, mask, None, num_beams=2)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    cache = headops.HeadSparseCache(model, spec)
    with torch.no_grad():
        got_prompt = model(ids, attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(got_prompt[0], want_prompt[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_prompt[1, 3:], want_prompt[1, 3:], atol=2e-5, rtol=1e-5)
    cache = headops.HeadSparseCache(model, spec)
    assert_generated_alike(generate(model, ids, mask, cache), want)
    assert len(cache._storages) == len(STORED)
    assert all(cache._layers[layer] is cache._layers[source] for layer, source in SOURCES.items())
    assert [cache.reads_layer(layer) for layer in range(8)] == [None] * 4 + [2, 3, 2, 3]
    held = 13 + 10 - 1  # (the last token is generated, not stored)
    dims, kv = [16, 32] * 2, [2, 1 if other_kv_heads else 2] * 2
    assert cache.dense_nbytes() == sum(2 * ids.shape[0] * h * held * d * 4 for h, d in zip(kv, dims))
    view = cache.whole_model_view()  # (each layer's kept positions; the tokens kept counted once)
    assert view.reading_layers == (4, 5, 6, 7) and view.kept_positions[5] == view.kept_positions[3]
    assert view.kept_tokens() == sum(st.kept_tokens() for st in cache._storages)
    beam_cache = headops.HeadSparseCache(model, spec)
    got_beams = generate(model, ids, mask, beam_cache, num_beams=2)
    assert torch.equal(got_beams.sequences, beams.sequences)


@pytest.mark.parametrize("method", ["streaming_llm", "from_scores"])
def test_streaming_caches_are_the_recomputation(method):
    """Streaming specs (StreamingLLM; full and streaming KV heads from scores, some of them high only
    in the reading layers) generate what recomputing the whole sequence gives: the reading layers
    see their source's window and sinks, each step."""
    model = shared_gemma4()
    if method == "streaming_llm":
        spec = headops.HeadSpec.streaming_llm(model, window=4, sinks=2)
    else:
        scores = torch.zeros(8, 4)
        scores[5, 0] = scores[1, 3] = 1.0  # (layer 5 reads layer 3: its KV head 0 full there)
        spec = headops.HeadSpec.from_scores(model, scores, threshold=0.5, window=3, sinks=1)
        assert spec.cache_kind[3] == ["full", "streaming"] == spec.cache_kind[5]
        assert spec.cache_kind[1] == ["streaming", "full"]
    ids, mask = left_padded_ids()
    headops.patch(model, spec)
    cache = headops.HeadSparseCache(model, spec)
    out = generate(model, ids, mask, cache, steps=12)
    want = recomputed_logits(model, out, mask, ids.shape[1])
    torch.testing.assert_close(torch.stack(out.logits, 1), want, atol=2e-5, rtol=1e-5)


def test_a_call_of_several_new_tokens_is_the_recomputation():
    """A decode call of max_step new tokens after the prompt (a question): every one of their
    logits is what recomputing the whole sequence gives, through streaming heads that the reading
    layers read too (the rings hold max_step - 1 tokens more than the windows)."""
    model = shared_gemma4()
    spec = headops.HeadSpec.streaming_llm(model, window=4, sinks=2)
    headops.patch(model, spec)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(6))
    cache = headops.HeadSparseCache(model, spec, max_step=5)
    with torch.no_grad():
        model(ids[:, :15], cache=cache)
        got = model(ids[:, 15:], cache=cache).logits
        want = model(ids, use_cache=False).logits[:, 15:]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_reading_layers_attend_over_what_their_source_keeps():
    """Budget heads evict by attention: at every decode step a reading layer's output is attention
    over exactly the tokens its source's budget heads keep then (the reference over their kept keys
    and values), and after the prompt over the whole prompt (transformers passes only its last
    query there); its calls change nothing in the storage (their attention adds no mass to what
    the source's heads evict by)."""
    model = shared_gemma4()
    spec = headops.HeadSpec.budget(model, budget=12)
    assert [spec.cache_budget[layer] for layer in (1, 3, 5, 7)] == [[12, 12]] * 4
    ids, mask = left_padded_ids()
    headops.patch(model, spec)
    cache = headops.HeadSparseCache(model, spec, budget_recent=2)
    calls = []
    attend_shared = headops.HeadSparseCache._attend_shared

    def checked(self, caller, layer, q, k, v, causal, per_head, probe):
        st = self._layers[layer]
        def state():
            return [t.clone() for t in (st.lengths, st.ring_k, st.slot_pos, st.slot_mass) if t is not None]

        before = state()
        out, stats = attend_shared(self, caller, layer, q, k, v, causal, per_head, probe)
        # (it stores nothing: its attention adds no mass to what the source's budget heads evict by)
        assert all(torch.equal(a, b) for a, b in zip(before, state()))
        prompt = st.prompt_just_stored
        scale = per_head["softmax_scale"]
        for b in range(q.shape[0]):
            for h in range(st.Hkv):
                if prompt:  # the row's prompt tokens, causal; its last query
                    keys, values = k[b, st.pads[b]:, h], v[b, st.pads[b]:, h]
                    positions = torch.arange(keys.shape[0])
                else:
                    positions, keys, values = st.kept_kv(b, h)
                group = q.shape[2] // st.Hkv
                for g in range(h * group, (h + 1) * group):  # (the sliding layers' window: 8)
                    window, sinks = st.window_list[g], int(st.sinks[g])
                    seen = (positions < sinks) | (positions > st.held[b] - 1 - window) if window > 0 else \
                        torch.ones_like(positions, dtype=torch.bool)
                    p = torch.softmax(q[b, -1, g].double() @ keys[seen].double().T * scale, -1)
                    torch.testing.assert_close(out[b, -1, g].double(), p @ values[seen].double(), atol=1e-5,
                                               rtol=1e-5)
        calls.append((layer, prompt, q.shape[1]))
        return out, stats

    headops.HeadSparseCache._attend_shared = checked
    try:
        generate(model, ids, mask, cache, steps=20)
    finally:
        headops.HeadSparseCache._attend_shared = attend_shared
    assert calls[:4] == [(4, True, 1), (5, True, 1), (6, True, 1), (7, True, 1)]  # (the prompt's last query)
    assert len(calls) == 4 * 20 and all(not prompt for _, prompt, _ in calls[4:])
    st = cache._layers[5]
    assert st.budget_sizes(0) == [12, 12] and max(st.held) == 13 + 19 > 12  # (they evicted)


def test_constructors_give_reading_layers_their_sources_rows():
    """Whatever names a reading layer's KV head names its source's (the keys are stored once):
    streaming and budget heads, RazorAttention's retrieval heads; scores take the most of the
    layers reading a KV head; budgets and full fractions count the layers that store."""
    model = shared_gemma4()
    spec = headops.HeadSpec.streaming(model, {5: [1]}, window=4, sinks=2)
    assert spec.cache_kind[3] == ["full", "streaming"] == spec.cache_kind[5]
    assert spec.window[3].tolist() == [-1, -1, 4, 4] == spec.window[5].tolist()
    assert spec.sinks[5].tolist() == [0, 0, 2, 2]
    razor = headops.HeadSpec.razor(model, [(7, 0)], window=4, sinks=2)
    assert razor.cache_kind[3] == ["full", "streaming"] == razor.cache_kind[7]
    assert razor.cache_kind[1] == ["streaming", "streaming"]
    assert razor.cache_compensation[7] == [None, "weighted"]
    budget = headops.HeadSpec.budget(model, {7: [1]}, budget=16)
    assert budget.cache_kind[3] == ["full", "budget"] == budget.cache_kind[7] and budget.cache_budget[7] == [None, 16]
    scores = torch.zeros(8, 2)
    scores[6, 1] = 3.0  # (read from layer 2, the top one)
    scores[1, 0] = 2.0
    top = headops.HeadSpec.from_scores(model, scores, full_fraction=0.25, window=4, sinks=0)  # 2 of 8 stored KV heads
    full = [(layer, h) for layer in range(8) for h in range(2) if top.cache_kind[layer][h] == "full"]
    assert full == [(1, 0), (2, 1), (4, 1), (6, 1)]  # (layers 4 and 6 read layer 2)
    pyramid = headops.HeadSpec.pyramid(model, budget=16, beta=2)  # over layers 1 and 3 (full, storing)
    assert [pyramid.cache_budget[layer][0] for layer in (1, 3, 5, 7)] == [20, 12, 12, 12]
    headkv = headops.HeadSpec.headkv(model, torch.rand(8, 2), budget=16, beta=2)
    assert headkv.cache_budget[5] == headkv.cache_budget[3] and headkv.cache_budget[7] == headkv.cache_budget[3]
    assert sum(headkv.cache_budget[1] + headkv.cache_budget[3]) == 4 * 16  # (one pool over the storing layers)
    for made in (spec, razor, budget, top, pyramid, headkv):
        headops.HeadSparseCache(model, made)


def test_refused_calls():
    """A spec keeping other tokens in a reading layer than in its source is refused naming both; a
    reading layer stores nothing (append, fill) and is called after its source; a call of more new
    tokens than max_step through streaming heads that other layers read is refused before anything
    changes (the readers would miss the steps' evictions)."""
    model = shared_gemma4()
    spec = headops.HeadSpec.streaming_llm(model, window=4, sinks=2)
    edited = spec.copy()
    edited.cache_kind[5] = ["full", "streaming"]
    with pytest.raises(ValueError, match=r"the same in layer 5 as in layer 3 \(cache_kind\): layer 5 reads layer "
                                         r"3's keys"):
        headops.HeadSparseCache(model, edited)
    edited = spec.copy()
    edited.window[7, 0] = 6
    with pytest.raises(ValueError, match=r"the same in layer 7 as in layer 3 \(window\)"):
        headops.HeadSparseCache(model, edited)
    cache = headops.HeadSparseCache(model, spec, max_step=2)
    k = torch.zeros(1, 5, 2, 32)
    q = torch.zeros(1, 5, 4, 32)
    with pytest.raises(ValueError, match="layer 5 reads layer 3's keys and values .* holds none yet: call layer 3"):
        cache.attention(5, q, k, k)
    for call in (lambda: cache.append(5, k, k), lambda: cache.fill(7, k, k)):
        with pytest.raises(ValueError, match="reads layer 3's keys and values .* stores none: store them in layer 3"):
            call()
    ids, mask = left_padded_ids()
    headops.patch(model, spec)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        held = [list(st.held) for st in cache._storages]
        more = torch.full((2, 3), 5)
        with pytest.raises(ValueError, match=r"3 new tokens in one call, more than max_step = 2: layer 2's "
                                             r"keys are read by layers \[4, 6\]"):
            model(more, attention_mask=torch.cat([mask, torch.ones_like(more)], 1), cache=cache)
    assert [list(st.held) for st in cache._storages] == held


def test_a_cache_from_a_dense_prefill():
    """capture_prefill records the stored layers' keys (a reading layer has its source's and no
    queries); HeadSparseCache.from_prefill fills those layers only, and the next tokens' logits are
    those of a cache whose prompt ran full attention (prefill="full"), also for a question of 3
    tokens in one call where transformers passes the reading layers its last query only (the
    evaluation harness's question-aware flow)."""
    model = shared_gemma4()
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    prefill = headops.capture_prefill(model, ids, observation_window=8)
    assert prefill.queries[5] is None and prefill.keys[5] is prefill.keys[3]
    specs = (headops.HeadSpec.budget(model, budget=12), headops.HeadSpec.razor(model, {1: [0]}, window=4))
    assert_prefill_cache_decodes_as_the_model_filled_it(model, specs, prefill, ids, last_only=True)


def test_the_evaluation_harness_runs_every_method_family():
    """headops.evaluate on the model: the dense method answers as transformers' own generate, and
    every family of the standard grid (StreamingLLM, DuoAttention and RazorAttention splits from
    scores, SnapKV, AdaKV, PyramidKV, HeadKV, question-aware too) runs, holding at most the bytes
    of a dense cache of the storing layers (which the dense bytes count)."""
    rows = evaluate_every_family(shared_gemma4(), budget=24)
    per_token = 2 * 4 * sum(2 * d for d in (16, 32, 16, 32))  # (K and V of the 4 storing layers, float32)
    assert all(int(r["dense_bytes"]) % per_token == 0 and 300 <= int(r["dense_bytes"]) // per_token <= 306
               for r in rows)


def tiny_gemma3n():
    """A small random Gemma 3n (AltUp, LAuReL, per-layer inputs): 6 layers alternating sliding
    (window 8) and full attention, the last 2 reading layers 2 and 3's keys and values."""
    cfg = transformers.Gemma3nTextConfig(
        vocab_size=97, vocab_size_per_layer_input=97, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 3, num_kv_shared_layers=2,
        laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 6, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_gemma3n_generates_through_the_cache():
    """Gemma 3n (its last layers read layers 2 and 3's keys and values): a dense spec's cache
    generates the model's logits, StreamingLLM's what recomputing the whole sequence gives."""
    model = tiny_gemma3n()
    assert headops._model_attention.kv_sources(model) == {4: 2, 5: 3}
    ids, mask = left_padded_ids()
    want = generate(model, ids, mask, None)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    assert_generated_alike(generate(model, ids, mask, headops.HeadSparseCache(model, spec)), want)
    spec = headops.HeadSpec.streaming_llm(model, window=4, sinks=1)
    headops.set_spec(model, spec)
    out = generate(model, ids, mask, headops.HeadSparseCache(model, spec))
    torch.testing.assert_close(torch.stack(out.logits, 1), recomputed_logits(model, out, mask, ids.shape[1]),
                               atol=2e-5, rtol=1e-5)


def test_a_reading_layer_that_cannot_find_the_cache_is_an_error_not_wrong_logits(monkeypatch):
    """A reading layer finds the cache through the key tensors its source's update returned (the
    model hands them on); were they copied on the way (another transformers), it would get the
    step's new keys only, with a mask over every position, and attend to them alone: an error,
    not silently wrong logits (a full-attention layer has no window that would have dropped keys)."""
    model = shared_gemma4()
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    monkeypatch.setattr(headops.HeadSparseCache, "of_keys", staticmethod(lambda key: None))
    ids, mask = left_padded_ids()
    with pytest.raises(RuntimeError, match=r"layer 5\): the mask covers 14 positions but the layer got 1 keys.*reads "
                                           r"another layer's keys .* without the headops.HeadSparseCache"):
        generate(model, ids, mask, headops.HeadSparseCache(model, spec), steps=2)
