#!/usr/bin/env python
"""Head masking on all-MiniLM-L6-v2: switch heads off, watch the embeddings and the time.

    .venv/bin/python examples/head_masking.py [--tiny]

transformers 5 ignores head_mask on this model; headops' gates are the way to mask its heads,
and a gated head is never computed, so the attention time falls as heads are switched off.
Prints, per fraction of heads masked (random, fixed seed): cosine similarity of the passage
embeddings to the unmasked model's, and the forward time of a batch of 16 passages of 256 tokens
(the standard library's docstrings; at a few tokens per sentence attention is a negligible
share of the model's time).
"""

import argparse
import statistics
import time

import _common
import torch

import headops
from headops.models import mean_pooled

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    model, tok = _common.encoder(args.tiny)
    if tok is None:
        ids = torch.randint(0, 97, (16, 64), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        text = _common.stdlib_text()
        passages = [text[i * 1500:(i + 1) * 1500] for i in range(16)]
        batch = tok(passages, return_tensors="pt", padding=True, truncation=True, max_length=256)
    dense = headops.HeadSpec.dense(model)
    headops.patch(model, dense)
    reference = mean_pooled(model, batch)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(dense.num_layers * dense.num_heads, generator=gen)
    print(f"{'masked':>7} {'similarity':>10} {'forward ms':>10}")
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        gate = torch.ones(dense.num_layers * dense.num_heads)
        gate[order[:int(fraction * gate.numel())]] = 0
        spec = dense.copy()
        spec.gate = gate.view(dense.num_layers, dense.num_heads)
        headops.set_spec(model, spec)
        emb = mean_pooled(model, batch)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mean_pooled(model, batch)
            times.append(time.perf_counter() - start)
        similarity = (emb * reference).sum(-1).mean().item()
        print(f"{fraction:7.0%} {similarity:10.4f} {1e3 * statistics.median(times):10.1f}")
    headops.unpatch(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
