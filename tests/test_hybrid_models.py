"""Hybrid models through headops.patch: Qwen3-Next, Qwen3.5, OLMo hybrid, Nemotron-H, Jamba,
MiniMax and Granite 4 (and Kimi Linear, with latent attention), whose layers mix softmax
attention with Gated DeltaNet, Mamba, lightning-attention or MLP layers (config.layer_types).

A spec has a layer per softmax-attention layer (headops.attention_layers names the model's
layer of each); the other layers run as the model has them. A dense spec is the model (logits,
greedy generation through transformers' hybrid cache, loss and gradients); a masked head is its
module's head; a streaming spec generates through the model's cache as it recomputes without
one; head importance equals central differences; probes report every attention layer;
HeadSparseCache holds the attention layers' keys and, as transformers' cache does, the other
layers' states (dense: the model's tokens, beams too; streaming: the recomputed ones). A module of a
non-attention layer that names its projections q_proj, k_proj, v_proj (OLMo hybrid's Gated
DeltaNet, MiniMax's lightning attention) is left alone.
"""

import pytest
import torch

import headops

from conftest import (GENERATE_LOGITS, assert_dense_and_masked_heads_are_the_model, assert_generated_alike,
                      assert_importance_is_the_finite_differences, assert_training_steps_alike,
                      left_padded_ids as batch, training_step, zero_heads_before)

transformers = pytest.importorskip("transformers")
from headops.testing import tiny_hybrid  # noqa: E402

FAMILIES = ["qwen3_next", "qwen3_5", "olmo_hybrid", "nemotron_h", "jamba", "minimax", "granite_hybrid"]
ATTENTION_LAYERS = {"olmo_hybrid": [2]}  # the others: layers 1 and 3 of 4


def attention_module(model, layer):
    layer = model.model.layers[layer]
    return getattr(layer, "self_attn", None) or getattr(layer, "mixer", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_spec_has_a_layer_per_softmax_attention_layer(family):
    model, _ = tiny_hybrid(family)
    layers = ATTENTION_LAYERS.get(family, [1, 3])
    assert headops.attention_layers(model) == [("self", i) for i in layers]
    spec = headops.HeadSpec.dense(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (len(layers), 4, 2, 16)
    headops.patch(model, spec)
    assert [attention_module(model, i)._headops_layer for i in layers] == list(range(len(layers)))
    others = [m for i in range(4) if i not in layers for m in model.model.layers[i].modules()]
    assert not any(hasattr(m, "_headops_spec") for m in others)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_spec_is_the_model(family):
    """A left-padded batch's logits, greedy tokens through transformers' hybrid cache (the other
    layers' convolution and recurrent states beside the attention layers' keys), a training
    step's loss and every parameter's gradient: as the unpatched model."""
    model, _ = tiny_hybrid(family)
    ids, mask = batch()
    rows = 1 if family == "minimax" else 2  # (MiniMax's padded decode: test_minimax_padded_decode_is_refused)
    gen = dict(input_ids=ids[:rows], attention_mask=mask[:rows], max_new_tokens=6, min_new_tokens=6,
               do_sample=False, pad_token_id=0, **GENERATE_LOGITS)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_generated = model.generate(**gen)
    want_step = training_step(model, input_ids=ids, attention_mask=mask, labels=ids)
    headops.patch(model, headops.HeadSpec.dense(model))
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=1e-5, rtol=1e-5)
        assert_generated_alike(model.generate(**gen), want_generated)
    assert_training_steps_alike(training_step(model, input_ids=ids, attention_mask=mask, labels=ids), want_step)


@pytest.mark.parametrize("family", ["qwen3_next", "nemotron_h", "minimax"])
def test_a_masked_head_is_its_modules_head(family):
    """Spec layer 1 is the model's layer 3: its head 2 masked equals the unpatched model with that
    head's slice zeroed before the layer's o_proj (Qwen3-Next gates the attention output first:
    0 stays 0)."""
    model, _ = tiny_hybrid(family)
    ids, _ = batch()

    hook = zero_heads_before(attention_module(model, 3).o_proj, [2], 16)
    with torch.no_grad():
        want = model(ids).logits
    hook.remove()
    headops.patch(model, headops.HeadSpec.dense(model).mask_heads({1: [2]}))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    headops.unpatch(model)
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwen3_5", "jamba"])
def test_a_streaming_spec_generates_through_the_models_cache_as_without(family):
    """StreamingLLM in every attention layer (window 3, one sink): greedy tokens through
    transformers' hybrid cache equal those recomputed without a cache."""
    model, _ = tiny_hybrid(family)
    ids, mask = batch()
    headops.patch(model, headops.HeadSpec.streaming_llm(model, window=3, sinks=1))
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
               pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**gen), model.generate(**gen, use_cache=False))


def test_head_importance_is_the_finite_differences():
    """|dL/dgate| of every head of Qwen3.5's two attention layers against central differences of
    the loss in float64."""
    model, _ = tiny_hybrid("qwen3_5")
    ids, mask = batch()
    headops.patch(model, headops.HeadSpec.dense(model))
    got = assert_importance_is_the_finite_differences(model, dict(input_ids=ids, attention_mask=mask, labels=ids),
                                                      [(layer, h) for layer in range(2) for h in range(4)])
    assert got.shape == (2, 4)


def test_probes_report_every_attention_layer():
    model, _ = tiny_hybrid("qwen3_next")
    ids, _ = batch()
    headops.patch(model, headops.HeadSpec.dense(model))
    with headops.probe(model, sink_mass=True) as rec:
        with torch.no_grad():
            model(ids)
    assert len(rec) == 2 and all(rec[layer][0].sink_mass.shape == (2, 4, 13) for layer in range(2))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "minimax"])
def test_head_sparse_cache_holds_the_attention_layers_beside_the_others_states(family):
    """HeadSparseCache(model, spec) on a hybrid model: a storage per softmax-attention layer, and for
    the other layers transformers' own layers of their convolution and recurrent states. A dense
    spec generates the model's own tokens (left-padded batch); StreamingLLM through it generates
    what recomputing without a cache does, holding less than a dense cache would."""
    model, _ = tiny_hybrid(family)
    ids, mask = batch()
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
               pad_token_id=0, **GENERATE_LOGITS)
    with torch.no_grad():
        want = model.generate(**gen)
    dense = headops.HeadSpec.dense(model)
    headops.patch(model, dense)
    cache = headops.HeadSparseCache(model, dense)
    attention = [i for _, i in headops.attention_layers(model)]
    assert len(cache.layers) == 4 and len(cache._layers) == len(attention)
    assert all(type(cache.layers[i]).__name__ == "_TransformersLayer" for i in attention)
    assert all(type(cache.layers[i]).__name__ != "_TransformersLayer" for i in range(4) if i not in attention)
    with torch.no_grad():
        assert_generated_alike(model.generate(**gen, cache=cache), want)
        streaming = headops.HeadSpec.streaming_llm(model, window=4, sinks=1)
        headops.set_spec(model, streaming)
        cache = headops.HeadSparseCache(model, streaming)
        assert_generated_alike(model.generate(**gen, cache=cache), model.generate(**gen, use_cache=False))
    assert cache.nbytes() < cache.dense_nbytes()


def test_head_sparse_cache_on_a_hybrid_model_beam_search_and_compression_methods():
    """Qwen3.5: beam search through a HeadSparseCache reorders the recurrent states with the kept
    keys (the model's own beams); SnapKV budgets and RazorAttention generate through it; what
    transformers' cache cannot do to recurrent states is refused by name."""
    model, _ = tiny_hybrid("qwen3_5")
    ids, mask = batch()
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
               pad_token_id=0)
    with torch.no_grad():
        want = model.generate(**gen, num_beams=3)
    dense = headops.HeadSpec.dense(model)
    headops.patch(model, dense)
    with torch.no_grad():
        assert torch.equal(model.generate(**gen, num_beams=3, cache=headops.HeadSparseCache(model, dense)), want)
        for spec in (headops.HeadSpec.budget(model, budget=10), headops.HeadSpec.razor(model, {0: [1]}, window=4,
                                                                                         sinks=1)):
            headops.set_spec(model, spec)
            cache = headops.HeadSparseCache(model, spec)
            out = model.generate(**gen, cache=cache)
            assert out.shape == (2, 19) and cache.ideal_nbytes() < cache.dense_nbytes()
    headops.HeadSparseCache(model, dense).batch_repeat_interleave(2)  # (no states held yet: nothing to refuse)
    with pytest.raises(NotImplementedError, match="recurrent states, which cannot be cut back"):
        cache.crop(-1)
    with pytest.raises(NotImplementedError, match="recurrent states"):
        cache.batch_select_indices([0])


def test_a_head_sparse_cache_made_by_hand_or_for_minimax_is_refused():
    """A cache made from keywords knows no linear layers: the first one asking for its states is
    refused by name; MiniMax's own cache class is required by the model (transformers' error)."""
    model, _ = tiny_hybrid("qwen3_next")
    headops.patch(model, headops.HeadSpec.dense(model))
    by_hand = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    ids, _ = batch()
    with pytest.raises(NotImplementedError, match="does not hold: make it from the model"):
        model.generate(ids[:1], max_new_tokens=2, cache=by_hand, pad_token_id=0)
    minimax, _ = tiny_hybrid("minimax")
    spec = headops.HeadSpec.dense(minimax)
    headops.patch(minimax, spec)
    with pytest.raises(ValueError, match="MiniMax uses cache of its own"):
        minimax.generate(ids[:1], max_new_tokens=2, cache=headops.HeadSparseCache(minimax, spec), pad_token_id=0)


def test_minimax_padded_decode_is_refused():
    """transformers' MiniMax cache sizes the decode steps' masks by its first layer, a linear one (one
    position where the attention layers hold every key): transformers' own attention then
    broadcasts that one position over the keys, and the padding is lost. headops cannot tell which
    keys are padding and refuses by name, rather than leaving keys out (before 2026-12-06 it cut
    them to the mask, as a static cache's unwritten slots, and generated other tokens)."""
    model, _ = tiny_hybrid("minimax")
    ids, mask = batch()
    headops.patch(model, headops.HeadSpec.dense(model))
    with pytest.raises(NotImplementedError, match="its cache sized the mask by another layer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name,kind", [("DeepseekV32Config", "indexed_attention"),
                                       ("DeepseekV4Config", "heavily_compressed_attention")])
def test_attention_headops_does_not_compute_is_refused_naming_the_layer_type(name, kind):
    """DeepSeek V3.2's indexed (sparse) attention and V4's compressed attention are not softmax
    attention over the keys: patch refuses them by their layer type, before anything changes
    (before 2026-12-06: "found 0 attention modules")."""
    cfg = getattr(transformers, name)(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        q_lora_rank=24, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(NotImplementedError, match=f"layers of type '{kind}' .config.layer_types.; '{kind}': "):
        headops.patch(model, headops.HeadSpec.dense(model))
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", ["dense", "streaming"])
def test_a_cache_built_from_a_dense_prefill_carries_the_prompts_states(kind):
    """capture_prefill of a hybrid model keeps its other layers' states after the prompt;
    HeadSparseCache.from_prefill gives each cache a copy: the question, then greedy decoding through
    it, as through a cache the patched model filled itself (prefill="full")."""
    model, _ = tiny_hybrid("qwen3_5")
    g = torch.Generator().manual_seed(5)
    context, question = torch.randint(3, 97, (1, 20), generator=g), torch.randint(3, 97, (1, 4), generator=g)
    spec = headops.HeadSpec.dense(model) if kind == "dense" else headops.HeadSpec.streaming_llm(model, window=4,
                                                                                                sinks=1)
    prefill = headops.capture_prefill(model, context, observation_window=4)
    assert sorted(prefill.states) == [0, 2]
    headops.patch(model, spec)
    ids = torch.cat([context, question], dim=1)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **GENERATE_LOGITS)
    with torch.no_grad():
        first = headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=4)
        got = model.generate(ids, cache=first, **gen)
        again = model.generate(ids, cache=headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=4),
                               **gen)  # (the prefill's states untouched by the first)
        row = headops.HeadSparseCache(model, spec, prefill="full", max_step=4)
        model(context, cache=row, use_cache=True)
        want = model.generate(ids, cache=row, **gen)
    for out in (got, again):  # (the logits: this tiny model's greedy tokens survive fresh states)
        assert_generated_alike(out, want)
    with pytest.raises(NotImplementedError, match="recurrent states after the whole prompt hold no prefix's"):
        prefill.prefix(10, 4)


def test_kimi_linear_latent_attention_beside_kda_layers():
    """Kimi Linear has both: KDA (linear) layers and multi-head latent attention (values of 12 dims,
    keys of 24). The spec has its two attention layers of head dim 12; a dense spec is the model
    (logits, each generated step's); a masked head is its 12-dim slice zeroed before o_proj; a
    HeadSparseCache is refused for the latent cache."""
    model, _ = tiny_hybrid("kimi_linear")
    spec = headops.HeadSpec.dense(model)
    assert (spec.num_layers, spec.num_heads, spec.head_dim) == (2, 4, 12)
    assert headops.attention_layers(model) == [("self", 1), ("self", 3)]
    assert_dense_and_masked_heads_are_the_model(model, spec, {1: [1]},
                                                lambda layer: attention_module(model, (1, 3)[layer]).o_proj, atol=1e-5)
    with pytest.raises(NotImplementedError, match="multi-head latent attention"):
        headops.HeadSparseCache(model, spec)
