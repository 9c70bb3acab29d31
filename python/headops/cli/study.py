"""What the study commands share: the model to study, the text it reads and the metric, and the
gradient importance of its heads.

The text is real English available offline (headops.corpus: the standard library's docstrings;
the source is printed) or, for the tiny random models, random token ids. Results are
deterministic for a seed.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import research
from ..corpus import stdlib_source, stdlib_text

MODELS = ("smollm2", "minilm", "tiny", "tiny-bert")
# the dtypes a command may load its model in (--dtype): one home for the choice and its help
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_dtype_argument(p) -> None:
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="the model's dtype (bfloat16: about 2x faster where the CPU has AVX512-BF16 or AMX; "
                        "its results are not those of a float32 run)")


MODEL_HELP = ("smollm2 (SmolLM2-135M), minilm (all-MiniLM-L6-v2), tiny / tiny-bert (random, tests), or a folder "
              "holding a transformers model and its tokenizer (save_pretrained's: config.json, weights, tokenizer "
              "files; a causal LM, or an encoder)")


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
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
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
        # (a tokenizer without [CLS]/[SEP] frames passages with its BOS/EOS, or not at all)
        cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        source = stdlib_source()
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def encode(rows):
        n = rows.shape[0]
        ids = torch.cat([rows.new_full((n, 1), cls if cls is not None else rows[0, 0]), rows,
                         rows.new_full((n, 1), sep if sep is not None else rows[0, -1])], dim=1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return dict(batch, token_type_ids=torch.zeros_like(ids)) if takes_types else batch

    half = (tokens - 2) // 2
    train, held_out = body[:passages], body[passages:]
    pair = (encode(train[:, :half]), encode(train[:, half:]))
    evaluation = encode(held_out)
    with torch.no_grad():
        reference = research.sentence_embedding(model, evaluation)
    return Study(model, source, [pair], research.contrastive_embedding_loss, evaluation,
                 research.embedding_similarity(reference), "cos_sim", "cosine similarity to the unpruned model",
                 lambda x: x, False)


def model_label(name: str) -> str:
    """A model named on the command line as output file names and plot titles show it: a
    folder's own name."""
    return name if name in MODELS else os.path.basename(os.path.normpath(name))


def is_encoder(model) -> bool:
    """Whether a loaded model is an encoder (a sentence encoder's study) rather than a causal LM."""
    return not (hasattr(model, "can_generate") and model.can_generate())


def load_model(name: str, dtype=None):
    """(model, tokenizer) of a model named on the command line (tokenizer None for the tiny ones),
    in `dtype` when given (default: float32): a bundled one, or a transformers model folder."""
    if name not in MODELS:
        return _load_folder(name, dtype)
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


def _load_folder(folder: str, dtype=None):
    """(model, tokenizer) from a folder of save_pretrained's files: AutoModelForCausalLM for a
    causal LM (its config's architectures say so), AutoModel for an encoder; the tokenizer the
    folder holds. A SystemExit naming what is missing."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise SystemExit(f"--model {folder!r}: neither a bundled model ({', '.join(MODELS)}) nor a folder holding a "
                         "transformers model (config.json, weights and tokenizer files, as save_pretrained writes "
                         "them)")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        raise SystemExit(f"--model {folder!r}: an encoder-decoder model ({config.model_type}); the commands study a "
                         "causal LM or an encoder")
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                 for a in getattr(config, "architectures", None) or ())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {folder!r}: no tokenizer could be loaded from the folder ({e})") from None
    kind = AutoModelForCausalLM if causal else AutoModel
    model = kind.from_pretrained(folder, dtype=dtype or torch.float32).eval()
    return model, tokenizer


def load_study(args) -> Study:
    model, tok = load_model(args.model)
    encoder = is_encoder(model)
    if args.tokens is None:
        args.tokens = 128 if encoder else 256
    if encoder:
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
