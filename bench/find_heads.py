"""Finding heads on SmolLM2-135M: how the discovery methods agree, and the Retrieval Head paper's
ablation.

    PYTHONPATH=python .venv/bin/python bench/find_heads.py [--threads 1] [--length 512]
        [--depths 0 0.25 0.5 0.75 1] [--seeds 3] [--ks 5 10 20] [--draws 2]

Reads the per-head scores that ``python -m headops discover --method <m> --model smollm2`` wrote
to bench/results/discover_<m>_smollm2.csv (docs/finding_heads.md has the commands), then
1. the Jaccard overlap of the top 25 % between every pair of methods, per KV head (each KV head
   scored by the max over its query heads: what a cache keeps) and per query head;
2. Wu et al.'s ablation: passkey accuracy (exact match, greedy) with the k query heads of
   highest score gated off, for each method in --ablate (retrieval, and HeadKV's
   retrieval-reasoning where its CSV is there), against k heads drawn at random (--draws draws,
   seeded), for each k in --ks, over passkey prompts of --length tokens at --depths x --seeds.
Writes bench/results/find_heads_smollm2.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import timing  # noqa: E402

import headops  # noqa: E402
from headops import discover, tasks  # noqa: E402
from headops.cli.discover import read_scores  # noqa: E402
from headops.head_scores import overlaps, top_heads  # noqa: E402
from headops.models import load_smollm2  # noqa: E402
from headops.research import with_spec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def passkey_accuracy(model, tok, samples, heads) -> float:
    """Exact-match accuracy with the given query heads [(layer, head)] gated off (0: not computed)."""
    gated = {}
    for layer, h in heads:
        gated.setdefault(layer, []).append(h)
    with with_spec(model, headops.HeadSpec.dense(model).mask_heads(gated)):
        texts = tasks.generate_answers(model, tok, samples, batch_size=len(samples))
    return sum(tasks.exact_match(s, t) for s, t in zip(samples, texts)) / len(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--draws", type=int, default=2, help="random head sets per k")
    p.add_argument("--ablate", nargs="+", default=["retrieval", "retrieval-reasoning"],
                   help="the methods whose top heads are gated off (those with a CSV)")
    p.add_argument("--fraction", type=float, default=0.25, help="the top share compared between methods")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    scores = {}
    for method in discover.METHODS:
        path = os.path.join(args.results, f"discover_{method}_smollm2.csv")
        if os.path.exists(path):
            scores[method] = read_scores(path)
    if "retrieval" not in scores:
        raise SystemExit("run `python -m headops discover --method retrieval --model smollm2` first (docs/finding_heads.md)")
    model, tok = load_smollm2()
    spec = headops.HeadSpec.dense(model)
    L, Hq, Hkv = spec.num_layers, spec.num_heads, spec.num_kv_heads
    jaccards, tops = overlaps(scores, Hkv, args.fraction)

    samples = [tasks.make_sample(tok, "passkey", args.length, depth, seed)
               for depth in args.depths for seed in range(args.seeds)]
    ablated = [m for m in args.ablate if m in scores]
    orders = {m: top_heads(scores[m], L * Hq) for m in ablated}
    generator = torch.Generator().manual_seed(0)
    rows = []
    started = time.perf_counter()
    rows.append({"heads gated off": "none", "k": 0, "accuracy": passkey_accuracy(model, tok, samples, [])})
    print(f"dense: {rows[-1]['accuracy']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    for k in args.ks:
        for method in ablated:
            rows.append({"heads gated off": f"top {method}", "k": k,
                         "accuracy": passkey_accuracy(model, tok, samples, orders[method][:k])})
            print(f"top {k} {method}: {rows[-1]['accuracy']:.2f}", flush=True)
        for draw in range(args.draws):
            chosen = torch.randperm(L * Hq, generator=generator)[:k].tolist()
            rows.append({"heads gated off": f"random (draw {draw + 1})", "k": k,
                         "accuracy": passkey_accuracy(model, tok, samples, [(i // Hq, i % Hq) for i in chosen])})
            print(f"random {k} draw {draw + 1}: {rows[-1]['accuracy']:.2f}", flush=True)
    ablation_seconds = time.perf_counter() - started

    positive = int((scores["retrieval"] > 0).sum())
    lines = [f"# Finding heads on SmolLM2-135M ({timing.now_iso()})", "",
             f"{timing.machine_info()['cpu_model']}, torch threads {torch.get_num_threads()}. Command: "
             f"`{' '.join([os.path.basename(sys.executable), 'bench/find_heads.py'] + (argv or sys.argv[1:]))}`", "",
             f"## Overlap of the top {args.fraction:.0%} (Jaccard)", ""]
    methods = list(scores)
    for level, pairs in jaccards.items():
        lines += [f"{level} (top {len(tops[level][methods[0]])}):", ""]
        table = [[a] + [("1" if a == b else f"{pairs.get((a, b), pairs.get((b, a))):.2f}") for b in methods]
                 for a in methods]
        lines += [timing.markdown_table(["method"] + methods, table), ""]
    lines += ["## Top KV heads (layer.KV head, highest first; max over the group's query heads)", ""]
    lines += [f"- {m}: " + " ".join(f"{layer}.{h}" for layer, h in tops["KV heads"][m][:12]) for m in methods]
    lines += ["", f"## Passkey accuracy with heads gated off ({len(samples)} prompts of {args.length} tokens, "
                  f"depths {args.depths}, {args.seeds} seeds; {ablation_seconds:.0f} s)", "",
              f"{positive} of {L * Hq} query heads have a retrieval score above 0.", "",
              timing.markdown_table(["heads gated off", "k", "passkey accuracy"],
                                    [[r["heads gated off"], r["k"], f"{r['accuracy']:.2f}"] for r in rows]), ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "find_heads_smollm2.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "find_heads_smollm2.json"), "w") as f:
        json.dump({"date": timing.now_iso(), "machine": timing.machine_info(), "args": vars(args),
                   "jaccard": {level: {f"{a}|{b}": v for (a, b), v in pairs.items()} for level, pairs in jaccards.items()},
                   "top": {level: {m: chosen for m, chosen in t.items()} for level, t in tops.items()},
                   "ablation": rows, "ablation_seconds": ablation_seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
