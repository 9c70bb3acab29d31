"""A model's own attention limits kept by a patched model (headops._model_attention): the sliding
windows of Mistral, Qwen2, Gemma 3, Starcoder2 and Phi-3 layers, with transformers' caches and with a
HeadSparseCache (whose sliding layers hold only their windows), GPT-OSS's learnt sinks, more
families, sequences packed into a row, and what is refused (softcapping, dropout, what a sliding
layer cannot take)."""

import pytest
import torch

import headops

from conftest import GENERATE_LOGITS, assert_generated_alike, zero_heads_before

transformers = pytest.importorskip("transformers")

WINDOW = 4
SLIDING = {
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=WINDOW, head_dim=16)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, pad_token_id=0)),  # (one fused qkv_proj)
}


def make(family, **extra):
    name, options = SLIDING.get(family, (family, {}))
    cfg = getattr(transformers, name)(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **dict(options, **extra))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


GENERATE = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_a_dense_spec_keeps_the_models_sliding_windows(family):
    """Sequences 3x the window: logits as the unpatched model's, and greedy generation as the
    unpatched model's through transformers' cache (its sliding layers drop the keys past their
    window) and through HeadSparseCache(model, spec) (the sliding layers' KV heads streaming)."""
    model = make(family)
    ids, mask = batch()
    with torch.no_grad():
        want_logits = model(ids[:1]).logits
    want = model.generate(ids, attention_mask=mask, **GENERATE)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, want_logits, atol=2e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GENERATE), want)
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    assert torch.equal(model.generate(ids, attention_mask=mask, cache=cache, **GENERATE), want)
    sliding = headops._model_attention.sliding_windows(model, 2)
    for layer, window in enumerate(sliding):
        if window is not None:
            assert cache.kinds[layer] == ["streaming", "streaming"] and cache.windows(layer) == [WINDOW] * 4
    assert cache.ideal_nbytes() < cache.dense_nbytes()  # (nbytes: full layers grow by 64-token segments)


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_a_full_prefill_runs_within_the_models_sliding_windows(family):
    """prefill="full" (RazorAttention's, kvpress's measure: every head reads the whole prompt) runs
    a sliding-window layer within the model's window, as the model does: a dense spec's prompt and
    the next tokens' logits through such a cache equal the model's (before 2026-12-07 the sliding
    layers read the whole prompt there: Mistral's logits 0.44 off, silently); so does a streaming
    spec's prompt there (RazorAttention's prefill)."""
    model = make(family)
    ids, mask = batch()
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    with torch.no_grad():
        want = model(ids[:1]).logits
        cache = headops.HeadSparseCache(model, spec, prefill="full", max_step=4)
        prompt = model(ids[:1, :9], cache=cache, use_cache=True).logits
        question = model(ids[:1, 9:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([prompt, question], dim=1), want, atol=2e-5, rtol=1e-5)
    streaming = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [1]}, window=3, sinks=1)
    headops.set_spec(model, streaming)
    with torch.no_grad():
        prompt = model(ids[:1, :9], cache=headops.HeadSparseCache(model, streaming, prefill="full"),
                       use_cache=True).logits
    torch.testing.assert_close(prompt, want[:, :9], atol=2e-5, rtol=1e-5)


def test_budget_methods_budget_the_layers_without_a_sliding_window():
    """SnapKV, AdaKV, PyramidKV and HeadKV specs of a model whose layers alternate sliding and full
    (Gemma 3): budget heads in the full layers only (the sliding ones keep their window, as
    transformers' cache and kvpress leave them; before 2026-12-07 these specs were refused at
    patch, so the evaluation's budget methods failed on such models); the pyramid and HeadKV's
    pool run over the full layers; each generates through its cache, and the evaluation harness
    answers with them."""
    from headops import budgets, evaluate, tasks
    from headops.testing import CharTokenizer

    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    full = [["full", "full"], ["budget", "budget"]] * 2
    snapkv = headops.HeadSpec.budget(model, budget=12)
    assert snapkv.cache_kind == full and snapkv.cache_budget[0] == [None, None]
    pyramid = headops.HeadSpec.pyramid(model, budget=20, beta=4)
    assert pyramid.cache_kind == full
    assert [pyramid.cache_budget[1][0], pyramid.cache_budget[3][0]] == budgets.pyramid_budgets(2, 20, 4, kept=8)
    scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    headkv = headops.HeadSpec.headkv(model, scores, budget=16, beta=2.0)
    want = budgets.headkv_budgets(torch.stack([scores[layer].view(2, 2).mean(1) for layer in (1, 3)]).reshape(1, 4),
                                  16, 2.0)[0].tolist()
    assert headkv.cache_kind == full and headkv.cache_budget[1] + headkv.cache_budget[3] == want
    ids, mask = batch()
    for spec in (snapkv, pyramid, headkv, headops.HeadSpec.budget(model, budget=12, allocation="adakv")):
        headops.patch(model, spec)
        cache = headops.HeadSparseCache(model, spec)
        with torch.no_grad():
            assert model.generate(ids, attention_mask=mask, cache=cache, **GENERATE).shape == (2, 22)
        assert cache.ideal_nbytes() < cache.dense_nbytes()
        headops.unpatch(model)
    tok = CharTokenizer()
    samples = [tasks.make_sample(tok, "passkey", 400, depth=0.5, seed=0)]
    rows = evaluate.evaluate(model, tok, samples, ["snapkv:budget=40", "pyramidkv:budget=40"], batch_size=1,
                             max_new_tokens=4, show_progress=False)
    assert [r["method"] for r in rows] == ["snapkv:budget=40", "pyramidkv:budget=40"]
    assert all(int(r["bytes"]) < int(r["dense_bytes"]) for r in rows)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_a_streaming_spec_in_sliding_layers(family):
    """Sinks on sliding-window layers (visible past the model's window, a StreamingLLM-style
    intervention) and a key_bias on the first keys: HeadSparseCache generation equals generating
    without a cache; transformers' cache, which drops the sinks, is refused with the reason, and
    a key_bias alone works through it."""
    model = make(family)
    ids, mask = batch()
    spec = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [1]}, window=3, sinks=2)
    spec.key_bias = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    headops.patch(model, spec)
    want = model.generate(ids, attention_mask=mask, use_cache=False, **GENERATE)
    got = model.generate(ids, attention_mask=mask, cache=headops.HeadSparseCache(model, spec, max_step=1), **GENERATE)
    assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="spec's sinks are first tokens it dropped"):
        model.generate(ids, attention_mask=mask, **GENERATE)
    biased = headops.HeadSpec.dense(model)
    biased.key_bias = spec.key_bias
    headops.set_spec(model, biased)
    want = model.generate(ids, attention_mask=mask, use_cache=False, **GENERATE)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GENERATE), want)
    # stepping by hand without a mask: the mask function still tells where the cache's keys start
    with torch.no_grad():
        out = model(ids[:1, :9], use_cache=True)
        for t in range(9, 13):
            out = model(ids[:1, t:t + 1], cache=out.past_key_values, use_cache=True)
            whole = model(ids[:1, :t + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], whole, atol=2e-5, rtol=1e-5)


def test_what_a_sliding_layer_cannot_take_is_refused():
    model = make("mistral")
    spec = headops.HeadSpec.dense(model)
    spec.alpha = torch.zeros(2, 4)
    spec.alpha[1, 2] = 0.5
    with pytest.raises(ValueError, match="alpha must be 0 in layer 1, a sliding-window layer .* for a HeadSparseCache"):
        headops.HeadSparseCache(model, spec)
    with pytest.raises(ValueError, match=r"heads must be layers without the model's sliding window \(layer 0 slides"):
        headops.HeadSpec.budget(model, {0: [1]}, budget=8)
    with pytest.raises(ValueError, match="every layer of this one slides"):
        headops.HeadSpec.budget(model, budget=8)
    by_hand = headops.HeadSpec.dense(model)  # (a budget head set by hand: refused where it is used)
    by_hand.cache_kind[0][1], by_hand.cache_budget[0][1] = "budget", 8
    with pytest.raises(ValueError, match="cache_kind must be not 'budget' in layer 0"):
        headops.patch(model, by_hand)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="cache_kind must be not 'budget' in layer 0"):
        headops.HeadSparseCache(model, by_hand)
    headops.patch(model, headops.HeadSpec.dense(model))
    ids, mask = batch()
    by_hand = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_step=1)
    with pytest.raises(ValueError, match="HeadSparseCache's windows for this layer are .-1, -1, -1, -1.: make it "
                                         "from the model"):
        model(ids, attention_mask=mask, cache=by_hand, use_cache=True)
    with pytest.raises(NotImplementedError, match="probe without a cache"):
        with headops.probe(model, entropy=True):
            model.generate(ids, attention_mask=mask, **GENERATE)


def test_alpha_in_a_sliding_layer_mixes_a_full_branch_within_the_models_window():
    """DuoAttention's alpha in a layer the model limits to a sliding window: the full branch sees the
    model's window (not every key, which the kernels' full branch would): alpha = 1 is the
    unpatched model, alpha = 0 the streaming spec alone, through transformers' cache too."""
    model = make("mistral")
    ids, mask = batch()
    with torch.no_grad():
        want = model(ids[:1]).logits
    want_tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    spec = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [0, 1]}, window=2, sinks=0)
    spec.alpha = torch.ones(2, 4)
    headops.patch(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, want, atol=2e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GENERATE), want_tokens)
    spec.alpha = torch.zeros(2, 4)
    headops.set_spec(model, spec)
    with torch.no_grad():
        mixed = model(ids[:1]).logits
    streaming = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [0, 1]}, window=2, sinks=0)
    headops.set_spec(model, streaming)
    with torch.no_grad():
        torch.testing.assert_close(mixed, model(ids[:1]).logits, atol=2e-6, rtol=1e-6)
    spec.alpha = torch.full((2, 4), 0.5)  # between: transformers' cache (the window's keys) as recomputation
    headops.set_spec(model, spec)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GENERATE),
                       model.generate(ids, attention_mask=mask, use_cache=False, **GENERATE))


@pytest.mark.parametrize("batched", [False, True], ids=["per_head", "per_batch"])
def test_alpha_within_a_window_that_does_not_bind_is_the_kernels_alpha(batched):
    """The two-call mix (patching._alpha_within_window) against the kernels' own alpha where the
    model's window covers every key: outputs and the gradients of q, k, alpha, gate, out_scale and
    out_bias, float64, with alpha 0, 1 and between, a gate of 0, GQA."""
    from headops.patching import _alpha_within_window

    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, S, D = 2, 4, 2, 9, 8
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    alpha = torch.tensor([[0.0, 1.0, 0.3, 0.7], [0.5, 0.0, 1.0, 0.2]], dtype=torch.float64)
    gate = torch.tensor([[1.0, 0.0, 0.5, 2.0], [0.7, 1.0, 0.0, 1.0]], dtype=torch.float64)
    if not batched:
        alpha, gate = alpha[0], gate[0]
    args = dict(window=torch.tensor([2, -1, 3, 1]), sinks=torch.tensor([1, 0, 2, 0]),
                alpha=alpha.clone().requires_grad_(True), gate=gate.clone().requires_grad_(True),
                out_scale=torch.randn(Hq, D, generator=g, dtype=torch.float64, requires_grad=True),
                out_bias=torch.randn(Hq, D, generator=g, dtype=torch.float64, requires_grad=True),
                key_bias=torch.randn(Hq, S, generator=g, dtype=torch.float64), sink_logit=torch.zeros(Hq))
    w = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    results = []
    for run in (lambda a: _alpha_within_window(q, k, v, a, True, S),
                lambda a: headops.attention(q, k, v, layout="bhsd", causal=True, **a)):
        out = run(args)
        grads = torch.autograd.grad((out * w).sum(), [q, k] + [args[n] for n in ("alpha", "gate", "out_scale",
                                                                                  "out_bias")])
        results.append((out.detach(), grads))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for name, a, b in zip(("q", "k", "alpha", "gate", "out_scale", "out_bias"), got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


def test_logit_softcapping_is_refused():
    model = make("Gemma2Config", attn_logit_softcapping=50.0, sliding_window=WINDOW, head_dim=16)
    with pytest.raises(NotImplementedError, match="soft-caps its attention logits"):
        headops.patch(model, headops.HeadSpec.dense(model))
    assert model.config._attn_implementation == "eager" and not hasattr(model, "_headops_previous")


@pytest.mark.parametrize("config", ["Olmo2Config", "CohereConfig", "GraniteConfig"])
def test_more_families_reproduce_the_unpatched_model(config):
    """Families beyond tests/test_patch.py's that dispatch through AttentionInterface (Granite
    scales its logits by attention_multiplier: headops takes the module's scaling)."""
    model = make(config, **({"attention_multiplier": 0.5} if config == "GraniteConfig" else {}))
    ids, mask = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    headops.patch(model, headops.HeadSpec.dense(model))
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=2e-5, rtol=1e-5)


def family_model(config, **options):
    """A tiny random model of a config class (vocabulary 97, 2 layers of 4 heads, hidden size 64
    unless `options` name the family's own fields)."""
    cfg = getattr(transformers, config)(**dict(dict(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                                                    bos_token_id=1, eos_token_id=2), **options))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


# families that dispatch through AttentionInterface, beyond those tested elsewhere (options: their own field names;
# GQA where the family has it)
GQA = dict(num_key_value_heads=2)
FAMILIES = {
    "GPTJConfig": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "OPTConfig": dict(ffn_dim=128),
    "GPTBigCodeConfig": dict(n_embd=64, n_layer=2, n_head=4), "CodeGenConfig": dict(n_embd=64, n_layer=2, n_head=4,
                                                                                     rotary_dim=8),
    "BioGptConfig": {}, "PhiConfig": GQA, "StableLmConfig": GQA, "MixtralConfig": dict(GQA, num_local_experts=4),
    "OlmoeConfig": dict(GQA, num_experts=4, num_experts_per_tok=2),
    "Qwen2MoeConfig": dict(GQA, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "Qwen3MoeConfig": dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "GlmConfig": GQA,
    "Glm4Config": GQA,
    "HeliumConfig": dict(GQA, head_dim=16), "SmolLM3Config": GQA, "Olmo3Config": GQA, "Exaone4Config": GQA,
    "ArceeConfig": GQA, "Ernie4_5Config": GQA, "SeedOssConfig": GQA, "ApertusConfig": GQA,
    "HunYuanDenseV1Config": dict(GQA, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e4, alpha=1.0)),
}


def assert_dense_spec_is_the_model_through_both_caches(model):
    """A dense spec patched into `model` is the model: a left-padded batch's logits, and its greedy
    tokens through transformers' cache and through a HeadSparseCache. Leaves the model patched."""
    ids, mask = batch()
    with torch.no_grad():
        want_logits = model(ids, attention_mask=mask).logits
    want = model.generate(ids, attention_mask=mask, **GENERATE)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want_logits[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want_logits[1, 3:], atol=2e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GENERATE), want)
    assert torch.equal(model.generate(ids, attention_mask=mask, cache=headops.HeadSparseCache(model, spec),
                                      **GENERATE), want)


def assert_streaming_through_the_cache_is_the_recomputation(model):
    """A streaming spec (a KV head of each layer streaming) generating a left-padded batch through a
    HeadSparseCache: each step's logits as the patched model recomputing the whole sequence (the
    positions generate gives a left-padded row, for the families with learnt absolute positions)."""
    ids, mask = batch()
    spec = headops.HeadSpec.streaming(model, {0: [headops.HeadSpec.dense(model).kv_heads(0) - 1], 1: [0]}, window=3,
                                      sinks=1)
    headops.set_spec(model, spec)
    out = model.generate(ids, attention_mask=mask, cache=headops.HeadSparseCache(model, spec), **GENERATE,
                         **GENERATE_LOGITS)
    full = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        whole = model(out.sequences, attention_mask=full, position_ids=(full.cumsum(1) - 1).clamp_min(0),
                      use_cache=False).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), whole, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_more_families_generate_as_the_model_through_a_head_sparse_cache(config):
    """A dense spec on more families (MoE, parallel attention and MLP, partial rotary, multi-query,
    learnt positions...): a left-padded batch's logits and greedy tokens through transformers'
    cache and through a HeadSparseCache as the unpatched model's; a streaming spec through a
    HeadSparseCache as the recomputation (checked 2026-12-07; none needed a change)."""
    model = family_model(config, **FAMILIES[config])
    assert_dense_spec_is_the_model_through_both_caches(model)
    assert_streaming_through_the_cache_is_the_recomputation(model)


@pytest.mark.parametrize("config", ["GPTNeoXConfig", "PersimmonConfig"])
def test_families_with_one_qkv_projection(config):
    """GPT-NeoX (Pythia) and Persimmon project q, k and v through one query_key_value layer (patch
    found no attention module in them before 2026-12-07), and GPT-NeoX's attention calls the
    cache's update without its kwargs: the patched attention finds a HeadSparseCache by the key
    tensors update returned (before, generation through one attended to each step's new key
    alone, silently). A left-padded batch's logits and greedy tokens (transformers' cache, a dense
    HeadSparseCache) as the unpatched model's; a streaming spec through a HeadSparseCache as the
    patched model recomputing each step's whole sequence."""
    model = family_model(config)
    assert_dense_spec_is_the_model_through_both_caches(model)
    assert_streaming_through_the_cache_is_the_recomputation(model)


def test_a_cache_whose_attention_never_reached_it_is_an_error():
    """A HeadSparseCache stores what headops' attention sees: given to a model that is not patched
    (or whose attention gets other key tensors than the cache's update returned), no layer's
    attention reaches it and it holds nothing; the next update of such a layer is a RuntimeError
    naming it, not a generation over whatever each step's keys alone give."""
    model = family_model("GPTNeoXConfig")
    ids, mask = batch()
    cache = headops.HeadSparseCache(model, headops.HeadSpec.dense(model))
    with pytest.raises(RuntimeError, match=r"layer 0's attention did not reach this cache.*is the model patched"):
        model.generate(ids, attention_mask=mask, cache=cache, **GENERATE)
    cache.reset()
    headops.patch(model, headops.HeadSpec.dense(model))
    assert torch.equal(model.generate(ids, attention_mask=mask, cache=cache, **GENERATE),
                       model.generate(ids, attention_mask=mask, **GENERATE))


PACKED = [4, 6, 3]  # lengths of the sequences packed into a row


def packed_row(lengths=PACKED, seed=3):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 97, (n,), generator=g) for n in lengths]
    return seqs, torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


def packed_spec(kind, model):
    spec = headops.HeadSpec.dense(model)
    if kind == "streaming":
        spec = headops.HeadSpec.streaming(model, {0: [0], 1: [1]}, window=2, sinks=1)
    if kind == "key_bias":
        spec.key_bias = torch.randn(spec.num_layers, spec.num_heads, 2, generator=torch.Generator().manual_seed(4))
    return spec


@pytest.mark.parametrize("kind", ["dense", "streaming", "key_bias"])
def test_packed_sequences_are_attended_one_by_one(kind):
    """position_ids restarting within a row, no mask, no cache (DataCollatorWithFlattening's
    training batches): transformers keeps the sequences apart, and so does headops, each with its
    positions from its own first token (a streaming head's sinks, a spec's key_bias): logits as
    each sequence's alone; rows packed alike (one call per sequence over the batch) and unlike (per
    row); before 2026-12-06 refused."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    headops.patch(model, packed_spec(kind, model))
    seqs, ids, positions = packed_row()
    with torch.no_grad():
        alone = torch.cat([model(s[None], use_cache=False).logits for s in seqs], dim=1)
        got = model(ids, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got, alone, atol=2e-6, rtol=1e-5)
        other_seqs, other_ids, other_positions = packed_row([7, 6], seed=5)  # a second row, packed otherwise
        both = model(torch.cat([ids, other_ids]), position_ids=torch.cat([positions, other_positions]),
                     use_cache=False).logits
        other_alone = torch.cat([model(s[None], use_cache=False).logits for s in other_seqs], dim=1)
        torch.testing.assert_close(both, torch.cat([alone, other_alone]), atol=2e-6, rtol=1e-5)
        alike = model(ids.expand(2, -1), position_ids=positions.expand(2, -1), use_cache=False).logits
        torch.testing.assert_close(alike, alone.expand(2, -1, -1), atol=2e-6, rtol=1e-5)


def test_a_flattened_training_batch_trains_as_the_unpatched_model():
    """transformers' DataCollatorWithFlattening packs a batch into one row: a dense spec's loss and
    gradients (model weights and a gate that learns) are the unpatched model's, and per-batch
    gates (one head coalition a row) follow their rows."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    seqs, _, _ = packed_row()
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s.tolist()} for s in seqs])
    want = model(**batch, use_cache=False).loss
    want.backward()
    want_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    spec = headops.HeadSpec.dense(model)
    spec.gate = torch.ones(spec.num_layers, spec.num_heads, requires_grad=True)
    headops.patch(model, spec)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, want_grad, atol=1e-6, rtol=1e-5)
    gate_grad = spec.gate.grad.clone()
    spec.gate.grad = None
    # the gate's gradient is the sum of each sequence's (their tokens' share of the mean loss)
    labels_per = [len(s) - 1 for s in seqs]
    total = sum(labels_per)
    summed = torch.zeros_like(gate_grad)
    for s, n in zip(seqs, labels_per):
        (model(s[None], labels=s[None], use_cache=False).loss * n / total).backward()
        summed += spec.gate.grad
        spec.gate.grad = None
    torch.testing.assert_close(gate_grad, summed, atol=1e-6, rtol=1e-5)
    # per-batch gates, two rows packed unlike: each row's coalition on its own sequences
    gates = torch.ones(2, spec.num_layers, spec.num_heads)
    gates[1, :, 0] = 0
    coalitions = headops.HeadSpec.dense(model)
    coalitions.gate = gates
    headops.set_spec(model, coalitions)
    other_seqs, other_ids, other_positions = packed_row([7, 6], seed=5)
    _, ids, positions = packed_row()
    with torch.no_grad():
        both = model(torch.cat([ids, other_ids]), position_ids=torch.cat([positions, other_positions]),
                     use_cache=False).logits
        for row, parts in enumerate([seqs, other_seqs]):
            one = headops.HeadSpec.dense(model)
            one.gate = gates[row]
            headops.set_spec(model, one)
            alone = torch.cat([model(s[None], use_cache=False).logits for s in parts], dim=1)
            torch.testing.assert_close(both[row], alone[0], atol=2e-6, rtol=1e-5)


def test_flash_attention_packing_arguments_are_taken():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) also hands over FlashAttention's
    cu_seq_lens_q/_k (the caller's word for the sequences, position_ids or not): the loss and
    gradients of the unpatched model; what is not one row of self-attention is refused, naming
    the argument."""
    from headops.patching import _headops_attention
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    seqs, _, _ = packed_row()
    rows = [{"input_ids": s.tolist()} for s in seqs]
    flash = transformers.DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(rows)
    assert flash["cu_seq_lens_q"].tolist() == [0, 4, 10, 13]
    want = model(**flash, use_cache=False).loss
    headops.patch(model, packed_spec("streaming", model))
    alone = torch.cat([model(s[None], use_cache=False).logits for s in seqs], dim=1)
    without_positions = {n: t for n, t in flash.items() if n != "position_ids"}
    with torch.no_grad():
        got = model(**without_positions, use_cache=False).logits  # (transformers alone would attend across)
    torch.testing.assert_close(got, alone, atol=2e-6, rtol=1e-5)
    headops.set_spec(model, headops.HeadSpec.dense(model))
    torch.testing.assert_close(model(**flash, use_cache=False).loss, want, atol=1e-6, rtol=1e-6)
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = _headops_attention(module, q, k, k, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone())
    for start, end in ((0, 2), (2, 6)):
        torch.testing.assert_close(out[:, start:end], _headops_attention(module, q[:, :, start:end], k[:, :, start:end],
                                                                          k[:, :, start:end], None, scaling=0.25)[0])
    for bad, match in ((dict(cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6])), "differ"),
                       (dict(cu_seq_lens_q=torch.tensor([0, 2, 5])), r"not the boundaries .* one row of 6 tokens"),
                       (dict(cu_seq_lens_q=torch.tensor([0, 4, 2, 6])), "not the boundaries")):
        with pytest.raises(NotImplementedError, match=match):
            _headops_attention(module, q, k, k, None, scaling=0.25, **bad)
    with pytest.raises(NotImplementedError, match=r"batch 2"):
        _headops_attention(module, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), None,
                           scaling=0.25, cu_seq_lens_q=cu)


def test_restarting_positions_that_transformers_does_not_pack_attend_across():
    """transformers packs only without a mask and without its cache: with a mask of ones, or with
    use_cache=True, restarting position_ids attend across the row there, and through headops too.
    Probes over the packed row (which transformers packs) report each sequence's own statistics (before
    2026-12-07 refused): the recording of each sequence run alone, at the row's positions."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    _, ids, positions = packed_row()
    with torch.no_grad():
        want_masked = model(ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False).logits
        want_cached = model(ids, position_ids=positions, use_cache=True).logits
    headops.patch(model, headops.HeadSpec.dense(model))
    with torch.no_grad():
        got = model(ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got, want_masked, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(model(ids, position_ids=positions, use_cache=True).logits, want_cached, atol=2e-6,
                                   rtol=1e-5)
        with headops.probe(model, topk=1, entropy=True) as packed:
            model(ids, position_ids=positions, use_cache=False)
        for s0, s1 in ((0, 4), (4, 10), (10, 13)):
            with headops.probe(model, topk=1, entropy=True) as alone:
                model(ids[:, s0:s1], use_cache=False)
            for layer in range(2):
                got, want = packed[layer][0], alone[layer][0]
                torch.testing.assert_close(got.entropy[:, :, s0:s1], want.entropy, atol=1e-5, rtol=1e-5)
                assert torch.equal(got.topk_index[:, :, s0:s1], want.topk_index + s0)


def test_attention_dropout_in_training_is_refused():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    headops.patch(model, headops.HeadSpec.dense(model))
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        model(ids)  # eval: the model passes dropout 0
    model.train()
    with pytest.raises(NotImplementedError, match="attention dropout 0.1"):
        model(ids)


def gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=WINDOW)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # learnt sink logits (initialised to 0)
            layer.self_attn.sinks.normal_()
    return model


def test_gpt_oss_sink_logits_are_headops_sink_logit():
    """GPT-OSS passes its learnt per-head sinks (s_aux): headops takes them as sink_logit (with a
    spec's own, the two denominator terms as one logit, logaddexp). Logits, greedy tokens through
    transformers' cache and a HeadSparseCache, and the sinks' gradients are the unpatched model's."""
    model = gpt_oss()
    ids, mask = batch()
    want = model(ids[:1]).logits
    want.square().mean().backward()
    want_grad = [layer.self_attn.sinks.grad.clone() for layer in model.model.layers]
    model.zero_grad()
    want_tokens = model.generate(ids, attention_mask=mask, **GENERATE)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    got = model(ids[:1]).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    got.square().mean().backward()
    for layer, grad in zip(model.model.layers, want_grad):
        torch.testing.assert_close(layer.self_attn.sinks.grad, grad, atol=1e-6, rtol=1e-4)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GENERATE), want_tokens)
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    assert torch.equal(model.generate(ids, attention_mask=mask, cache=cache, **GENERATE), want_tokens)
    # a spec's sink_logit beside the model's: as the unpatched model with logaddexp of the two
    extra = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    spec.sink_logit = extra
    headops.set_spec(model, spec)
    with torch.no_grad():
        got = model(ids[:1]).logits
        headops.unpatch(model)
        for layer, row in zip(model.model.layers, extra):
            layer.self_attn.sinks.copy_(torch.logaddexp(layer.self_attn.sinks, row))
        torch.testing.assert_close(got, model(ids[:1]).logits, atol=2e-5, rtol=1e-5)


def test_a_dense_prefill_of_a_sliding_model_holds_every_key():
    """capture_prefill keeps every layer's keys (the model's own cache would keep only the sliding
    layers' windows), and the cache built from it continues as the unpatched model generates."""
    model = make("mistral")
    ids, _ = batch()
    ids = ids[:1]
    want = model.generate(ids, **GENERATE)
    prefill = headops.capture_prefill(model, ids[:, :10])
    assert [tuple(k.shape) for k in prefill.keys] == [(1, 2, 10, 16)] * 2
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    cache = headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=4)
    assert torch.equal(model.generate(ids, cache=cache, **GENERATE), want)


def test_a_model_composed_mask_is_refused():
    """A model that composes its own mask function (bidirectional image tokens in Gemma 3's
    multimodal model, a prefix) gets an error from headops' mask function, not causal attention."""
    from transformers.masking_utils import create_causal_mask

    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    headops.patch(model, headops.HeadSpec.dense(model))
    embeds = torch.zeros(1, 6, 64)
    assert create_causal_mask(model.config, embeds, torch.ones(1, 6, dtype=torch.long), None) is None
    with pytest.raises(NotImplementedError, match="custom attention mask"):
        create_causal_mask(model.config, embeds, torch.ones(1, 6, dtype=torch.long), None,
                           or_mask_function=lambda b, h, q, kv: kv < 2)


def test_a_mask_made_by_the_caller_must_be_what_headops_computes():
    """A 4-D mask given to the model passes through transformers as it is: causal attention with
    key padding (additive float or bool) is computed as the unpatched model does; a prefix-LM mask
    is refused rather than run as causal attention."""
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids, mask = batch()
    S = ids.shape[1]
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    full = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(2, 1, S, S).masked_fill(~full, torch.finfo(torch.float32).min)
    headops.patch(model, headops.HeadSpec.dense(model))
    with torch.no_grad():
        for given in (additive, full):
            got = model(ids, attention_mask=given).logits
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=2e-5, rtol=1e-5)
        prefix = full.clone()
        prefix[:, :, 3:6, 3:6] = True  # tokens 3-5 see each other both ways
        with pytest.raises(NotImplementedError, match="not causal .or bidirectional. attention with key padding"):
            model(ids, attention_mask=prefix)


@pytest.mark.parametrize("name", ["position_bias", "sinks", "block_indices", "indices", "softcap"])
def test_attention_arguments_headops_does_not_compute_are_refused(name):
    """What a family may pass to its attention function that headops cannot honour (T5's relative
    position bias, other sink forms, block indices, the keys a sparse attention's indexer picks,
    softcapping)."""
    from headops.patching import _headops_attention
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    headops.patch(model, headops.HeadSpec.dense(model))
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    _headops_attention(module, q, k, k, None, scaling=0.25, **{name: None})  # (None: not passed)
    with pytest.raises(NotImplementedError, match=name):
        _headops_attention(module, q, k, k, None, scaling=0.25, **{name: torch.zeros(1)})


def test_is_causal_passed_by_the_model_wins_over_the_module():
    from headops.patching import _headops_attention
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    headops.patch(model, headops.HeadSpec.dense(model))
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    got = _headops_attention(module, q, k, k, None, scaling=0.25, is_causal=False)[0]
    want = headops.attention(q, k, k, layout="bhsd", causal=False, softmax_scale=0.25).transpose(1, 2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family,kind", [("LlamaConfig", "dense"), ("LlamaConfig", "streaming"),
                                         ("LlamaConfig", "key_bias"), ("mistral", "dense"), ("qwen2", "key_bias"),
                                         ("gemma3", "dense")])
def test_a_static_cache_generates_as_a_dynamic_one(family, kind):
    """transformers' StaticCache (cache_implementation="static", the cache of compiled generation)
    hands the attention all its slots, those past the last query not written yet: headops' queries
    are the last keys, so it attended the prompt's future (and empty slots) and generated other
    tokens. The mask function now ends the keys at the last query. Left-padded batch; families
    with sliding layers (their static layers unfilled, then rolling) too."""
    model = make(family)
    ids, mask = batch()
    want_static = model.generate(ids, attention_mask=mask, cache_implementation="static", **GENERATE)
    spec = headops.HeadSpec.dense(model)
    if kind == "streaming":
        spec = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [1]}, window=3, sinks=2)
    if kind == "key_bias":
        spec.key_bias = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    headops.patch(model, spec)
    want = want_static if kind == "dense" else model.generate(ids, attention_mask=mask, use_cache=False, **GENERATE)
    assert torch.equal(model.generate(ids, attention_mask=mask, cache_implementation="static", **GENERATE), want)
    # by hand: a prefill in two chunks (queries past the cache's start), then single steps
    cache = transformers.StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        model(ids[:1, :5], cache=cache, use_cache=True)
        out = model(ids[:1, 5:9], cache=cache, use_cache=True)
        torch.testing.assert_close(out.logits, model(ids[:1, :9], use_cache=False).logits[:, 5:], atol=2e-5, rtol=1e-5)
        for t in range(9, 13):
            out = model(ids[:1, t:t + 1], cache=cache, use_cache=True)
            whole = model(ids[:1, :t + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], whole, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family,kind", [("LlamaConfig", "streaming"), ("mistral", "dense")])
def test_a_static_cache_under_torch_compile_in_one_graph(family, kind):
    """A static cache's offset is a tensor the traced graph does not read: the mask function then
    marks where the keys end (a tensor), and the op's key_lengths reads it when it runs, so a
    compiled forward through a StaticCache holds in one graph (fullgraph=True; before
    2026-12-06 refused): a chunked prefill and decode steps, a left-padded batch, as the
    uncompiled patched model recomputing the whole sequence."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = make(family)
    spec = headops.HeadSpec.dense(model)
    if kind == "streaming":
        spec = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [1]}, window=3, sinks=2)
    headops.patch(model, spec)
    ids, mask = batch()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda i, m, c: model(i, attention_mask=m, cache=c, use_cache=True).logits,
                         fullgraph=True, backend=counter)
    cache = transformers.StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        step(ids[:, :6], mask[:, :6], cache)
        got = step(ids[:, 6:9], mask[:, :9], cache)
        want = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=False).logits[:, 6:]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for t in range(9, 13):
            got = step(ids[:, t:t + 1], mask[:, :t + 1], cache)
            want = model(ids[:, :t + 1], attention_mask=mask[:, :t + 1], use_cache=False).logits[:, -1:]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert counter.frame_count >= 1


def test_the_static_cache_mask_says_where_the_keys_end():
    """Eagerly the mask of a static layer ends at the last query (one read of its offset); while
    torch.compile traces it covers every slot, the unwritten ones masked, and carries the end."""
    from headops import patching

    sizes = dict(batch_size=2, q_length=1, kv_length=8, kv_offset=0, attention_mask=None)
    assert patching._headops_mask(q_offset=torch.tensor(3), **sizes).shape == (2, 1, 1, 4)
    assert patching._headops_mask(q_offset=7, **sizes) is None  # (the last slot: nothing past the query)
    traced = patching._static_cache_mask(2, 1, 8, torch.tensor(3), torch.tensor([[1] * 8, [0, 0] + [1] * 6]), "cpu")
    assert traced.shape == (2, 1, 1, 8) and int(traced._headops_key_end) == 4
    assert traced[:, 0, 0].tolist() == [[True] * 4 + [False] * 4, [False, False, True, True] + [False] * 4]


def test_attention_weights_asked_for_are_refused_with_the_way_out():
    """output_attentions=True wants the S x S weights, which headops never forms: transformers would
    hand back an empty tuple; refused, naming the probes."""
    model = make("LlamaConfig")
    ids, mask = batch()
    headops.patch(model, headops.HeadSpec.dense(model))
    with pytest.raises(NotImplementedError, match=r"output_attentions=True .* headops\.probe\(model"):
        model(ids, attention_mask=mask, output_attentions=True)
    with headops.probe(model, topk=1) as rec:
        model(ids, attention_mask=mask)
    assert rec[0][0].topk_index.shape == (2, 4, 13, 1)


def test_duo_attention_optimises_alpha_on_a_sliding_window_model():
    """headops.discover's DuoAttention optimisation on a model whose layers slide (window 64, prompts of
    360 tokens): alpha learns through the windowed full branch; at alpha = 1 the patched model is the
    model (distillation 0), and the loss falls."""
    from headops import discover, tasks
    from headops.testing import CharTokenizer

    tok = CharTokenizer()
    model = make("mistral", sliding_window=64)  # (vocabulary 97, as the tokenizer's)
    prompts = [tasks.multi_passkey(tok, 360, passkeys=2, words=2, seed=seed) for seed in range(2)]
    result = discover.duo_attention(model, prompts, sinks=2, window=8, steps=3, lr=0.05)
    assert result.info["distillation"][0] < 1e-10
    assert result.info["loss"][-1] < result.info["loss"][0]


@pytest.mark.parametrize("kind", ["dense", "alpha"])
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_packed_sequences_in_sliding_window_layers(family, kind):
    """Packed rows (sequences longer than the window) in a model with sliding-window layers: the
    window counts within each sequence, and alpha's windowed full branch (two calls mixed) keeps
    the sequences apart in both: logits as each sequence's alone."""
    model = make(family)
    spec = headops.HeadSpec.dense(model)
    if kind == "alpha":
        spec = headops.HeadSpec.streaming(model, {0: [0, 1], 1: [1]}, window=2, sinks=1)
        spec.alpha = torch.tensor([[0.3, 0.0, 1.0, 0.6], [0.5, 0.5, 0.2, 0.0]])
    headops.patch(model, spec)
    seqs, ids, positions = packed_row([9, 7, 11])
    with torch.no_grad():
        alone = torch.cat([model(s[None], use_cache=False).logits for s in seqs], dim=1)
        got = model(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, alone, atol=2e-6, rtol=1e-5)


def test_the_evaluation_harness_runs_every_method_family_on_gpt_neox():
    """GPT-NeoX's attention gets no kwargs from the cache's update: the harness's caches (built
    from a dense prefill, or filled by the model) are found by their keys; the dense answers
    are transformers' generate."""
    from conftest import evaluate_every_family
    from headops.testing import tiny_gpt_neox

    evaluate_every_family(tiny_gpt_neox()[0])
