"""Falcon-H1: every layer runs attention beside a Mamba-2 mixer (config.layer_types "hybrid"),
whose convolution and recurrent states share the layer's cache with its keys and values. A
spec has a layer per model layer; a HeadSparseCache keeps each layer's keys as its spec says and
the mixer's states as transformers' cache does (before 2026-12-07 it was refused for these
models); caches from a dense prefill carry the states; the evaluation harness runs on them (and
on the hybrid models whose layers are one or the other: their contexts are captured alone)."""

import pytest
import torch

import headops

from conftest import (GENERATE_LOGITS, assert_generated_alike, assert_prefill_cache_decodes_as_the_model_filled_it,
                      evaluate_every_family, left_padded_ids)

transformers = pytest.importorskip("transformers")
from headops.testing import tiny_falcon_h1, tiny_hybrid  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back")


def generate(model, ids, mask, cache, **options):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0, cache=cache, **GENERATE_LOGITS, **options)


def test_the_cache_keeps_the_mixers_states_beside_the_heads_keys():
    """A dense spec's cache generates the model's logits and beams; StreamingLLM's what recomputing
    the whole sequence gives; the cache's layers are transformers' LinearAttention layers (the
    model's Mamba mixers read and write their states there) and reset and reorder them."""
    model, _ = tiny_falcon_h1()
    assert headops.attention_layers(model) == [("self", i) for i in range(4)]
    assert headops._model_attention.mixer_beside_attention(model) == {i: 1 for i in range(4)}
    ids, mask = left_padded_ids()
    want, beams = generate(model, ids, mask, None), generate(model, ids, mask, None, num_beams=2)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    cache = headops.HeadSparseCache(model, spec)
    assert_generated_alike(generate(model, ids, mask, cache), want)
    assert all(isinstance(layer, transformers.cache_utils.LinearAttentionCacheLayerMixin) for layer in cache.layers)
    assert cache.has_previous_state(0) and cache.get_conv_state(2) is not None
    assert torch.equal(generate(model, ids, mask, headops.HeadSparseCache(model, spec), num_beams=2).sequences,
                       beams.sequences)
    cache.reset()
    assert not cache.has_previous_state(0) and cache.longest_row(0) == 0
    assert_generated_alike(generate(model, ids, mask, cache), want)  # (a reset cache serves the next prompt)
    spec = headops.HeadSpec.streaming_llm(model, window=4, sinks=1)
    headops.set_spec(model, spec)
    out = generate(model, ids, mask, headops.HeadSparseCache(model, spec))
    full = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        recomputed = model(out.sequences, attention_mask=full, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), recomputed, atol=2e-5, rtol=1e-5)


def test_a_cache_from_a_dense_prefill_carries_the_mixers_states():
    """capture_prefill keeps each layer's mixer states (without its keys); from_prefill gives a
    cache those states and the kept keys: the next tokens' logits (a question of 3, then one) are
    those of a cache whose prompt ran full attention through the model."""
    model, _ = tiny_falcon_h1()
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    prefill = headops.capture_prefill(model, ids, observation_window=8)
    assert sorted(prefill.states) == [0, 1, 2, 3] and not hasattr(prefill.states[1], "keys")  # (states only)
    specs = (headops.HeadSpec.budget(model, budget=12), headops.HeadSpec.razor(model, {1: [0]}, window=4))
    assert_prefill_cache_decodes_as_the_model_filled_it(model, specs, prefill, ids)


@pytest.mark.parametrize("make", [tiny_falcon_h1, lambda: tiny_hybrid("qwen3_5")], ids=["falcon_h1", "qwen3_5"])
def test_the_evaluation_harness_on_hybrid_models(make):
    """headops.evaluate runs every method family of the standard grid on Falcon-H1 and on Qwen3.5
    (before 2026-12-07 both failed: the query-agnostic methods cut the prompt's prefill at the
    context, which recurrent states cannot be; the context is now captured alone), and the dense
    method answers as transformers' own generate."""
    evaluate_every_family(make()[0])


def test_zamba_is_refused_by_name():
    """Zamba's hybrid layers run one transformer block shared by several layers beside their Mamba
    mixers: patch finds no attention module of each layer's own, and a HeadSparseCache says why."""
    cfg = transformers.Zamba2Config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4, attention_head_dim=16,
                                    mamba_d_state=8, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=1,
                                    layers_block_type=["mamba", "hybrid"] * 2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    spec = headops.HeadSpec.dense(model)
    with pytest.raises(NotImplementedError, match="found 0 attention modules in Zamba2ForCausalLM"):
        headops.patch(model, spec)
    with pytest.raises(NotImplementedError, match=r"one transformer block shared by several layers .* \(Zamba\)"):
        headops.HeadSparseCache(model, spec)
