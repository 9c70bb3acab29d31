"""Encoders beyond BERT (tests/test_patch.py): vision transformers (ViT, DeiT, DINOv2), whose
attention heads are a subject of their own (DINO's attention maps), protein language models (ESM),
DistilBERT, NomicBERT, ModernBERT (local and global layers) and the RoBERTa family. Encoders without
a cache give their attention modules no layer_idx (ViT, DeiT, DINOv2, DistilBERT, ESM): patch takes
them in module order (before 2026-12-07 it found none and refused the model), and DistilBERT's
q_lin and ModernBERT's Wqkv projections are recognised. A dense spec is the model; a masked head is
the model with that head's slice zeroed before the output projection."""

import pytest
import torch

import headops
from headops import research

from conftest import zero_heads_before

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
IMAGE = dict(image_size=32, patch_size=8)
# config class: (its options, the module receiving layer l's heads (the output projection), images or text)
ENCODERS = {
    "ViTConfig": (IMAGE, lambda m, l: m.layers[l].attention.o_proj, True),
    "DeiTConfig": (IMAGE, lambda m, l: m.layers[l].attention.o_proj, True),
    "Dinov2Config": (IMAGE, lambda m, l: m.encoder.layer[l].attention.o_proj, True),
    "EsmConfig": (dict(pad_token_id=1, mask_token_id=2), lambda m, l: m.encoder.layer[l].attention.output.dense,
                  False),
    "DistilBertConfig": (dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                         lambda m, l: m.transformer.layer[l].attention.out_lin, False),
    "NomicBertConfig": ({}, lambda m, l: m.layers[l].self_attn.o_proj, False),
    "ModernBertConfig": (dict(max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=8,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=3, sep_token_id=4),
                         lambda m, l: m.layers[l].attn.Wo, False),
    "RobertaConfig": ({}, lambda m, l: m.encoder.layer[l].attention.output.dense, False),
    "XLMRobertaConfig": ({}, lambda m, l: m.encoder.layer[l].attention.output.dense, False),
    "ElectraConfig": (dict(embedding_size=64), lambda m, l: m.encoder.layer[l].attention.output.dense, False),
}


def encoder(config):
    options, projection, images = ENCODERS[config]
    cfg = getattr(transformers, config)(**dict(BASE, **options))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg).eval(), projection, images


def inputs(images):
    g = torch.Generator().manual_seed(1)
    if images:
        return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g)), None
    ids = torch.randint(5, 97, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # (right padding: an encoder's batch)
    return dict(input_ids=ids, attention_mask=mask), 30


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def assert_same(got, want, kept):
    if kept is None:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:  # (a padded row's padding positions are not compared)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, :kept], want[1, :kept], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("config", sorted(ENCODERS))
def test_a_dense_spec_is_the_encoder_and_masked_heads_are_zeroed_slices(config):
    model, projection, images = encoder(config)
    batch, kept = inputs(images)
    spec = headops.HeadSpec.dense(model)
    masked = {0: [1], 1: [0, 3]}
    head_dim = spec.head_dim
    hooks = [zero_heads_before(projection(model, layer), heads, head_dim) for layer, heads in masked.items()]
    want_masked = hidden(model, batch)
    for hook in hooks:
        hook.remove()
    want = hidden(model, batch)
    headops.patch(model, spec)
    assert_same(hidden(model, batch), want, kept)
    headops.set_spec(model, spec.mask_heads(masked))
    assert_same(hidden(model, batch), want_masked, kept)
    headops.unpatch(model)
    torch.testing.assert_close(hidden(model, batch), want, atol=0, rtol=0)


def test_modernbert_keeps_its_local_layers_windows():
    """ModernBERT's local layers attend within a window around each token (both sides): a dense
    spec is the model, whose local windows change its output (against the same weights with
    every layer global)."""
    model, _, _ = encoder("ModernBertConfig")
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    batch, kept = inputs(False)
    want = hidden(model, batch)
    global_only, _, _ = encoder("ModernBertConfig")
    for layer in global_only.layers:
        layer.attn.sliding_window = None
    global_only.config.local_attention = 10 ** 4  # (its mask's window)
    assert (hidden(global_only, batch) - want).abs().max() > 1e-3
    headops.patch(model, headops.HeadSpec.dense(model))
    assert_same(hidden(model, batch), want, kept)


def test_head_importance_of_a_vision_transformer():
    """Head importance (one backward through the gates) on ViT, against central differences of
    the same loss."""
    model, _, _ = encoder("ViTConfig")
    batch, _ = inputs(True)

    def loss_fn(m, b):
        return m(**b).last_hidden_state.pow(2).mean()

    headops.patch(model, headops.HeadSpec.dense(model))
    got = headops.importance(model, [batch], loss_fn=loss_fn, normalize=False)
    want = research.importance_finite_difference(model, batch, loss_fn=loss_fn, heads=[(0, 1), (1, 2)])
    for layer, head in [(0, 1), (1, 2)]:
        torch.testing.assert_close(got[layer, head].double(), want[layer, head].double(), atol=1e-4, rtol=2e-3)


def test_albert_sharing_one_attention_module_across_layers_is_refused_by_name():
    cfg = transformers.AlbertConfig(**dict(BASE, embedding_size=32))
    model = transformers.AutoModel.from_config(cfg).eval()
    with pytest.raises(NotImplementedError, match="found 1 attention modules in AlbertModel.*expected 2"):
        headops.patch(model, headops.HeadSpec.dense(model))


V = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
AUDIO = dict(conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4)
# (model class, config options, inputs): towers and encoders whose dense spec must be the model
MORE = {
    "CLIPVisionModel": (dict(V, image_size=32, patch_size=8), lambda g: dict(pixel_values=torch.randn(2, 3, 32, 32,
                                                                                                       generator=g))),
    "SiglipVisionModel": (dict(V, image_size=32, patch_size=8), lambda g: dict(pixel_values=torch.randn(
        2, 3, 32, 32, generator=g))),
    "CLIPTextModel": (dict(V, vocab_size=97, max_position_embeddings=64), lambda g: dict(
        input_ids=torch.randint(5, 97, (2, 12), generator=g))),
    "SiglipTextModel": (dict(V, vocab_size=97, max_position_embeddings=64), lambda g: dict(
        input_ids=torch.randint(5, 97, (2, 12), generator=g))),
    "ViTMAEModel": (dict(V, image_size=32, patch_size=8), lambda g: dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g),
                                                                          noise=torch.rand(2, 16, generator=g))),
    "BeitModel": (dict(V, image_size=32, patch_size=8), lambda g: dict(pixel_values=torch.randn(2, 3, 32, 32,
                                                                                                generator=g))),
    "Wav2Vec2Model": (dict(V, **AUDIO), lambda g: dict(input_values=torch.randn(2, 1600, generator=g))),
    "HubertModel": (dict(V, **AUDIO), lambda g: dict(input_values=torch.randn(2, 1600, generator=g))),
}


def tower(name, **options):
    model_class = getattr(transformers, name)
    cfg = model_class.config_class(**dict(MORE[name][0], **options))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_class(cfg).eval(), MORE[name][1](torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", sorted(MORE))
def test_towers_and_audio_encoders_are_the_model_under_a_dense_spec(name):
    """CLIP's and SigLIP's vision and text towers (CLIP's text tower causal), ViT-MAE, BEiT without
    its relative position bias, wav2vec 2.0 and HuBERT: a dense spec is the model."""
    model, batch = tower(name)
    want = hidden(model, batch)
    headops.patch(model, headops.HeadSpec.dense(model))
    torch.testing.assert_close(hidden(model, batch), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("option", ["use_relative_position_bias", "use_shared_relative_position_bias"])
def test_an_additive_bias_in_the_mask_is_refused_not_ignored(option):
    """BEiT adds its relative position bias to the attention through the mask argument: a float
    mask of other values than 0 and -inf. Before 2026-12-07 headops read such a mask as "every key
    seen" and dropped the bias, silently (outputs 4e-3 off on a tiny BEiT); now refused by name."""
    model, batch = tower("BeitModel", **{option: True})
    with torch.no_grad():  # (the bias starts at 0: no bias)
        for name, table in model.named_parameters():
            if "relative_position_bias_table" in name:
                table.normal_(generator=torch.Generator().manual_seed(3))
    headops.patch(model, headops.HeadSpec.dense(model))
    with pytest.raises(NotImplementedError, match=r"adds other values than 0 and -inf.*BEiT's relative position "):
        hidden(model, batch)
