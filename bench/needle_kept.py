#!/usr/bin/env python
"""Which KV heads keep the asked needle under each method: for a few prompts of one task, every
method's cache is built from one dense prefill (headops.evaluate's flow) and, per (layer, KV
head), the answer's tokens it holds are counted; then the method answers.

    PYTHONPATH=python .venv/bin/python bench/needle_kept.py --task niah_single --length 2048 --samples 4

Per method and prompt it prints how many of the 30 x 3 KV heads hold the whole answer (and the
whole needle sentence) once the cache is built, how many still hold it and the whole question
after the answer is decoded, the answer, and one digit per KV head: the answer tokens it holds
(layers left to right, 3 KV heads each, capped at 9), before and after answering.
docs/evaluate.md reads it."""

import argparse

import torch

from headops import HeadSpec, patch, tasks, unpatch
from headops import evaluate as ev
from headops.cli.discover import read_scores
from headops.cli.study import load_model

DEFAULT_METHODS = ["snapkv:budget=256", "headkv:budget=256,scores=retrieval", "snapkv:budget=256,question=1",
                   "headkv:budget=256,question=1,scores=retrieval"]


def held_per_head(cache, span):
    """[layer][KV head] -> how many positions of span [lo, hi) the head keeps (row 0)."""
    lo, hi = span
    return [[sum(lo <= p < hi for p in layer.kept_positions(0, h).tolist()) for h in range(layer.Hkv)]
            for layer in cache._layers]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="niah_single", choices=tasks.TASKS)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=4, help="prompts, depths spread over [0, 1]")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--scores", default="bench/results/discover_retrieval_smollm2.csv",
                   help="the retrieval score table the methods name as scores=retrieval")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    model, tok = load_model("smollm2", getattr(torch, args.dtype))
    methods = [ev.parse_method(m) for m in args.methods]
    specs = {m.name: m.spec(model, {"retrieval": read_scores(args.scores)}) for m in methods}
    patch(model, HeadSpec.dense(model))
    try:
        for seed in range(args.samples):
            s = tasks.make_sample(tok, args.task, args.length, depth=seed / max(1, args.samples - 1), seed=seed)
            ids, ctx = s.ids[None], s.question_start
            answer, needle = s.answer_spans()[0], s.needles[s.asked[0]].span
            print(f"\n{args.task} {args.length}, seed {seed}, depth {s.depth:.2f}: needle "
                  f"{tok.decode(s.ids[needle[0]:needle[1]]).strip()!r} at tokens {needle[0]}-{needle[1]}; "
                  f"the context's last words {tok.decode(s.ids[ctx - 16:ctx]).strip()[-50:]!r}")
            prefills = ev.prompt_prefill(model, ids, ctx, max(dict(m.params).get("observation_window", 1)
                                                              for m in methods))
            for m in methods:
                cache = ev.method_cache(model, m, specs[m.name], prefills, ids, ctx, s.answer_budget())
                per_answer, per_needle = held_per_head(cache, answer), held_per_head(cache, needle)
                whole = sum(k == answer[1] - answer[0] for layer in per_answer for k in layer)
                whole_needle = sum(k == needle[1] - needle[0] for layer in per_needle for k in layer)
                heads = sum(len(layer) for layer in per_answer)
                new = ev.answer_from_cache(model, ids, cache, s.answer_budget())
                text = tok.decode(tasks.until_eos(model, new[0]), skip_special_tokens=True).strip()
                after = held_per_head(cache, answer)
                question = held_per_head(cache, (ctx, ids.shape[1]))
                q_whole = sum(k == ids.shape[1] - ctx for layer in question for k in layer)
                print(f"  {m.name:46s} whole answer in {whole:2d}/{heads} KV heads, whole needle in "
                      f"{whole_needle:2d}; after answering: whole answer in "
                      f"{sum(k == answer[1] - answer[0] for layer in after for k in layer):2d}, whole question "
                      f"({ids.shape[1] - ctx} tokens) in {q_whole:2d}; "
                      f"{'right' if tasks.exact_match(s, text) else 'wrong'}: {text[:28]!r}")
                for label, table in (("answer", per_answer), ("after", after)):
                    print(f"      {label:6s} " + " ".join("".join(str(min(k, 9)) for k in layer) for layer in table))
    finally:
        unpatch(model)


if __name__ == "__main__":
    main()
