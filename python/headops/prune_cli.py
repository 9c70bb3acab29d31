"""``python -m headops prune | shapley``: head-level studies of a real model, from the command line.

    python -m headops prune --model smollm2 --tokens 256 --steps 10 --out results/prune_smollm2
    python -m headops prune --model minilm --tokens 128 --passages 16 --out results/prune_minilm
    python -m headops shapley --model smollm2 --tokens 64 --permutations 4 --out results/shapley_smollm2

prune:
1. Head importance (Michel et al.): |dL/dgate| at gate = 1 from one backward pass, normalised
   per layer. L is the next-token loss for a causal LM (smollm2) and, for a sentence encoder
   (minilm), an in-batch contrastive loss: the first half of each passage must pick its own
   second half (how sentence-transformers trains MiniLM).
2. Heads are masked in increasing order of importance, and in a random order (seeded), in
   --steps steps from 0 to 100 %; every step's mask is one row block of a per-batch gate, so
   each curve evaluates as one batch. The metric is perplexity on text disjoint from the
   importance text (causal LM) or the cosine similarity of each passage's embedding to the
   unpruned model's (encoder).
3. Each mask's forward time alone: gated heads are never computed, so it falls with the
   fraction pruned; the time with every head off gives attention's share of the model's time.
Writes <out>.csv and <out>.png (matplotlib) and prints a table.

shapley: Shapley values of every head by permutation sampling (headops.shapley; each
permutation's coalitions evaluated batched), beside the gradient importance; writes <out>.csv
and a heat-map <out>.png.

The text is real English available offline: the docstrings of Python standard library modules
(the source is printed). Results are deterministic for a seed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import research
from .corpus import stdlib_source, stdlib_text


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


def load_study(args) -> Study:
    name = args.model
    if name == "smollm2":
        from .models import load_smollm2

        return causal_lm_study(*load_smollm2(), args.tokens)
    if name == "tiny":  # a small random Llama (tests)
        from .testing import tiny_llama

        return causal_lm_study(*tiny_llama(), args.tokens)
    if name == "minilm":
        from .models import load_minilm

        return encoder_study(*load_minilm(), args.tokens, args.passages)
    if name == "tiny-bert":  # a small random BERT (tests)
        from .testing import tiny_bert

        return encoder_study(*tiny_bert(), args.tokens, args.passages)
    raise SystemExit(f"unknown model {name!r} (smollm2, minilm, tiny, tiny-bert)")


def head_order(scores: torch.Tensor):
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in scores.flatten().argsort()]


def importance_of(study: Study):
    start = time.perf_counter()
    scores = research.importance(study.model, study.importance_batches, loss_fn=study.loss_fn)
    print(f"importance of {scores.numel()} heads: one forward+backward, {time.perf_counter() - start:.2f} s")
    return scores


def prune(args) -> int:
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    study = load_study(args)
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s; text: {study.source}")
    scores = importance_of(study)
    L, H = scores.shape
    perm = torch.randperm(L * H, generator=torch.Generator().manual_seed(args.seed))
    orders = {"importance": head_order(scores), "random": [(int(i) // H, int(i) % H) for i in perm]}
    fractions = [i / args.steps for i in range(args.steps + 1)]
    curves = {name: research.pruning_curve(study.model, study.evaluation, order, fractions, metric_fn=study.metric_fn,
                                           repeats=args.repeats, progress=not args.quiet, label=name)
              for name, order in orders.items()}
    m = study.metric_name
    rows = []
    for i, f in enumerate(fractions):
        rows.append({"fraction_pruned": f,
                     f"{m}_importance": study.to_reported(curves["importance"]["metric"][i]),
                     f"{m}_random": study.to_reported(curves["random"]["metric"][i]),
                     "forward_ms_importance": 1e3 * curves["importance"]["forward_seconds"][i],
                     "forward_ms_random": 1e3 * curves["random"]["forward_seconds"][i]})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    t0, t_all = rows[0]["forward_ms_importance"], rows[-1]["forward_ms_importance"]
    batched = 1e3 * curves["importance"]["batched_seconds_per_mask"]
    single = 1e3 * curves["importance"]["single_seconds_per_mask"]
    print(f"\n{'pruned':>6} {m + ' (importance)':>18} {m + ' (random)':>14} {'forward ms':>10}")
    for r in rows:
        print(f"{r['fraction_pruned']:6.0%} {r[m + '_importance']:18.4g} {r[m + '_random']:14.4g} "
              f"{r['forward_ms_importance']:10.1f}")
    print(f"\nper mask: batched {batched:.1f} ms, one mask at a time {single:.1f} ms ({single / batched:.2f}x)")
    print(f"attention's share of the forward time: {(t0 - t_all) / t0:.0%} (all heads off: {t_all:.1f} ms vs "
          f"{t0:.1f} ms)")
    if not args.no_plot:
        plot_curves(rows, args.out + ".png", args.model, study)
        print(f"wrote {args.out}.csv and {args.out}.png")
    else:
        print(f"wrote {args.out}.csv")
    return 0


def shapley(args) -> int:
    torch.manual_seed(args.seed)
    study = load_study(args)
    print(f"model {args.model}; text: {study.source}")
    scores = importance_of(study)
    if study.metric_name == "ppl":  # value = minus the next-token loss
        value_fn = lambda model, batch: -study.metric_fn(model, batch)  # noqa: E731
    else:
        value_fn = study.metric_fn
    start = time.perf_counter()
    phi = research.shapley(study.model, study.evaluation, permutations=args.permutations, seed=args.seed,
                           value_fn=value_fn, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    L, H = phi.shape
    coalitions = args.permutations * (L * H + 1)
    print(f"{args.permutations} permutations, {coalitions} coalitions in {seconds:.1f} s "
          f"({1e3 * seconds / coalitions:.1f} ms each, batched {args.batch_size} at a time)")
    rank = lambda x: x.flatten().argsort().argsort().double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(phi), rank(scores)]))[0, 1].item()
    print(f"Spearman rank correlation of Shapley values and gradient importance: {spearman:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "shapley", "importance"])
        for layer in range(L):
            for h in range(H):
                w.writerow([layer, h, f"{phi[layer, h].item():.6g}", f"{scores[layer, h].item():.6g}"])
    if not args.no_plot:
        plot_heads(phi, scores, args.out + ".png", args.model, args.permutations)
        print(f"wrote {args.out}.csv and {args.out}.png")
    else:
        print(f"wrote {args.out}.csv")
    return 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows, path, model_name, study: Study):
    plt = _pyplot()
    m = study.metric_name
    x = [100 * r["fraction_pruned"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r[m + "_importance"] for r in rows], "o-", label="by importance (least first)")
    a.plot(x, [r[m + "_random"] for r in rows], "s--", label="random order")
    if study.log_scale:
        a.set_yscale("log")
    a.set_xlabel("heads pruned (%)")
    a.set_ylabel(study.metric_label)
    a.legend()
    a.set_title(f"{model_name}: {study.metric_label}", fontsize=10)
    b.plot(x, [r["forward_ms_importance"] for r in rows], "o-", label="by importance")
    b.plot(x, [r["forward_ms_random"] for r in rows], "s--", label="random order")
    b.set_xlabel("heads pruned (%)")
    b.set_ylabel("forward time (ms)")
    b.set_ylim(bottom=0)
    b.legend()
    b.set_title("forward time (gated heads are not computed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(phi, scores, path, model_name, permutations):
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 5))
    for ax, values, title in ((a, phi, f"Shapley value ({permutations} permutations)"),
                              (b, scores, "gradient importance |dL/dgate| (per layer)")):
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{model_name}: {title}", fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m headops", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2",
                        help="smollm2 (SmolLM2-135M), minilm (all-MiniLM-L6-v2), or tiny / tiny-bert (random, tests)")
    common.add_argument("--tokens", type=int, default=None,
                        help="tokens per text (causal LM: for importance, and as many to evaluate; default 256) "
                             "or per passage (encoder; default 128)")
    common.add_argument("--passages", type=int, default=16, help="encoder: passages for importance and to evaluate")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--no-plot", action="store_true")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    q = sub.add_parser("prune", parents=[common], help="importance-ordered and random pruning curves")
    q.add_argument("--steps", type=int, default=10)
    q.add_argument("--repeats", type=int, default=3, help="timed calls per forward-time measurement")
    q.add_argument("--out", default=os.path.join("results", "prune"))
    s = sub.add_parser("shapley", parents=[common], help="Shapley values of the heads (permutation sampling)")
    s.add_argument("--permutations", type=int, default=4)
    s.add_argument("--batch-size", type=int, default=16, help="coalitions per batched forward")
    s.add_argument("--out", default=os.path.join("results", "shapley"))
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = 128 if args.model in ("minilm", "tiny-bert") else 256
    return prune(args) if args.command == "prune" else shapley(args)
