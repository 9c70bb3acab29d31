"""prune: importance-ordered and random pruning curves.

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
"""

from __future__ import annotations

import torch

from .. import research
from .output import say_written, write_csv
from .study import add_study_arguments, head_order, model_label, study_with_importance

HELP = "importance-ordered and random pruning curves"


def add_arguments(p) -> None:
    add_study_arguments(p, "prune")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per forward-time measurement")


def run(args) -> int:
    study, scores = study_with_importance(args)
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
    write_csv(args.out + ".csv", list(rows[0]), [list(r.values()) for r in rows])
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
        from .plots import plot_curves  # matplotlib only when a plot is written

        plot_curves(rows, args.out + ".png", model_label(args.model), study)
    say_written(args.out, plotted=not args.no_plot)
    return 0
