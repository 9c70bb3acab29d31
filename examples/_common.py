"""Shared by the examples: the model to run (real, or a tiny random one for the tests)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

from headops.corpus import stdlib_text  # noqa: E402,F401  (real English text, offline)


def causal_lm(tiny: bool):
    """(model, tokenizer-or-None): SmolLM2-135M-Instruct, or a tiny random Llama (--tiny)."""
    if tiny:
        from headops.testing import tiny_llama

        return tiny_llama()
    from headops.models import load_smollm2

    return load_smollm2()


def encoder(tiny: bool):
    """(model, tokenizer-or-None): all-MiniLM-L6-v2, or a tiny random BERT (--tiny)."""
    if tiny:
        from headops.testing import tiny_bert

        return tiny_bert()
    from headops.models import load_minilm

    return load_minilm()


def token_ids(tok, n: int, vocab: int = 97) -> torch.Tensor:
    """[1, n] ids of the standard-library text (random ids for a tiny model)."""
    if tok is None:
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    return tok(stdlib_text(), return_tensors="pt").input_ids[:, :n]
