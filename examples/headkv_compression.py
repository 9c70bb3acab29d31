#!/usr/bin/env python
"""Find the heads, then keep what they read: HeadKV on SmolLM2, from head scores to a cache
that holds a fraction of the bytes.

    .venv/bin/python examples/headkv_compression.py [--tiny] [--length 2048] [--budget 128] [--prompts 5]

1. HeadKV's retrieval-reasoning scores (headops.discover.retrieval_reasoning_scores) from six
   needle prompts of 512 tokens: each generated token's row of the attention pattern at every
   layer, read through a probe (never the S x S pattern).
2. Two specs holding the same bytes: HeadSpec.headkv (each KV head's budget from its score,
   beta 1.2) and HeadSpec.budget (SnapKV: every KV head the same budget).
3. Passkey prompts of --length tokens answered greedily through a HeadSparseCache of each spec
   (each KV head holds exactly its budget; tokens chosen by SnapKV scores from the prompt's last
   32 queries, which hold the question), and densely.

Prints each method's answers, its accuracy and the KV bytes it held against a dense cache.
--tiny runs a tiny model with one planted copying head over a character tokenizer.
"""

import argparse
import time

import _common  # noqa: F401  (the package path)
import torch

import headops
from headops import discover, tasks


def answer(model, tok, spec, sample):
    """(the answer's text, bytes held, a dense cache's bytes) of `sample` through spec's cache."""
    headops.set_spec(model, spec)
    cache = headops.HeadSparseCache(model, spec, append_room=sample.answer_budget())
    new = tasks.generate(model, sample.ids[None], sample.answer_budget(), cache=cache)[0]
    return tok.decode(tasks.until_eos(model, new), skip_special_tokens=True), cache.nbytes(), cache.dense_nbytes()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--length", type=int, default=2048, help="passkey prompt tokens")
    p.add_argument("--budget", type=int, default=128, help="tokens per KV head on average")
    p.add_argument("--prompts", type=int, default=5, help="passkey prompts (depths 0 to 1)")
    args = p.parse_args(argv)
    if args.tiny:
        from headops.testing import CharTokenizer, planted_copy_llama

        model, tok = planted_copy_llama(), CharTokenizer()
        args.length, args.budget = 400, 48
        # (filler without digits, needles whose numbers the planted head's 7s partly answer)
        samples = tasks.make_grid(tok, "niah_single", [400], [0.0, 0.5, 1.0], [0, 6], haystack="repeat")
    else:
        model, tok = _common.causal_lm(False)
        samples = discover.retrieval_samples(tok, lengths=[512], depths=[0.0, 0.5, 1.0], needles=2)

    started = time.perf_counter()
    scores = discover.retrieval_reasoning_scores(model, samples)
    print(f"retrieval-reasoning scores from {len(samples)} needle prompts ({scores.info['counted']} answered) in "
          f"{time.perf_counter() - started:.1f} s")
    specs = {"dense": headops.HeadSpec.dense(model),
             f"HeadKV, {args.budget} tokens a KV head on average":
                 headops.HeadSpec.headkv(model, scores.values, budget=args.budget, beta=1.2,
                                         window=headops.cache.BUDGET_RECENT),
             f"SnapKV, {args.budget} tokens every KV head": headops.HeadSpec.budget(model, budget=args.budget)}
    budgets = torch.tensor(specs[f"HeadKV, {args.budget} tokens a KV head on average"].cache_budget)  # [L, Hkv]
    most = [divmod(int(i), budgets.shape[1]) for i in budgets.flatten().argsort(descending=True)[:4]]
    print(f"HeadKV's budgets: {int(budgets.min())} to {int(budgets.max())} tokens a KV head (the most to layer.KV "
          f"head {', '.join(f'{layer}.{h}' for layer, h in most)})")

    prompts = [tasks.make_sample(tok, "passkey", args.length, depth, seed=i)
               for i, depth in enumerate(torch.linspace(0, 1, args.prompts).tolist())]
    headops.patch(model, specs["dense"])
    for name, spec in specs.items():
        started, right, held, dense = time.perf_counter(), 0, 0, 0
        texts = []
        for sample in prompts:
            text, nbytes, dense_nbytes = answer(model, tok, spec, sample)
            right += tasks.exact_match(sample, text)
            held, dense = held + nbytes, dense + dense_nbytes
            texts.append(" ".join(text.split())[:24])
        print(f"{name}: {right} of {len(prompts)} passkeys, KV bytes held {held / dense:.3f} x dense "
              f"({held / len(prompts) / 2**20:.2f} MiB a prompt; {time.perf_counter() - started:.1f} s)")
        print("   answers: " + " | ".join(texts))
    print(f"expected:  {' | '.join(s.answers[0] for s in prompts)}")
    headops.unpatch(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
