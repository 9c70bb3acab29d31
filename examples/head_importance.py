#!/usr/bin/env python
"""Michel et al. head importance on SmolLM2-135M: |dL/dgate| of every head from one backward pass.

    .venv/bin/python examples/head_importance.py [--tokens 256] [--tiny]

The gates are a [L, Hq] tensor requiring grad in the HeadSpec; headops' fused backward gives
their gradient (the importance score) with the rest of the model's gradients -- no S x S
attention matrix, no masking one head at a time. Scores are normalised per layer (L2), as in the
paper. --tiny runs a small random Llama (what the tests do).
"""

import argparse
import time

import _common
import torch

import headops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    model, tok = _common.causal_lm(args.tiny)
    ids = _common.token_ids(tok, args.tokens)
    spec = headops.HeadSpec.dense(model)
    spec.gate = torch.ones(spec.num_layers, spec.num_heads, requires_grad=True)
    headops.patch(model, spec)
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss  # next-token cross-entropy
    loss.backward()
    seconds = time.perf_counter() - start
    importance = spec.gate.grad.abs()
    normalised = importance / importance.norm(dim=1, keepdim=True).clamp_min(1e-12)
    order = normalised.flatten().argsort(descending=True)
    H = spec.num_heads
    print(f"loss {loss.item():.3f} on {ids.shape[1]} tokens; importance of {importance.numel()} heads from one "
          f"forward+backward in {seconds:.2f} s")
    print("most important (layer, head):", [(int(i) // H, int(i) % H) for i in order[:5]])
    print("least important (layer, head):", [(int(i) // H, int(i) % H) for i in order[-5:]])
    headops.unpatch(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
