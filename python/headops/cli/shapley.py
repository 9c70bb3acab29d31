"""shapley: Shapley values of every head by permutation sampling (headops.shapley; each
permutation's coalitions evaluated batched), beside the gradient importance; writes <out>.csv
and a heat-map <out>.png.
"""

from __future__ import annotations

import time

import torch

from .. import research
from .output import say_written, write_csv
from .study import add_study_arguments, model_label, study_with_importance

HELP = "Shapley values of the heads (permutation sampling)"


def add_arguments(p) -> None:
    add_study_arguments(p, "shapley")
    p.add_argument("--permutations", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="coalitions per batched forward")


def run(args) -> int:
    study, scores = study_with_importance(args)
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
    write_csv(args.out + ".csv", ["layer", "head", "shapley", "importance"],
              [[layer, h, f"{phi[layer, h].item():.6g}", f"{scores[layer, h].item():.6g}"]
               for layer in range(L) for h in range(H)])
    if not args.no_plot:
        from .plots import plot_heads  # matplotlib only when a plot is written

        plot_heads(phi, scores, args.out + ".png", model_label(args.model), args.permutations)
    say_written(args.out, plotted=not args.no_plot)
    return 0
