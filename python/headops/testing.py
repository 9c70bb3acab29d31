"""Tiny randomly initialised transformers models, for tests and the ``--tiny`` runs of the
examples and the command line.

Each call builds the same weights (seed 0) and leaves the caller's random state alone: the
model is initialised inside ``torch.random.fork_rng``, so making a fixture never changes what
a later ``torch.randn`` in the caller returns."""

from __future__ import annotations

import torch

SEED = 0


def _seeded(build):
    # transformers initialises weights from the global RNG; fork it so the seed stays local.
    # devices=[]: CPU state only (forking CUDA states would initialise CUDA for nothing).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def tiny_llama():
    """(model, None): a small random LlamaForCausalLM — 2 layers, 4 query / 2 KV heads, D = 16, vocabulary 97."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return _seeded(lambda: LlamaForCausalLM(cfg).eval()), None


def tiny_bert():
    """(model, None): a small random BertModel encoder — 2 layers, 4 heads, D = 12, vocabulary 97."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    return _seeded(lambda: BertModel(cfg).eval()), None
