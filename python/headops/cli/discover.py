"""discover: per-head scores of a model by one of the published ways of finding heads (headops.discover).

  retrieval     Wu et al. 2024: needle-in-a-haystack prompts over --lengths x --depths with
                --needles needles (--task), greedy answers, top-1 probes: how often each head
                copies the needle
  retrieval-reasoning
                HeadKV (Fu et al. 2024), the scores its budgets follow: the same prompts, each
                step's query row of the pattern: the mass each head's top keys put on the needle
  echo          RazorAttention: attention mass on the earlier occurrence of the same token
  induction     RazorAttention: mass on the token after that occurrence
                (both: --rows rows of a start token + --period random tokens, repeated 4 times)
  sink          mass on the first token over --rows x --tokens of real text
  duo           DuoAttention's optimisation of one alpha per KV head (--steps, --lr, --reg) on
                --prompts multi-passkey prompts of --length tokens, streaming = --sinks + --window;
                also writes <out>_full_attention_heads.tsv (HeadSpec.from_duo_attention loads it)
  duo-ablation  the same distillation loss with one KV head streaming at a time (batched forwards)

Writes <out>.csv (layer, head, kv_head, score) and <out>.png (a layer x head heat map), prints
the time and the top KV heads (max over each KV head's query heads). Deterministic for a seed.
"""

from __future__ import annotations

import csv
import os
import time

import torch

from .. import discover, tasks
from .._args import of_layer
from ..head_scores import pool_kv_heads, top_heads
from ..spec import HeadSpec
from .output import say_written, write_csv
from .study import DTYPES, MODEL_HELP, add_dtype_argument, is_encoder, load_model, model_label

HELP = "find retrieval, streaming (DuoAttention), echo, induction and sink heads: per-head scores"

LABELS = {"retrieval": "retrieval score (Wu et al.)", "retrieval-reasoning": "retrieval-reasoning score (HeadKV)",
          "echo": "echo score (mass at distance R)",
          "induction": "induction score (mass at distance R - 1)", "sink": "mass on the first token",
          "duo": "DuoAttention alpha (per KV head)", "duo-ablation": "distillation loss with the KV head streaming"}


def add_arguments(p) -> None:
    p.add_argument("--method", required=True, choices=discover.METHODS)
    p.add_argument("--model", default="smollm2", help=MODEL_HELP + " (tiny: with a character tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="writes <out>.csv and <out>.png (default results/discover_<method>_<model>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--top-fraction", type=float, default=0.25, help="the share of KV heads printed as the top ones")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; on a busy machine 1 can be much faster)")
    add_dtype_argument(p)
    g = p.add_argument_group("retrieval, retrieval-reasoning")
    g.add_argument("--task", default="niah_single", choices=tasks.TASKS, help="the needle prompts' task")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="prompt lengths in tokens")
    g.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    g.add_argument("--needles", type=int, default=2, help="different needles (seeds) per (length, depth)")
    g.add_argument("--min-recall", type=float, default=0.5,
                   help="retrieval: a test counts when its answer recalls this much of the needle")
    g.add_argument("--min-f1", type=float, default=0.5,
                   help="retrieval-reasoning: a test counts when its answer's F1 is above this (HeadKV: 0.5)")
    g.add_argument("--batch-size", type=int, default=4, help="prompts answered together")
    g = p.add_argument_group("echo, induction, sink")
    g.add_argument("--period", type=int, default=64, help="echo/induction: the repeated random sequence's length R")
    g.add_argument("--rows", type=int, default=4, help="rows of repeated tokens or of text")
    g.add_argument("--tokens", type=int, default=512, help="sink: tokens of text per row")
    g = p.add_argument_group("duo, duo-ablation")
    g.add_argument("--length", type=int, default=512, help="training prompt length in tokens")
    g.add_argument("--prompts", type=int, default=4, help="multi-passkey training prompts")
    g.add_argument("--passkeys", type=int, default=4, help="pass keys per prompt")
    g.add_argument("--words", type=int, default=8, help="random words per pass key")
    g.add_argument("--sinks", type=int, default=16, help="the streaming view's first tokens")
    g.add_argument("--window", type=int, default=64, help="the streaming view's recent tokens")
    g.add_argument("--steps", type=int, default=100, help="duo: optimisation steps (one prompt each)")
    g.add_argument("--lr", type=float, default=0.02)
    g.add_argument("--reg", type=float, default=0.05, help="duo: the weight of mean(alpha) in the loss")


CSV_HEADER = ["layer", "head", "kv_head", "score"]


def write_scores(path: str, values: torch.Tensor, num_kv_heads) -> None:
    """<out>.csv: one row per (layer, query head) with its KV head and score (num_kv_heads: an int,
    or a tuple of one per layer)."""
    L, Hq = values.shape
    groups = [Hq // of_layer(num_kv_heads, layer) for layer in range(L)]
    write_csv(path, CSV_HEADER, [[layer, h, h // groups[layer], f"{values[layer, h].item():.6g}"]
                                 for layer in range(L) for h in range(Hq)])


def read_scores(path: str) -> torch.Tensor:
    """[L, Hq] float64 scores from a CSV that write_scores wrote."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or list(rows[0]) != CSV_HEADER:
        raise ValueError(f"{path}: not a discover CSV (header {', '.join(CSV_HEADER)})")
    L, Hq = 1 + max(int(r["layer"]) for r in rows), 1 + max(int(r["head"]) for r in rows)
    values = torch.full((L, Hq), float("nan"), dtype=torch.float64)
    for r in rows:
        values[int(r["layer"]), int(r["head"])] = float(r["score"])
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{path}: a (layer, head) is missing")
    return values


def read_kv_heads(path: str):
    """The KV heads per layer of a CSV that write_scores wrote (its kv_head column): an int, or a
    tuple of one per layer where the layers differ (as write_scores takes num_kv_heads)."""
    per_layer = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            layer = int(row["layer"])
            per_layer[layer] = max(per_layer.get(layer, 0), int(row["kv_head"]) + 1)
    counts = tuple(per_layer[layer] for layer in sorted(per_layer))
    return counts[0] if len(set(counts)) == 1 else counts


def _scores(args, model, tok):
    """The Scores of args.method (for echo and induction, of that one of the pair)."""
    show = not args.quiet
    if args.method in ("retrieval", "retrieval-reasoning"):
        if is_encoder(model):
            raise SystemExit(f"--method {args.method} needs a model that generates; {args.model} is an encoder")
        samples = discover.retrieval_samples(tok, lengths=args.lengths, depths=args.depths, needles=args.needles,
                                             seed=args.seed, task=args.task)
        if args.method == "retrieval":
            return discover.retrieval_scores(model, samples, min_recall=args.min_recall, batch_size=args.batch_size,
                                             show_progress=show)
        return discover.retrieval_reasoning_scores(model, samples, min_f1=args.min_f1, batch_size=args.batch_size,
                                                   show_progress=show)
    if args.method in ("echo", "induction"):
        ids = discover.repeated_tokens(model, tok, period=args.period, rows=args.rows, seed=args.seed)
        echo, induction = discover.echo_induction_scores(model, ids, args.period)
        return echo if args.method == "echo" else induction
    if args.method == "sink":
        return discover.sink_scores(model, discover.text_rows(tok, rows=args.rows, tokens=args.tokens))
    prompts = [tasks.multi_passkey(tok, args.length, passkeys=args.passkeys, words=args.words, seed=args.seed + i)
               for i in range(args.prompts)]
    if args.method == "duo":
        return discover.duo_attention(model, prompts, sinks=args.sinks, window=args.window, steps=args.steps,
                                      lr=args.lr, reg=args.reg, show_progress=show)
    return discover.duo_ablation(model, prompts, sinks=args.sinks, window=args.window, show_progress=show)


def run(args) -> int:
    if not 0.0 < args.top_fraction <= 1.0:
        raise SystemExit(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    out = args.out or os.path.join("results", f"discover_{args.method}_{model_label(args.model)}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tok = load_model(args.model, DTYPES[args.dtype])
    if tok is None:
        from ..testing import CharTokenizer

        tok = CharTokenizer()
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    scores = _scores(args, model, tok)
    seconds = time.perf_counter() - started
    details = {k: v for k, v in scores.info.items() if isinstance(v, (int, float, str))}
    print(f"{args.method}: {seconds:.1f} s; " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in details.items()))
    values = scores.values
    Hkv = HeadSpec.dense(model).num_kv_heads
    kv = pool_kv_heads(values, Hkv, "max")  # (a list of each layer's where the layers differ in KV heads)
    total = sum(row.numel() for row in kv)
    top = top_heads(kv, max(1, round(args.top_fraction * total)))
    print(f"top {len(top)} of {total} KV heads (layer.head: score): " +
          " ".join(f"{layer}.{h}:{kv[layer][h].item():.3g}" for layer, h in top))
    write_scores(out + ".csv", values, Hkv)
    if args.method == "duo":
        discover.write_full_attention_heads(out + "_full_attention_heads.tsv", scores.info["kv_alpha"])
        print(f"wrote {out}_full_attention_heads.tsv")
    if not args.no_plot:
        from .plots import plot_head_scores  # matplotlib only when a plot is written

        plot_head_scores(values, out + ".png", model_label(args.model), LABELS[args.method])
    say_written(out, plotted=not args.no_plot)
    return 0
