"""Values of another head dim than the queries' and keys' (Dv != D): multi-head latent attention
(DeepSeek V2/V3, GLM-4.7-Flash, MiniCPM3).

headops.attention takes v ``[..., Dv]`` and gives out ``[..., Dv]``; out_scale and out_bias are
``[Hq, Dv]``. Against the float64 reference, which computes P V at Dv itself: outputs, lse and
every gradient, probes, packed rows and key buffers, 16-bit inputs, a compiled call; bad shapes
refused by name. Through headops.patch: tiny models of four families are themselves under a
dense spec (logits, generation, gradients), a masked head or a LoFiT scale is that head's slice
of the output, windows and sinks are the reference's inside the model, head importance is the
finite differences'; HeadSparseCache is refused (the layers cache a latent, not per-head keys).
"""

import pytest
import torch

import headops
from headops import reference

from conftest import (GENERATE_LOGITS, OUT_ATOL, _tensor, assert_close, assert_compiled_as_eager,
                      assert_generated_alike, assert_importance_is_the_finite_differences,
                      assert_reference_with_gradients, assert_training_steps_alike, edit_heads_before, head_params,
                      left_padded_ids as batch, logits_with_reference_attention, training_step, zero_heads_before)

transformers = pytest.importorskip("transformers")
from headops.testing import tiny_latent_attention  # noqa: E402

FEATURES = ("scale", "window", "sinks", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate")
DIMS = [(24, 16), (16, 24), (13, 7)]  # (D of q and k, Dv): narrower values, wider values, odd dims


def make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=torch.float64, layout="bshd", strided=False):
    return (_tensor(B, Sq, Hq, D, dtype, layout, strided), _tensor(B, Sk, Hkv, D, dtype, layout, strided),
            _tensor(B, Sk, Hkv, Dv, dtype, layout, strided))


def params(B, Hq, Sk, Dv, features):
    """head_params with out_scale and out_bias at the values' head dim, a gate kept off 0 where its
    gradient is compared (a head gated to exactly 0 is not computed)."""
    kw = head_params(B, Hq, Sk, Dv, features, per_batch=True)
    if "gate" in kw:
        kw["gate"] = kw["gate"].masked_fill(kw["gate"] == 0, 0.5)
    return kw


def check_with_gradients(q, k, v, kw, **call):
    """conftest.assert_reference_with_gradients (out, lse and every gradient against the reference
    in float64), and out of v's head dim [B, Sq, Hq, Dv] (layout bshd or bhsd alike), contiguous."""
    out = assert_reference_with_gradients(q, k, v, kw, **call)
    assert out.shape == (*q.shape[:3], v.shape[3])
    assert out.is_contiguous()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("features", [(), ("window", "sinks"), FEATURES], ids=["plain", "streaming", "all"])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"D{d[0]}_Dv{d[1]}")
def test_values_of_another_head_dim_match_the_reference_with_gradients(dims, features, causal, layout):
    """GQA, Sq < Sk (queries bottom-right aligned), strided inputs, every per-head argument with
    out_scale/out_bias [B, Hq, Dv]."""
    D, Dv = dims
    B, Sq, Sk, Hq, Hkv = 2, 9, 14, 4, 2
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, layout=layout, strided=True)
    check_with_gradients(q, k, v, params(B, Hq, Sk, Dv, features), layout=layout, causal=causal)


def test_the_default_scale_is_the_keys_head_dim():
    """Wider values pad q and k with zeros: the scale left out is still 1/sqrt(D) of q's D, not of
    the padded width (a call whose values are the same but narrower gives the same logits)."""
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8, 32)
    _, lse = headops.attention(q, k, v, return_lse=True)
    _, want = headops.attention(q, k, v[..., :8], return_lse=True)
    assert_close(lse, want, 1e-13, what="lse")
    assert_close(lse, reference.attention(q, k, v, return_lse=True)[1], 1e-12, what="lse")


@pytest.mark.parametrize("dims", DIMS[:2], ids=lambda d: f"D{d[0]}_Dv{d[1]}")
def test_packed_rows_and_key_buffers(dims):
    """sequence_ids and key_lengths with values of another head dim, gradients too."""
    D, Dv = dims
    q, k, v = make_qkv(2, 12, 12, 4, 2, D, Dv)
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [5] * 12])
    check_with_gradients(q, k, v, params(2, 4, 12, Dv, ("window", "sinks", "out_scale", "key_bias")),
                         sequence_ids=ids)
    q, k, v = make_qkv(3, 2, 10, 4, 2, D, Dv)
    check_with_gradients(q, k, v, params(3, 4, 10, Dv, ("sink_logit", "out_bias", "gate")),
                         key_lengths=torch.tensor([3, 10, 7]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", DIMS[:2], ids=lambda d: f"D{d[0]}_Dv{d[1]}")
def test_16_and_32_bit_inputs(dims, dtype):
    """The kernels' dtypes at the padded dim, out in the input dtype within its usual tolerance of
    the float64 reference; gradients finite and of the inputs' shapes."""
    D, Dv = dims
    q, k, v = make_qkv(2, 40, 40, 4, 2, D, Dv, dtype=dtype)
    kw = params(2, 4, 40, Dv, ("window", "sinks", "out_scale", "sink_logit"))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = headops.attention(q, k, v, **kw)
    want = reference.attention(*(t.detach().double() for t in (q, k, v)), **kw)
    assert out.dtype == dtype and out.shape == (2, 40, 4, Dv)
    assert_close(out, want, 8 * OUT_ATOL[dtype])
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("dims", DIMS[:2], ids=lambda d: f"D{d[0]}_Dv{d[1]}")
def test_probes(dims):
    """Statistics do not read the values: those of a call with values of another head dim are the
    reference's, and its out is the plain call's."""
    D, Dv = dims
    q, k, v = make_qkv(2, 11, 11, 4, 2, D, Dv)
    kw = params(2, 4, 11, Dv, ("window", "sinks", "out_scale"))
    probe = headops.Probe(spans=[[0, 2], [4, 9]], distances=[[0, 1], [1, 4]], topk=2, entropy=True, sink_mass=True)
    out, stats = headops.attention(q, k, v, probe=probe, **kw)
    assert_close(out, reference.attention(q, k, v, **kw), 1e-12)
    want = reference.probe(q, k, v, spans=torch.tensor([[0, 2], [4, 9]]), distances=torch.tensor([[0, 1], [1, 4]]),
                           topk=2, entropy=True, sink_mass=True, window=kw["window"], sinks=kw["sinks"])
    for name in ("span_mass", "distance_mass", "entropy", "sink_mass", "topk_prob"):  # (statistics in float32)
        assert_close(getattr(stats, name), want[name], 1e-6, what=name)
    assert torch.equal(stats.topk_index, want["topk_index"])


def test_compiled_as_eager():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8, 5, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    assert_compiled_as_eager(lambda q, k, v, w: headops.attention(q, k, v, window=w, sinks=1), leaves, [2, 4])


def test_bad_shapes_are_refused_by_name():
    q, k, v = make_qkv(1, 4, 6, 4, 2, 8, 5)
    with pytest.raises(ValueError, match=r"out_scale must be of shape \[Hq, Dv\] = \[4, 5\] or \[B, Hq, Dv\] = "
                                         r"\[1, 4, 5\], got \(4, 8\)"):
        headops.attention(q, k, v, out_scale=torch.ones(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out_bias must be of shape \[Hq, D\] = \[4, 8\]"):
        headops.attention(q, k, k, out_bias=torch.ones(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"v must be the shape of k \(1, 6, 2, 8\) but for the head dim"):
        headops.attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="v must be a tensor with head dim >= 1"):
        headops.attention(q, k, v[..., :0])
    with pytest.raises(RuntimeError, match="k and v must have one shape"):  # (the raw op takes one head dim)
        torch.ops.headops.attention_fwd(q, k, v, True, False, 8 ** -0.5, None, None, None, None, None, None, None,
                                        None, None, True, True, False, False)


# ---- models with multi-head latent attention ----------------------------------------------------

FAMILIES = ["deepseek_v3", "deepseek_v2", "glm4_moe_lite", "minicpm3"]


def value_dim(model):
    return model.config.v_head_dim


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_spec_is_the_model(family):
    """A left-padded batch's logits, greedy generation through transformers' cache (which holds the
    latents), a static cache's, and a training step's loss and gradients: as the unpatched model.
    The spec's head dim is the values' (GLM's config names its rotary dim head_dim)."""
    model, _ = tiny_latent_attention(family)
    ids, mask = batch()
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
               pad_token_id=0, **GENERATE_LOGITS)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_generated = {kind: model.generate(**gen, **kw) for kind, kw in
                          (("dynamic", {}), ("static", {"cache_implementation": "static"}))}
    want_step = training_step(model, input_ids=ids, attention_mask=mask, labels=ids)
    spec = headops.HeadSpec.dense(model)
    assert spec.head_dim == value_dim(model)
    headops.patch(model, spec)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=1e-5, rtol=1e-5)
        for kind, kw in (("dynamic", {}), ("static", {"cache_implementation": "static"})):
            assert_generated_alike(model.generate(**gen, **kw), want_generated[kind])
    assert_training_steps_alike(training_step(model, input_ids=ids, attention_mask=mask, labels=ids), want_step)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe_lite"])
def test_masked_heads_and_lofit_scales_are_the_heads_outputs(family):
    """Heads masked in layer 0 and a LoFiT-style out_scale / out_bias ([L, Hq, Dv]) in layer 1: the
    logits are the unpatched model's with those heads' output slices edited before o_proj."""
    model, _ = tiny_latent_attention(family)
    ids, mask = batch()
    Dv = value_dim(model)
    g = torch.Generator().manual_seed(4)
    scale, bias = 1 + 0.5 * torch.randn(4, Dv, generator=g), 0.3 * torch.randn(4, Dv, generator=g)
    layers = model.model.layers
    hooks = [zero_heads_before(layers[0].self_attn.o_proj, (1, 3), Dv),
             edit_heads_before(layers[1].self_attn.o_proj, lambda h, x: x * scale[h] + bias[h], Dv)]
    with torch.no_grad():
        want = model(ids[:1]).logits
    for h in hooks:
        h.remove()
    spec = headops.HeadSpec.dense(model).mask_heads({0: [1, 3]})
    spec.out_scale = torch.ones(2, 4, Dv)
    spec.out_bias = torch.zeros(2, 4, Dv)
    spec.out_scale[1], spec.out_bias[1] = scale, bias
    headops.patch(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, want, atol=1e-5, rtol=1e-5)


def test_windows_and_sinks_are_the_references_inside_the_model():
    """Streaming heads in both layers of DeepSeek V3: the patched model's logits equal the unpatched
    model's with its attention computed by the reference over the same keys and values (q and k of
    24 dims, v of 12)."""
    model, _ = tiny_latent_attention("deepseek_v3")
    ids, _ = batch()
    spec = headops.HeadSpec.dense(model)
    spec.window[:] = torch.tensor([[2, -1, 3, 1], [-1, 4, 2, 1]])
    spec.sinks[:] = torch.tensor([[1, 0, 0, 2], [0, 1, 3, 0]])
    want = logits_with_reference_attention(model, ids, spec.window, spec.sinks)
    headops.patch(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_head_importance_is_the_finite_differences():
    """|dL/dgate| of every head against central differences of the loss in float64 (MiniCPM3: no
    experts, whose grouped matmul takes no float64)."""
    model, _ = tiny_latent_attention("minicpm3")
    ids, mask = batch()
    headops.patch(model, headops.HeadSpec.dense(model))
    assert_importance_is_the_finite_differences(model, dict(input_ids=ids, attention_mask=mask, labels=ids),
                                                [(layer, h) for layer in range(2) for h in range(4)])


def test_probes_through_the_model():
    model, _ = tiny_latent_attention("deepseek_v2")
    ids, _ = batch()
    headops.patch(model, headops.HeadSpec.dense(model))
    with headops.probe(model, sink_mass=True, entropy=True) as rec:
        with torch.no_grad():
            model(ids)
    assert len(rec) == 2 and rec[1][0].sink_mass.shape == (2, 4, 13)
    assert torch.isfinite(rec[1][0].entropy).all()


def test_head_sparse_cache_is_refused():
    """The layers cache one latent per token for every head: no per-head keys to keep or evict."""
    model, _ = tiny_latent_attention("deepseek_v3")
    spec = headops.HeadSpec.streaming_llm(model, window=4, sinks=1)
    headops.patch(model, spec)
    with pytest.raises(NotImplementedError, match="multi-head latent attention .* one latent per token"):
        headops.HeadSparseCache(model, spec)
    ids, _ = batch()
    by_hand = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=12)  # (no model to check)
    with pytest.raises(NotImplementedError, match="multi-head latent attention .* one latent per token"):
        model.generate(ids[:1], max_new_tokens=2, cache=by_hand, pad_token_id=0)
    with torch.no_grad():  # (the streaming spec through transformers' cache, as without one)
        want = model.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0), want)


def test_echo_and_induction_scores_are_the_eager_patterns():
    """Finding heads on a latent-attention model: RazorAttention's echo and induction scores (probes
    through the patched model) equal the masses read from transformers' eager patterns (MiniCPM3,
    float64)."""
    from headops import discover
    from headops.testing import CharTokenizer

    model, _ = tiny_latent_attention("minicpm3")
    model = model.double()
    period = 5
    ids = discover.repeated_tokens(model, CharTokenizer(), period=period, rows=2, seed=3)
    echo, induction = discover.echo_induction_scores(model, ids, period)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        patterns = model(ids, output_attentions=True).attentions  # [B, H, S, S] per layer
    rows = torch.arange(1 + period, ids.shape[1])
    for layer, A in enumerate(patterns):
        torch.testing.assert_close(echo.values[layer], A[:, :, rows, rows - period].mean(dim=(0, 2)), atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(induction.values[layer], A[:, :, rows, rows - period + 1].mean(dim=(0, 2)),
                                   atol=1e-6, rtol=0)
