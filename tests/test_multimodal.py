"""Image-text models as AutoModelForCausalLM loads the released checkpoints (Gemma 3, Gemma 4:
Gemma3/4ForConditionalGeneration): headops patches the language model's attention only; the vision
and audio towers keep theirs (before 2026-12-07 Gemma 4's towers' attention modules were counted
as text layers and patch refused the model, and every tower was switched to headops' attention,
which has no spec for them). Text prompts run as the model; images are refused by name (their
tokens attend to each other bidirectionally, a mask headops does not carry)."""

import pytest
import torch

import headops

from conftest import GENERATE_LOGITS, assert_generated_alike, left_padded_ids

transformers = pytest.importorskip("transformers")
from headops.testing import tiny_multimodal  # noqa: E402


def towers(model):
    return [getattr(model.model, name) for name in ("vision_tower", "audio_tower")
            if getattr(model.model, name, None) is not None]


@pytest.mark.parametrize("family", ["gemma4", "gemma3"])
def test_the_language_model_is_patched_and_the_towers_keep_their_attention(family):
    """A dense spec is the model (a left-padded batch's logits, generated steps through transformers'
    cache and through a HeadSparseCache); the towers' attention implementation stays the model's
    while patched, as does the top config's; capture_prefill restores the text layers'; unpatch
    restores them all."""
    model, _ = tiny_multimodal(family)
    assert type(model).__name__.endswith("ForConditionalGeneration")
    ids, mask = left_padded_ids()
    gen = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
               **GENERATE_LOGITS)
    with torch.no_grad():
        want, want_generated = model(ids, attention_mask=mask).logits, model.generate(ids, **gen)
    spec = headops.HeadSpec.dense(model)
    assert spec.num_layers == 4
    own = [t.config._attn_implementation for t in towers(model)]  # (Gemma 4's audio tower: eager)
    assert own
    headops.patch(model, spec)
    language = model.model.language_model
    assert [m._headops_layer for m in (layer.self_attn for layer in language.layers)] == [0, 1, 2, 3]
    assert language.config._attn_implementation == "headops"
    assert [t.config._attn_implementation for t in towers(model)] == own
    assert not any(hasattr(m, "_headops_spec") for t in towers(model) for m in t.modules())
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, **gen)
        cached = model.generate(ids, cache=headops.HeadSparseCache(model, spec), **gen)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=2e-5, rtol=1e-5)
    assert_generated_alike(generated, want_generated)
    assert_generated_alike(cached, want_generated)
    headops.capture_prefill(model, ids[:, 4:], observation_window=4)
    assert language.config._attn_implementation == "headops"
    headops.unpatch(model)
    assert language.config._attn_implementation == "sdpa" and model.config._attn_implementation == "sdpa"
    assert [t.config._attn_implementation for t in towers(model)] == own


def test_an_image_is_refused_by_name():
    """An image's tokens attend to each other both ways (token_type_ids): the patched model refuses
    that mask by name (before, the vision tower ran headops' attention without a spec)."""
    model, _ = tiny_multimodal("gemma3")
    headops.patch(model, headops.HeadSpec.dense(model))
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 2:6] = model.config.image_token_id
    with pytest.raises(NotImplementedError, match="builds a custom attention mask here .* bidirectional image tokens"):
        with torch.no_grad():
            model(ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == model.config.image_token_id).long())
