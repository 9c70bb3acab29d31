"""Encoder-decoder models (BART, Marian, Whisper) through headops.patch.

A spec has a layer per attention module: the encoder's self-attention layers, the decoder's
self-attention layers, then its cross-attention layers (headops.attention_layers). A dense spec
is the model (logits, greedy generation through transformers' EncoderDecoderCache, loss and
gradients); a masked head is that module's head (against the unpatched model with the head's
slice zeroed before its output projection); gate gradients are the finite differences'; what a
cross-attention layer cannot take is refused by name.
"""

import pytest
import torch

import headops

from conftest import zero_heads_before

transformers = pytest.importorskip("transformers")
from headops.testing import tiny_bart, tiny_whisper  # noqa: E402

FAMILIES = ["bart", "marian", "whisper"]


def make(family):
    return (tiny_whisper() if family == "whisper" else tiny_bart(family))[0]


def inputs(family, model):
    """Encoder inputs (BART/Marian: a right-padded row) and decoder ids, as keyword arguments."""
    g = torch.Generator().manual_seed(3)
    dec = torch.randint(3, 97, (2, 6), generator=g)
    if family == "whisper":
        return dict(input_features=torch.randn(2, 8, 32, generator=g), decoder_input_ids=dec)
    ids = torch.randint(3, 97, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)


def test_attention_layers_name_each_spec_layer():
    model = make("bart")
    assert headops.attention_layers(model) == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1),
                                               ("decoder", 2), ("cross", 0), ("cross", 1), ("cross", 2)]
    spec = headops.HeadSpec.dense(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (8, 4, 4, 8)
    assert headops.attention_layers(headops.testing.tiny_llama()[0]) == [("self", 0), ("self", 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_spec_is_the_model(family):
    """Logits (a padded encoder row), greedy and beam-search generation with transformers' cache
    (its cross-attention keys computed once, reordered by the beams), a training step's loss and
    gradients: as the unpatched model."""
    model = make(family)
    kw = inputs(family, model)
    gen_kw = {n: t for n, t in kw.items() if n != "decoder_input_ids"}
    with torch.no_grad():
        want = model(**kw).logits
        want_tokens = model.generate(**gen_kw, max_new_tokens=6, do_sample=False)
        want_beams = model.generate(**gen_kw, max_new_tokens=5, do_sample=False, num_beams=3)
    labels = kw["decoder_input_ids"]
    want_loss = model(**{n: t for n, t in kw.items() if n != "decoder_input_ids"}, labels=labels).loss
    want_loss.backward()
    want_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    headops.patch(model, headops.HeadSpec.dense(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(**gen_kw, max_new_tokens=6, do_sample=False), want_tokens)
        assert torch.equal(model.generate(**gen_kw, max_new_tokens=5, do_sample=False, num_beams=3), want_beams)
    loss = model(**{n: t for n, t in kw.items() if n != "decoder_input_ids"}, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    assert sum(g is not None for g in want_grads) > 20
    for got, grad in zip((p.grad for p in model.parameters()), want_grads):
        assert (got is None) == (grad is None)
        if grad is not None:
            torch.testing.assert_close(got, grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bart", "whisper"])
def test_masked_heads_are_their_modules_heads(family):
    """One head masked in an encoder layer, a decoder self-attention layer and a cross-attention
    layer: the logits are the unpatched model's with those heads' outputs zeroed in the modules
    attention_layers names (the spec's layer order maps onto the model's modules)."""
    model = make(family)
    kw = inputs(family, model)
    layers = headops.attention_layers(model)
    masked = {1: [2], layers.index(("decoder", 1)): [0, 3], layers.index(("cross", 0)): [1]}
    modules = {("encoder", i): layer.self_attn for i, layer in enumerate(model.model.encoder.layers)}
    modules.update({("decoder", i): layer.self_attn for i, layer in enumerate(model.model.decoder.layers)})
    modules.update({("cross", i): layer.encoder_attn for i, layer in enumerate(model.model.decoder.layers)})
    hooks = [zero_heads_before(modules[layers[layer]].out_proj, heads, 8) for layer, heads in masked.items()]
    with torch.no_grad():
        want = model(**kw).logits
    for h in hooks:
        h.remove()
    headops.patch(model, headops.HeadSpec.dense(model).mask_heads(masked))
    with torch.no_grad():
        got = model(**kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    headops.unpatch(model)
    with torch.no_grad():
        assert (model(**kw).logits - want).abs().max() > 1e-3  # (the masks mattered)


def test_gate_gradients_are_the_finite_differences():
    """Head importance (|dL/dgate| at gate = 1) on BART, every layer kind, against central
    differences of the loss."""
    from headops import research

    model = make("bart")
    kw = inputs("bart", model)
    batch = dict(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], labels=kw["decoder_input_ids"])

    def loss_fn(m, b):
        return m(**b).loss

    headops.patch(model, headops.HeadSpec.dense(model))
    got = research.importance(model, [batch], loss_fn=loss_fn, normalize=False)
    heads = [(layer, h) for layer in range(8) for h in (0, 3)]
    model.double()
    want = research.importance_finite_difference(model, {n: t for n, t in batch.items()}, loss_fn=loss_fn,
                                                 heads=heads)
    for layer, h in heads:
        assert abs(got[layer, h].item() - abs(want[layer, h].item())) <= 1e-4 + 1e-3 * abs(want[layer, h].item())


def test_streaming_heads_in_the_self_attention_stacks():
    """Windows and sinks where a position means something (the encoder's keys around each query,
    the decoder's earlier tokens): the patched model's logits equal the unpatched model's with
    those layers' attention computed by the reference (a hand-made eager oracle)."""
    from headops import reference

    model = make("bart")
    kw = inputs("bart", model)
    layers = headops.attention_layers(model)
    spec = headops.HeadSpec.dense(model)
    spec.window[0] = torch.tensor([2, -1, 3, 1])
    spec.sinks[0] = torch.tensor([1, 0, 0, 2])
    decoder = layers.index(("decoder", 2))
    spec.window[decoder] = torch.tensor([-1, 2, 2, 1])
    spec.sinks[decoder] = torch.tensor([0, 1, 0, 0])

    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def oracle(module, q, k, v, mask, scaling=None, dropout=0.0, **rest):
        kind = layers[module._oracle_layer] if hasattr(module, "_oracle_layer") else None
        if kind not in (layers[0], layers[decoder]):
            return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, dropout=dropout, **rest)
        layer = module._oracle_layer
        valid = None if mask is None else mask[:, 0, -1, :].bool() if mask.dtype == torch.bool else \
            mask[:, 0, -1, :] > torch.finfo(mask.dtype).min / 2
        bias = None if valid is None else torch.where(valid, 0.0, float("-inf"))[:, None, :].expand(-1, 4, -1)
        out = reference.attention(q, k, v, layout="bhsd", causal=kind[0] == "decoder", softmax_scale=scaling,
                                  window=spec.window[layer], sinks=spec.sinks[layer], key_bias=bias)
        return out.transpose(1, 2), None

    AttentionInterface.register("headops_test_oracle", oracle)
    AttentionMaskInterface.register("headops_test_oracle", sdpa_mask)
    model.model.encoder.layers[0].self_attn._oracle_layer = 0
    model.model.decoder.layers[2].self_attn._oracle_layer = decoder
    model.set_attn_implementation("headops_test_oracle")
    with torch.no_grad():
        want = model(**kw).logits
    model.set_attn_implementation("sdpa")
    headops.patch(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, want, atol=1e-5, rtol=1e-5)


def test_what_cross_attention_cannot_take_is_refused():
    """Windows and sinks in a cross-attention layer are refused by name (a spec made by hand, or
    HeadSpec.streaming naming such a layer); StreamingLLM leaves those layers full."""
    model = make("bart")
    cross = headops.attention_layers(model).index(("cross", 0))
    spec = headops.HeadSpec.dense(model)
    spec.window[:] = 4
    with pytest.raises(ValueError, match=r"window must be -1 with sinks 0 in layer 5, cross-attention layer 0"):
        headops.patch(model, spec)
    with pytest.raises(ValueError, match=r"heads must be in layers other than cross-attention layers .*layer 6, "
                                         r"cross-attention layer 1"):
        headops.HeadSpec.streaming(model, {0: [1], 6: [0]}, window=4)
    streaming = headops.HeadSpec.streaming_llm(model, window=4, sinks=1)
    assert (streaming.window[:cross] == 4).all() and (streaming.window[cross:] == -1).all()
    assert (streaming.sinks[cross:] == 0).all()
    headops.patch(model, streaming)  # (windows and sinks in the self-attention stacks are taken)
    with pytest.raises(NotImplementedError, match="EncoderDecoderCache"):
        headops.HeadSparseCache(model, headops.HeadSpec.dense(model))


def test_t5_and_unequal_stacks_are_refused_by_name():
    from transformers import BartConfig, T5Config

    with pytest.raises(NotImplementedError, match="T5 adds a relative position bias"):
        headops.HeadSpec.dense(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    with pytest.raises(NotImplementedError, match="encoder has 4 attention heads and the decoder 2"):
        headops.HeadSpec.dense(BartConfig(encoder_attention_heads=4, decoder_attention_heads=2, d_model=32))


def test_probes_report_every_layer_kind():
    """headops.probe over BART: a record per spec layer, each over its own queries (the encoder's
    tokens; the decoder's, in its self- and cross-attention layers)."""
    model = make("bart")
    kw = inputs("bart", model)
    headops.patch(model, headops.HeadSpec.dense(model))
    with headops.probe(model, sink_mass=True) as rec:
        with torch.no_grad():
            model(**kw)
    layers = headops.attention_layers(model)
    assert len(rec) == 8 and all(len(rec[layer]) == 1 for layer in range(8))
    assert rec[0][0].sink_mass.shape == (2, 4, 11)
    assert rec[layers.index(("decoder", 0))][0].sink_mass.shape == (2, 4, 6)
    assert rec[layers.index(("cross", 1))][0].sink_mass.shape == (2, 4, 6)


def test_a_peft_wrapped_encoder_decoder_is_patched_through_its_wrapper():
    """LoRA adapters around BART: the wrapper finds the three stacks as the model does; a dense
    spec is the (adapter-initialised, so unchanged) model, a masked cross-attention head changes it."""
    peft = pytest.importorskip("peft")
    model = make("bart")
    kw = inputs("bart", model)
    with torch.no_grad():
        want = model(**kw).logits
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         task_type="SEQ_2_SEQ_LM"))
    assert headops.attention_layers(wrapped) == headops.attention_layers(model)
    headops.patch(wrapped, headops.HeadSpec.dense(model))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**kw).logits, want, atol=1e-5, rtol=1e-5)
        headops.set_spec(wrapped, headops.HeadSpec.dense(model).mask_heads({5: [1]}))
        assert (wrapped(**kw).logits - want).abs().max() > 1e-4


def test_streaming_self_attention_generates_alike_through_every_cache():
    """StreamingLLM in the self-attention stacks (cross-attention full): greedy tokens through
    transformers' dynamic cache, its static cache (slots past the last query left out) and no
    cache at all are the same."""
    model = make("bart")
    kw = inputs("bart", model)
    gen = dict(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], max_new_tokens=6, do_sample=False)
    headops.patch(model, headops.HeadSpec.streaming_llm(model, window=3, sinks=1))
    with torch.no_grad():
        dynamic = model.generate(**gen)
        assert torch.equal(model.generate(**gen, cache_implementation="static"), dynamic)
        assert torch.equal(model.generate(**gen, use_cache=False), dynamic)
