"""What the study commands share: the model to study, the text it reads and the metric, and the
gradient importance of its heads.

The text is real English available offline (headops.corpus: the standard library's docstrings;
the source is printed) or, for the tiny random models, random token ids. Results are
deterministic for a seed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import research
from ..corpus import stdlib_source, stdlib_text

MODELS = ("smollm2", "minilm", "tiny", "tiny-bert")
ENCODERS = ("minilm", "tiny-bert")


@dataclass
class Study:
    """A model and what the commands measure on it."""
    model: Any
    source: str
    importance_batches: list  # what loss_fn takes
    loss_fn: Callable
    evaluation: Any  # ids [N, T] or a tokenizer dict of [N, T]
    metric_fn: Callable  # (model, batch) -> [rows]
    metric_name: str  # CSV column stem
    metric_label: str  # plot axis
    to_reported: Callable[[float], float]  # mean metric -> the number reported
    log_scale: bool


def add_study_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The options of every command that studies a model's heads (--out defaults to results/<command>)."""
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (SmolLM2-135M), minilm (all-MiniLM-L6-v2), or tiny / tiny-bert (random, tests)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per text (causal LM: for importance, and as many to evaluate; default 256) "
                        "or per passage (encoder; default 128)")
    p.add_argument("--passages", type=int, default=16, help="encoder: passages for importance and to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default=os.path.join("results", command), help="writes <out>.csv and <out>.png")


def causal_lm_study(model, tok, tokens: int) -> Study:
    if tok is None:
        ids = torch.randint(0, model.config.vocab_size, (1, 2 * tokens), generator=torch.Generator().manual_seed(0))
        source = "random token ids (tiny model)"
    else:
        ids = tok(stdlib_text(), return_tensors="pt").input_ids[:, :2 * tokens]
        source = stdlib_source()
    if ids.shape[1] < 2 * tokens:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens")
    return Study(model, source, [ids[:, :tokens]], research.causal_lm_loss, ids[:, tokens:],
                 research.per_row_causal_lm_loss, "ppl", "perplexity", math.exp, True)


def encoder_study(model, tok, tokens: int, passages: int) -> Study:
    """2 * passages passages of `tokens` tokens: the first half for importance, the rest to evaluate."""
    if tok is None:
        body = torch.randint(3, model.config.vocab_size, (2 * passages, tokens - 2),
                             generator=torch.Generator().manual_seed(0))
        cls, sep = 1, 2
        source = "random token ids (tiny model)"
    else:
        flat = tok(stdlib_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        need = 2 * passages * (tokens - 2)
        if flat.numel() < need:
            raise SystemExit(f"the text has only {flat.numel()} tokens, {need} needed")
        body = flat[:need].view(2 * passages, tokens - 2)
        cls, sep = tok.cls_token_id, tok.sep_token_id
        source = stdlib_source()

    def encode(rows):
        n = rows.shape[0]
        ids = torch.cat([torch.full((n, 1), cls), rows, torch.full((n, 1), sep)], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    half = (tokens - 2) // 2
    train, held_out = body[:passages], body[passages:]
    pair = (encode(train[:, :half]), encode(train[:, half:]))
    evaluation = encode(held_out)
    with torch.no_grad():
        reference = research.sentence_embedding(model, evaluation)
    return Study(model, source, [pair], research.contrastive_embedding_loss, evaluation,
                 research.embedding_similarity(reference), "cos_sim", "cosine similarity to the unpruned model",
                 lambda x: x, False)


def load_model(name: str, dtype=None):
    """(model, tokenizer) of a model named on the command line (tokenizer None for the tiny ones),
    in `dtype` when given (default: float32)."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r} ({', '.join(MODELS)})")
    if name == "smollm2":
        from ..models import load_smollm2

        return load_smollm2(dtype or torch.float32)
    if name == "minilm":
        from ..models import load_minilm

        model, tok = load_minilm()
    else:
        from ..testing import tiny_bert, tiny_llama

        model, tok = tiny_llama() if name == "tiny" else tiny_bert()
    return (model if dtype is None else model.to(dtype)), tok


def load_study(args) -> Study:
    name = args.model
    model, tok = load_model(name)
    if args.tokens is None:
        args.tokens = 128 if name in ENCODERS else 256
    if name in ENCODERS:
        return encoder_study(model, tok, args.tokens, args.passages)
    return causal_lm_study(model, tok, args.tokens)


def head_order(scores: torch.Tensor):
    """(layer, head) pairs, least important first."""
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in scores.flatten().argsort()]


def study_with_importance(args):
    """(study, scores [L, H]): every command's start — seed, load the model, then the gradient
    importance of its heads (|dL/dgate|, normalised per layer), timings printed."""
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    study = load_study(args)
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s; text: {study.source}")
    started = time.perf_counter()
    scores = research.importance(study.model, study.importance_batches, loss_fn=study.loss_fn)
    print(f"importance of {scores.numel()} heads: one forward+backward, {time.perf_counter() - started:.2f} s")
    return study, scores
