"""evaluate: accuracy against bytes held for every head-level method on offline long-context tasks.

Each batch of contexts is prefilled once with full attention; every method builds its compressed
cache from that prefill, then the question is appended and the answer decoded from it
(headops.evaluate; methods as strings like duo:scores=retrieval,full=0.5 or snapkv:budget=256).
--methods standard is the whole comparison grid (headops.evaluate.standard_methods) over the score
tables given with --scores NAME=path.csv (as `python -m headops discover` writes them).

Writes <out>.csv one row per (sample, method) as it goes (run it again to resume a killed run:
what is in <out>.csv is not done again), <out>_summary.csv (accuracy with its 95 % Wilson interval
and bytes per task, length and method) and <out>.png (accuracy against bytes held, one panel
per task and length), and prints the summary table.
"""

from __future__ import annotations

import os
import time

import torch

from .. import evaluate as harness
from .. import tasks
from .output import say_written, write_csv
from .study import DTYPES, add_dtype_argument, is_encoder, load_model, model_label

HELP = "accuracy vs KV bytes held: every head-level method on the same long-context prompts"


SUMMARY_HEADER = ["task", "length", "method", "family", "samples", "accuracy", "low", "high", "recall", "bytes",
                  "bytes_fraction"]


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (SmolLM2-135M-Instruct), tiny (random, a character tokenizer), or a folder holding a "
                        "transformers causal LM and its tokenizer (save_pretrained's files)")
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"], choices=tasks.TASKS)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=10,
                   help="prompts per (task, length): seeds 0.., depths spread evenly over [0, 1]")
    p.add_argument("--methods", nargs="+", default=["standard"],
                   help="method strings (headops.evaluate), or 'standard' for the whole grid")
    p.add_argument("--scores", nargs="*", default=[], metavar="NAME=CSV",
                   help="per-head score tables the methods name (scores=NAME), from `headops discover`")
    p.add_argument("--batch-size", type=int, default=8, help="prompts prefilled and answered together")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the answers' tokens plus room")
    p.add_argument("--out", default=None, help="writes <out>.csv, <out>_summary.csv, <out>.png "
                                              "(default results/evaluate_<model>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    add_dtype_argument(p)


def read_score_tables(items) -> dict:
    """{name: [L, Hq] tensor} from NAME=path.csv items."""
    from .discover import read_scores

    tables = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise SystemExit(f"--scores: each item is NAME=path.csv, got {item!r}")
        if not os.path.exists(path):
            raise SystemExit(f"--scores {item}: no such file {path!r} (python -m headops discover writes one)")
        tables[name] = read_scores(path)
    return tables


def make_samples(tokenizer, task_names, lengths, count) -> list:
    """`count` prompts per (task, length): seed j, its needle at depth j / (count - 1)."""
    depths = [j / (count - 1) if count > 1 else 0.5 for j in range(count)]
    return [tasks.make_sample(tokenizer, task, length, depths[j], j)
            for task in task_names for length in lengths for j in range(count)]


def format_table(summary) -> str:
    lines = [f"{'task':<17} {'length':>6} {'method':<44} {'n':>4} {'accuracy (95% CI)':>20} {'MiB/sample':>10} "
             f"{'x dense':>7}"]
    for s in summary:
        lines.append(f"{s['task']:<17} {s['length']:>6} {s['method']:<44} {s['samples']:>4} "
                     f"{100 * s['accuracy']:>6.1f} [{100 * s['low']:4.1f}, {100 * s['high']:5.1f}] "
                     f"{s['bytes'] / 2**20:>10.2f} {s['bytes_fraction']:>7.3f}")
    return "\n".join(lines)


def run(args) -> int:
    for name in ("samples", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    scores = read_score_tables(args.scores)
    try:
        methods = (harness.standard_methods(list(scores)) if args.methods == ["standard"]
                   else [harness.parse_method(m) for m in args.methods])
    except ValueError as e:
        raise SystemExit(f"--methods: {e}") from None
    out = args.out or os.path.join("results", f"evaluate_{model_label(args.model)}")
    started = time.perf_counter()
    model, tok = load_model(args.model, DTYPES[args.dtype])
    if is_encoder(model):
        raise SystemExit(f"--model {args.model}: an encoder; the evaluation generates answers (a causal LM)")
    if tok is None:
        from ..testing import CharTokenizer

        tok = CharTokenizer()
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s")
    samples = make_samples(tok, args.tasks, args.lengths, args.samples)
    done_before = len(harness.read_rows(out + ".csv"))
    print(f"{len(samples)} prompts x {len(methods)} methods" +
          (f"; {done_before} rows already in {out}.csv (resumed)" if done_before else ""))
    started = time.perf_counter()
    try:
        rows = harness.evaluate(model, tok, samples, methods, scores=scores, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, out=out + ".csv", show_progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"evaluated in {time.perf_counter() - started:.1f} s")
    wanted = {m.name for m in methods}
    keys = {(s.task, s.length) for s in samples}
    summary = harness.summarize([r for r in rows if r["method"] in wanted and (r["task"], int(r["length"])) in keys])
    print(format_table(summary))
    write_csv(out + "_summary.csv", SUMMARY_HEADER,
              [[s[k] if not isinstance(s[k], float) else f"{s[k]:.6g}" for k in SUMMARY_HEADER] for s in summary])
    if not args.no_plot:
        from .plots import plot_accuracy_vs_bytes  # matplotlib only when a plot is written

        plot_accuracy_vs_bytes(summary, out + ".png", model_label(args.model))
    say_written(out, plotted=not args.no_plot)
    print(f"wrote {out}_summary.csv")
    return 0
