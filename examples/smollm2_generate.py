#!/usr/bin/env python
"""End to end on a real model: SmolLM2-135M-Instruct generating through headops.

    .venv/bin/python examples/smollm2_generate.py [--prompt-tokens 1500] [--new-tokens 32]

Three runs of greedy generation from the same long prompt (real English text: the docstrings of
Python's standard library modules, shipped with every Python):
  1. transformers as shipped (SDPA attention, DynamicCache);
  2. headops.patch with a dense HeadSpec and a HeadSparseCache whose heads are all full:
     the same tokens as run 1;
  3. a DuoAttention-style spec: in every layer KV head 0 stays full (retrieval head), KV heads
     1 and 2 stream (sinks 4 + window 256); a HeadSparseCache keeps only that. Its tokens are
     compared with recomputing every step with the same spec (no cache) on a shorter run.
Prints decode tokens/s and the cache memory of each run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import stdlib_text  # also puts python/ on the path

import headops
from headops.models import load_smollm2


def dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def generate(model, ids, new_tokens, cache=None, use_cache=True):
    """(tokens, prefill seconds, decode seconds): prefill timed apart from the decode steps."""
    from transformers import DynamicCache

    cache = cache if cache is not None else (DynamicCache() if use_cache else None)
    with torch.no_grad():
        start = time.perf_counter()
        first = model.generate(ids, max_new_tokens=1, do_sample=False, cache=cache, use_cache=use_cache)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(first, max_new_tokens=new_tokens - 1, do_sample=False, cache=cache,
                             use_cache=use_cache)
        decode = time.perf_counter() - start
    return out, prefill, decode, cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--check-tokens", type=int, default=8, help="tokens compared with recomputation in run 3")
    args = p.parse_args(argv)

    started = time.perf_counter()
    model, tok = load_smollm2()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - started:.1f} s "
          f"({model.config.num_hidden_layers} layers, {model.config.num_attention_heads} query heads, "
          f"{model.config.num_key_value_heads} KV heads); {torch.get_num_threads()} threads")
    ids = tok(stdlib_text(), return_tensors="pt").input_ids[:, :args.prompt_tokens]
    print(f"prompt: {ids.shape[1]} tokens of the Python standard library's docstrings")

    out1, pre1, dec1, dyn = generate(model, ids, args.new_tokens)
    rows = [("transformers (SDPA, DynamicCache)", pre1, dec1, dynamic_cache_bytes(dyn), None)]

    dense = headops.HeadSpec.dense(model)
    headops.patch(model, dense)
    cache2 = headops.HeadSparseCache(model, dense, max_step=1)
    out2, pre2, dec2, _ = generate(model, ids, args.new_tokens, cache2)
    rows.append(("headops, dense spec, HeadSparseCache", pre2, dec2, cache2.nbytes(), cache2.dense_nbytes()))
    same_dense = torch.equal(out1, out2)

    spec = headops.HeadSpec.streaming(model, {layer: [1, 2] for layer in range(model.config.num_hidden_layers)},
                                      window=256, sinks=4)
    headops.set_spec(model, spec)
    cache3 = headops.HeadSparseCache(model, spec, max_step=1)
    out3, pre3, dec3, _ = generate(model, ids, args.new_tokens, cache3)
    rows.append(("headops, 2 of 3 KV heads streaming", pre3, dec3, cache3.nbytes(), cache3.dense_nbytes()))
    short = ids[:, :256]
    want = model.generate(short, max_new_tokens=args.check_tokens, do_sample=False, use_cache=False)
    got = model.generate(short, max_new_tokens=args.check_tokens, do_sample=False,
                         cache=headops.HeadSparseCache(model, spec, max_step=1))
    same_streaming = torch.equal(want, got)
    headops.unpatch(model)

    print()
    print(f"{'run':<40} {'prefill s':>9} {'decode tok/s':>12} {'cache MiB':>10} {'dense MiB':>10}")
    for name, pre, dec, held, dense_bytes in rows:
        dense_txt = f"{dense_bytes / 2**20:10.2f}" if dense_bytes else f"{'':>10}"
        print(f"{name:<40} {pre:9.2f} {(args.new_tokens - 1) / dec:12.1f} {held / 2**20:10.2f} {dense_txt}")
    print()
    print(f"dense spec generates the same {args.new_tokens} tokens as transformers: {same_dense}")
    print(f"streaming spec through the cache = recomputing every step with the spec "
          f"({args.check_tokens} tokens from a 256-token prompt): {same_streaming}")
    print(f"streaming spec's continuation: {tok.decode(out3[0, ids.shape[1]:])!r}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0 if same_dense and same_streaming else 1


if __name__ == "__main__":
    sys.exit(main())
