"""``python -m headops prune``: head-importance pruning curve of a causal LM, with a random control.

    python -m headops prune --model smollm2 --tokens 256 --steps 10 --out results/prune

1. Head importance (Michel et al.): |dL/dgate| at gate = 1 from one backward pass over the
   first --tokens tokens of the text, normalised per layer.
2. Heads are masked in increasing order of importance, and in a random order (seeded), in
   --steps steps from 0 to 100 %; every step's mask is one row of a per-batch gate, so each
   curve evaluates as one batch (perplexity on the next --tokens tokens, disjoint from the
   importance text).
3. Each mask's forward time alone: gated heads are never computed, so it falls with the
   fraction pruned; the time with every head off gives attention's share of the model's time.
Writes <out>.csv and <out>.png (matplotlib) and prints a table. The text is real English
available offline: the docstrings of Python standard library modules (the source is printed).
Results are deterministic for a seed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

from . import research
from .models import STDLIB_MODULES, stdlib_text

def load(model_name: str):
    if model_name == "smollm2":
        from .models import load_smollm2

        return load_smollm2()
    if model_name == "tiny":  # a small random Llama (tests)
        from .models import tiny_llama

        return tiny_llama()
    raise SystemExit(f"unknown model {model_name!r} (smollm2, tiny)")


def prune(args) -> int:
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tok = load(args.model)
    if tok is None:
        ids = torch.randint(0, model.config.vocab_size, (1, 2 * args.tokens), generator=torch.Generator().manual_seed(0))
        source = "random token ids (tiny model)"
    else:
        ids = tok(stdlib_text(), return_tensors="pt").input_ids[:, :2 * args.tokens]
        source = f"docstrings of the Python {sys.version.split()[0]} standard library modules {', '.join(STDLIB_MODULES)}"
    if ids.shape[1] < 2 * args.tokens:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens")
    train, evaluation = ids[:, :args.tokens], ids[:, args.tokens:]
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s; text: {source}")

    start = time.perf_counter()
    scores = research.importance(model, [train])
    print(f"importance of {scores.numel()} heads: one forward+backward, {time.perf_counter() - start:.2f} s")
    L, H = scores.shape
    by_importance = [(int(i) // H, int(i) % H) for i in scores.flatten().argsort()]
    perm = torch.randperm(L * H, generator=torch.Generator().manual_seed(args.seed))
    random_order = [(int(i) // H, int(i) % H) for i in perm]
    fractions = [i / args.steps for i in range(args.steps + 1)]
    curves = {}
    for name, order in (("importance", by_importance), ("random", random_order)):
        curves[name] = research.pruning_curve(model, evaluation, order, fractions, repeats=args.repeats,
                                              progress=not args.quiet, label=name)
    rows = []
    for i, f in enumerate(fractions):
        rows.append({"fraction_pruned": f,
                     "ppl_importance": math.exp(curves["importance"]["metric"][i]),
                     "ppl_random": math.exp(curves["random"]["metric"][i]),
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
    print(f"\n{'pruned':>6} {'ppl (importance)':>16} {'ppl (random)':>12} {'forward ms':>10}")
    for r in rows:
        print(f"{r['fraction_pruned']:6.0%} {r['ppl_importance']:16.2f} {r['ppl_random']:12.2f} "
              f"{r['forward_ms_importance']:10.1f}")
    print(f"\nper mask: batched {batched:.1f} ms, one mask at a time {single:.1f} ms ({single / batched:.1f}x)")
    print(f"attention's share of the forward time: {(t0 - t_all) / t0:.0%} (all heads off: {t_all:.1f} ms vs "
          f"{t0:.1f} ms)")
    if not args.no_plot:
        plot(rows, args.out + ".png", args.model, source)
        print(f"wrote {args.out}.csv and {args.out}.png")
    else:
        print(f"wrote {args.out}.csv")
    return 0


def plot(rows, path, model_name, source):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r["fraction_pruned"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["ppl_importance"] for r in rows], "o-", label="by importance (least first)")
    a.plot(x, [r["ppl_random"] for r in rows], "s--", label="random order")
    a.set_yscale("log")
    a.set_xlabel("heads pruned (%)")
    a.set_ylabel("perplexity")
    a.legend()
    a.set_title(f"{model_name}: perplexity")
    b.plot(x, [r["forward_ms_importance"] for r in rows], "o-", label="by importance")
    b.plot(x, [r["forward_ms_random"] for r in rows], "s--", label="random order")
    b.set_xlabel("heads pruned (%)")
    b.set_ylabel("forward time (ms)")
    b.set_ylim(bottom=0)
    b.legend()
    b.set_title("forward time (gated heads are not computed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m headops", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prune", help="importance-ordered and random pruning curves of a causal LM")
    q.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M from its wheel) or tiny")
    q.add_argument("--tokens", type=int, default=256, help="tokens for importance, and as many for evaluation")
    q.add_argument("--steps", type=int, default=10)
    q.add_argument("--repeats", type=int, default=3, help="timed calls per forward-time measurement")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=os.path.join("results", "prune"))
    q.add_argument("--no-plot", action="store_true")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return prune(args)
