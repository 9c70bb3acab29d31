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


class CharTokenizer:
    """A character tokenizer for the tiny models (vocabulary 97), so that the text tasks
    (headops.tasks) and the discovery methods run on them as on a real model: id 0 is a newline,
    1 BOS and 2 EOS (LlamaConfig's defaults), 3..96 the characters ' ' (32) to '}' (125); any
    other character reads as a space. It has the few methods of a transformers tokenizer that
    headops uses (encode, decode, the special token ids) and no chat template."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2
    chat_template = None
    all_special_ids = [1, 2]
    vocab_size = 97

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        ids = [0 if c == "\n" else ord(c) - 29 if 32 <= ord(c) <= 125 else 3 for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        special = {self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        return "".join("\n" if i == 0 else ("" if skip_special_tokens else special[i]) if i in special
                       else chr(i + 29) for i in ids)
