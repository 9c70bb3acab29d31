"""headops.patch / unpatch / HeadSpec on tiny randomly initialised transformers models."""

import copy
import os

import pytest
import torch

import headops

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

V = 97
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attn_implementation="eager")
DUO = os.path.join(os.path.dirname(__file__), "data", "duo-attention")  # copied, see its SOURCE.md


def make(family):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **SMALL)).eval()
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                          eos_token_id=0, attn_implementation="eager")).eval()
    if family == "bert":
        cfg = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
        return BertModel(BertConfig(**cfg)).eval()
    raise ValueError(family)


def output(model, ids, **kw):
    with torch.no_grad():
        out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"]
CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_spec_reproduces_the_unpatched_model_and_unpatch_restores_it(family):
    model = make(family)
    ids = torch.randint(0, V, (2, 11))
    want = output(model, ids)
    headops.patch(model, headops.HeadSpec.dense(model))
    assert model.config._attn_implementation == "headops"
    torch.testing.assert_close(output(model, ids), want, atol=2e-5, rtol=1e-5)
    headops.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(output(model, ids), want)  # exactly the model it was
    assert not any(hasattr(m, "_headops_spec") or hasattr(m, "_headops_layer") for m in model.modules())
    assert not hasattr(model, "_headops_previous")


def _zero_head_input(model, family, layer, head, D=16):
    """The unpatched equivalent of gating a head: its slice of the output projection is 0."""
    if family == "gpt2":
        proj = model.transformer.h[layer].attn.c_proj.weight  # Conv1D: [in, out]
        proj.data[head * D:(head + 1) * D, :] = 0
    elif family == "bert":
        model.encoder.layer[layer].attention.output.dense.weight.data[:, head * D:(head + 1) * D] = 0
    else:
        model.model.layers[layer].self_attn.o_proj.weight.data[:, head * D:(head + 1) * D] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_heads_equal_zeroing_their_output(family):
    model = make(family)
    ids = torch.randint(0, V, (2, 9))
    reference = copy.deepcopy(model)
    _zero_head_input(reference, family, 0, 1)
    _zero_head_input(reference, family, 1, 3)
    want = output(reference, ids)
    spec = headops.HeadSpec.dense(model).mask_heads({0: [1], 1: [3]})
    headops.patch(model, spec)
    with headops.count_work() as w:
        got = output(model, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert w.heads_skipped == 2 * 2  # two heads x batch 2, never computed


def test_per_batch_gates_evaluate_coalitions_in_one_batch():
    model = make("llama")
    ids = torch.randint(0, V, (1, 10))
    gates = torch.tensor([[[1, 1, 1, 1], [1, 0, 1, 1]], [[0, 1, 0, 1], [1, 1, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]],
                         dtype=torch.float32)  # [B=3, L=2, Hq=4]
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    singles = []
    for g in gates:
        one = spec.copy()
        one.gate = g
        headops.set_spec(model, one)
        singles.append(output(model, ids))
    batched = spec.copy()
    batched.gate = gates
    headops.set_spec(model, batched)  # no re-patching
    got = output(model, ids.expand(3, -1))
    torch.testing.assert_close(got, torch.cat(singles), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", CAUSAL)
def test_left_padding_is_honoured(family):
    model = make(family)
    ids = torch.randint(1, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    want = output(model, ids, attention_mask=mask)
    headops.patch(model, headops.HeadSpec.dense(model))
    got = output(model, ids, attention_mask=mask)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], atol=2e-5, rtol=1e-5)  # the padded rows are never used


def test_bert_padding_is_honoured():
    model = make("bert")
    ids = torch.randint(1, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    want = output(model, ids, attention_mask=mask)
    headops.patch(model, headops.HeadSpec.dense(model))
    torch.testing.assert_close(output(model, ids, attention_mask=mask), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_the_head_sparse_cache(family):
    model = make(family)
    ids = torch.randint(0, V, (1, 10))
    want_dense = model.generate(ids, max_new_tokens=12, do_sample=False)
    headops.patch(model, headops.HeadSpec.dense(model))
    dense_spec = headops.HeadSpec.dense(model)
    got = model.generate(ids, max_new_tokens=12, do_sample=False,
                         cache=headops.HeadSparseCache(model, dense_spec, max_step=1))
    assert torch.equal(got, want_dense)
    spec = headops.HeadSpec.streaming(model, {0: [1], 1: [0]}, window=4, sinks=2)
    headops.set_spec(model, spec)
    want = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)  # full recomputation
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    got = model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    assert cache.ideal_nbytes() < cache.dense_nbytes()


def test_spec_save_load_roundtrip(tmp_path):
    model = make("llama")
    spec = headops.HeadSpec.streaming(model, {1: [0]}, window=8, sinks=2).mask_heads({0: [2]})
    spec.out_scale = torch.rand(2, 4, 16)
    spec.save(tmp_path / "spec.json")
    back = headops.HeadSpec.load(tmp_path / "spec.json")
    assert back.to_dict() == spec.to_dict()


@pytest.mark.parametrize("name, layers, heads, kv_heads, above", [
    ("Llama-2-7B-32K-Instruct", 32, 32, 32, 444),
    ("Mistral-7B-Instruct-v0.2", 32, 32, 8, 244),
])
def test_from_duo_attention_reads_the_published_patterns(name, layers, heads, kv_heads, above):
    path = os.path.join(DUO, name, "full_attention_heads.tsv")
    cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      hidden_size=128 * heads)
    spec = headops.HeadSpec.from_duo_attention(cfg, path, sinks=128, window=256, threshold=0.5)
    kinds = [k for row in spec.cache_kind for k in row]
    assert kinds.count("full") == above and kinds.count("streaming") == layers * kv_heads - above  # SOURCE.md
    group = heads // kv_heads
    for layer in range(layers):
        for h in range(kv_heads):
            w = spec.window[layer, h * group:(h + 1) * group]
            assert (w == (-1 if spec.cache_kind[layer][h] == "full" else 256)).all()
    with pytest.raises(ValueError, match="pattern"):
        headops.HeadSpec.from_duo_attention(LlamaConfig(num_hidden_layers=4, num_attention_heads=4), path, sinks=4,
                                            window=8)


def test_bad_specs_and_calls():
    model = make("llama")
    other = headops.HeadSpec(3, 4, 2, 16)
    with pytest.raises(ValueError, match="made for this model"):
        headops.patch(model, other)
    with pytest.raises(TypeError, match="HeadSpec"):
        headops.patch(model, {"gate": 1})
    with pytest.raises(ValueError, match="layer"):
        headops.HeadSpec.dense(model).mask_heads({5: [0]})
    with pytest.raises(ValueError, match="heads"):
        headops.HeadSpec.dense(model).mask_heads({0: [9]})
    with pytest.raises(ValueError, match="window"):
        headops.HeadSpec.streaming(model, {0: [0]}, window=0)
    with pytest.raises(RuntimeError, match="not patched"):
        headops.unpatch(model)
    spec = headops.HeadSpec.dense(model)
    spec.gate = torch.ones(3, 4)
    with pytest.raises(ValueError, match="gate"):
        spec.validate()


@pytest.mark.parametrize("batch_size", [2, None], ids=["given", "first_call"])
def test_left_padded_batch_generates_like_the_unpatched_model(batch_size):
    # batch_size left out: the cache takes it (and the dtype) from the first forward, as
    # transformers' own caches do; a left-padded batch also generates what each prompt does alone
    model = make("llama")
    ids = torch.randint(1, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as a tokenizer pads for generation
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **kw)
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    cache = headops.HeadSparseCache(model, spec, max_step=1, **sizes)
    assert cache.batch_size == (batch_size or -1)
    got = model.generate(ids, attention_mask=mask, cache=cache, **kw)
    assert torch.equal(got, want)
    assert (cache.batch_size, cache.dtype) == (2, torch.float32)
    for b, pad in enumerate([0, 3]):
        alone = model.generate(ids[b:b + 1, pad:], cache=headops.HeadSparseCache(model, spec, max_step=1),
                               **kw)
        assert torch.equal(got[b, 10:], alone[0, 10 - pad:]), f"prompt {b}"


def test_spec_key_bias_on_the_first_tokens_matches_the_reference():
    # ZeroTuning-style: a per-head bias on the first (sink) tokens' logits
    model = make("llama")
    ids = torch.randint(0, V, (1, 9))
    spec = headops.HeadSpec.dense(model)
    spec.key_bias = torch.randn(2, 4, 2)  # [L, Hq, K=2]
    headops.patch(model, spec)
    got = output(model, ids)
    # the same with the bias written out over every key, through a plain per-call spec check
    full = spec.layer_args(0, 9)["key_bias"]
    assert full.shape == (4, 9) and torch.equal(full[:, :2], spec.key_bias[0]) and (full[:, 2:] == 0).all()
    headops.set_spec(model, headops.HeadSpec.dense(model))
    plain = output(model, ids)
    assert (got - plain).abs().max() > 1e-4  # the bias changes the logits
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    headops.set_spec(model, spec)
    want = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache), want)


def test_budget_spec_generates_like_attention_over_the_kept_set_until_eviction():
    model = make("llama")
    ids = torch.randint(0, V, (1, 10))
    spec = headops.HeadSpec.budget(model, {0: [1], 1: [0, 1]}, budget=64)
    headops.patch(model, spec)
    # nothing is evicted within 64 tokens: the same tokens as the dense model
    want = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache), want)
    small = headops.HeadSpec.budget(model, {0: [1]}, budget=12)
    headops.set_spec(model, small)
    cache = headops.HeadSparseCache(model, small, max_step=1)
    model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    assert cache._layers[0].kept_positions(0, 1).numel() == 12  # 21 tokens seen, 12 kept
    with pytest.raises(ValueError, match="budget"):
        headops.HeadSpec.budget(model, {0: [1]}, budget=0)


def test_patch_gives_each_module_the_spec_on_its_device():
    model = make("llama")
    spec = headops.HeadSpec.dense(model).mask_heads({0: [1]})
    spec.out_scale = torch.ones(2, 4, 16)
    headops.patch(model, spec)
    modules = [m for m in model.modules() if hasattr(m, "_headops_spec")]
    assert len(modules) == 2 and all(m._headops_spec is spec for m in modules)  # there already: the spec itself
    model.to("meta")  # (a device this machine has besides the CPU)
    headops.set_spec(model, spec)
    moved = {id(m._headops_spec): m._headops_spec for m in modules}
    assert len(moved) == 1  # one copy for the device, shared by its modules
    (on_meta,) = moved.values()
    assert on_meta is not spec and all(t.device.type == "meta" for t in on_meta.tensors().values())
    assert all(t.device.type == "cpu" for t in spec.tensors().values())
    headops.unpatch(model)
    headops.patch(model, spec)
    assert all(m._headops_spec.gate.device.type == "meta" for m in modules)


def test_models_that_compute_attention_themselves_are_refused():
    """Bloom computes its (ALiBi) attention in its own code, not through AttentionInterface:
    patch says so, and changes nothing."""
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)).eval()
    before = model.config._attn_implementation
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        headops.patch(model, headops.HeadSpec.dense(model))
    assert model.config._attn_implementation == before and not hasattr(model, "_headops_previous")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # (peft's call)
def test_a_peft_wrapped_model_is_patched_through_its_wrapper():
    """LoRA adapters (PEFT) wrap the model: patch, set_spec, unpatch and the cache take the wrapper
    (its attention modules are the model's); a gate and the adapters learn together, and the
    patched wrapper's logits are the unpatched wrapper's. (patch had read the wrapper's own class
    and refused it as computing attention itself.)"""
    peft = pytest.importorskip("peft")
    from headops.testing import tiny_llama

    model = peft.get_peft_model(tiny_llama()[0], peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                 lora_dropout=0.0, init_lora_weights=False))
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = model(ids).logits
        want_tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    spec = headops.HeadSpec.dense(model)
    spec.gate = torch.ones(spec.num_layers, spec.num_heads, requires_grad=True)
    assert headops.patch(model, spec) is model
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=2e-6, rtol=1e-5)
    cache = headops.HeadSparseCache(model, spec)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, cache=cache),
                       want_tokens)
    model(ids, labels=ids).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert spec.gate.grad is not None and spec.gate.grad.abs().sum() > 0
    assert lora and all(p.grad is not None for p in lora)
    headops.set_spec(model, headops.HeadSpec.dense(model).mask_heads({0: [1]}))
    headops.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)
