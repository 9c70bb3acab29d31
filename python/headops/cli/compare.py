"""compare: how the per-head scores of several methods (or models, or runs) agree.

  python -m headops compare retrieval=a.csv reasoning=b.csv duo=c.csv [--top-fraction 0.25]

Reads the CSVs `python -m headops discover` writes (layer, head, kv_head, score; the KV heads
from their kv_head column) and prints, for every pair: the Jaccard overlap of their top
--top-fraction KV heads (each KV head scored by the max over its query heads: what a cache
keeps) and query heads, and Spearman's rank correlation over every query head. Writes <out>.csv
(one row per pair) and <out>.md (the three tables).
"""

from __future__ import annotations

import itertools
import os

from ..head_scores import overlaps, rank_correlation
from .discover import read_kv_heads, read_scores
from .output import write_csv

HELP = "how per-head score tables agree: Jaccard of their top heads, rank correlation"


def add_arguments(p) -> None:
    p.add_argument("tables", nargs="+", metavar="NAME=CSV",
                   help="score tables from `python -m headops discover` (NAME= optional: the file's name)")
    p.add_argument("--top-fraction", type=float, default=0.25, help="the share of top heads compared")
    p.add_argument("--out", default=os.path.join("results", "compare"), help="writes <out>.csv and <out>.md")


def _tables(items):
    tables = {}
    for item in items:
        name, _, path = item.rpartition("=")
        name = name or os.path.splitext(os.path.basename(path))[0]
        if not os.path.exists(path):
            raise SystemExit(f"compare: no such file {path!r} (python -m headops discover writes one)")
        if name in tables:
            raise SystemExit(f"compare: the name {name!r} is given twice")
        try:
            tables[name] = (read_scores(path), read_kv_heads(path))
        except ValueError as e:
            raise SystemExit(f"compare: {e}") from None
    if len(tables) < 2:
        raise SystemExit("compare: give at least two score tables")
    shapes = {name: tuple(values.shape) for name, (values, _) in tables.items()}
    kv = {name: heads for name, (_, heads) in tables.items()}
    if len(set(shapes.values())) != 1 or len(set(kv.values())) != 1:
        raise SystemExit("compare: the tables are of different models' heads: [layers, query heads] "
                         + ", ".join(f"{n} {shapes[n]} ({kv[n]} KV heads)" for n in tables))
    return {name: values for name, (values, _) in tables.items()}, next(iter(kv.values()))


def run(args) -> int:
    if not 0.0 < args.top_fraction <= 1.0:
        raise SystemExit(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    scores, num_kv_heads = _tables(args.tables)
    jaccards, tops = overlaps(scores, num_kv_heads, args.top_fraction)
    names = list(scores)
    rho = {(a, b): rank_correlation(scores[a], scores[b]) for a, b in itertools.combinations(names, 2)}
    lines = [f"Agreement of {len(names)} score tables ({', '.join(names)}).", ""]
    for title, pairs in ((f"Jaccard of the top {len(tops['KV heads'][names[0]])} KV heads", jaccards["KV heads"]),
                         (f"Jaccard of the top {len(tops['query heads'][names[0]])} query heads",
                          jaccards["query heads"]),
                         ("Spearman's rank correlation over every query head", rho)):
        lines += [f"{title}:", "", "| | " + " | ".join(names[1:]) + " |", "|---" * len(names) + "|"]
        for i, a in enumerate(names[:-1]):
            cells = ["" if j <= i else f"{pairs[(a, b)]:.2f}" for j, b in enumerate(names) if j > 0]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    write_csv(args.out + ".csv", ["a", "b", "jaccard_kv_heads", "jaccard_query_heads", "spearman"],
              [[a, b, f"{jaccards['KV heads'][(a, b)]:.6g}", f"{jaccards['query heads'][(a, b)]:.6g}",
                f"{rho[(a, b)]:.6g}"] for a, b in itertools.combinations(names, 2)])
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(f"wrote {args.out}.csv and {args.out}.md")
    return 0
