#!/usr/bin/env python
"""LoFiT-style fine-tuning of SmolLM2-135M: train only per-head out_scale / out_bias.

    .venv/bin/python examples/lofit_training.py [--steps 20] [--tiny]

The model's weights stay frozen; the HeadSpec's out_scale [L, Hq, D] (starting at 1) and
out_bias (starting at 0) are the only parameters, trained through headops' fused backward on
next-token loss of a text (the standard library's docstrings). Prints the loss before and after.
"""

import argparse

import _common
import torch

import headops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    model, tok = _common.causal_lm(args.tiny)
    for w in model.parameters():
        w.requires_grad_(False)
    ids = _common.token_ids(tok, args.tokens)
    spec = headops.HeadSpec.dense(model)
    spec.out_scale = torch.ones(spec.num_layers, spec.num_heads, spec.head_dim, requires_grad=True)
    spec.out_bias = torch.zeros(spec.num_layers, spec.num_heads, spec.head_dim, requires_grad=True)
    headops.patch(model, spec)
    optimizer = torch.optim.Adam([spec.out_scale, spec.out_bias], lr=1e-2)
    losses = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(ids, labels=ids).loss.item()
    print(f"trainable parameters: {spec.out_scale.numel() + spec.out_bias.numel()} (model frozen)")
    print(f"loss before {losses[0]:.4f}, after {args.steps} steps {final:.4f}")
    headops.unpatch(model)
    return 0 if final < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
