#!/usr/bin/env python
"""Batched generation through a head-sparse cache, as transformers users run it.

    .venv/bin/python examples/batched_generation.py [--tiny] [--beams 3]

Prompts of different lengths, padded on the left as a tokenizer pads them for generation, run in
one batch through a StreamingLLM-style spec (every KV head keeps 4 sinks and a window of 16 tokens)
and a HeadSparseCache: greedy, then beam search (which reorders the cache's rows every step).
Each row's continuation is checked against the same prompt generated alone: a row's sinks are its
own first tokens, not its padding, and the cache stores no padding. Then a second turn continues
the same cache from the whole conversation. Prints the continuations and the bytes each cache held.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import causal_lm  # also puts python/ on the path

import headops

PROMPTS = [
    "The three primary colours of light are red, green and blue. Mixing all three gives",
    "Water boils at",
    "A prime number is a whole number greater than one whose only divisors are one and itself. The first "
    "five primes are",
]


def encode(tok, texts, tiny):
    """(ids, mask) of the prompts padded on the left (a tiny model: random token ids)."""
    if tiny:
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(1, 97, (n,), generator=g) for n in (14, 5, 22)]
    else:
        rows = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = r
        mask[b, S - len(r):] = 1
    return ids, mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (the tests' configuration)")
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)

    model, tok = causal_lm(args.tiny)
    pad = 0 if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    spec = headops.HeadSpec.streaming_llm(model, window=16, sinks=4)
    headops.patch(model, spec)
    ids, mask = encode(tok, PROMPTS, args.tiny)
    S = ids.shape[1]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
    failures = 0
    for beams in (1, args.beams):
        cache = headops.HeadSparseCache(model, spec, max_step=1)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, num_beams=beams, cache=cache, **kw)
        print(f"\n{'greedy' if beams == 1 else f'beam search ({beams} beams)'}: the cache held {cache.nbytes():,} "
              f"bytes (a dense cache: {cache.dense_nbytes():,}); left padding per row {cache.left_padding(0)}")
        for b in range(ids.shape[0]):
            alone_ids = ids[b:b + 1, mask[b].bool()]
            with torch.no_grad():
                alone = model.generate(alone_ids, num_beams=beams, cache=headops.HeadSparseCache(model, spec,
                                                                                                max_step=1), **kw)
            same = torch.equal(out[b, S:], alone[0, alone_ids.shape[1]:])
            failures += not same
            text = out[b, S:].tolist() if tok is None else repr(tok.decode(out[b, S:], skip_special_tokens=True))
            print(f"  row {b} ({int(mask[b].sum())} tokens): {text}  [{'as' if same else 'NOT as'} the prompt alone]")

    # a second turn: the whole conversation so far, continued from the same cache (its new tokens
    # run as steps of max_step), against recomputing every step without a cache
    cache = headops.HeadSparseCache(model, spec, max_step=1)
    first = ids[:1, mask[0].bool()]
    with torch.no_grad():
        answer = model.generate(first, cache=cache, **kw)
        follow = torch.randint(1, 97, (1, 6)) if tok is None else tok(" Explain why.", return_tensors="pt").input_ids
        second = torch.cat([answer, follow], 1)
        got = model.generate(second, cache=cache, **kw)
        want = model.generate(second, use_cache=False, **kw)
    same = torch.equal(got, want)
    failures += not same
    print(f"\nsecond turn through the same cache ({cache.nbytes():,} bytes): "
          f"{'as' if same else 'NOT as'} recomputing without a cache")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
