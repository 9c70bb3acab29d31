#!/usr/bin/env python
"""LoFiT-style fine-tuning of SmolLM2-135M: train only per-head out_scale / out_bias.

    .venv/bin/python examples/lofit_training.py [--steps 20] [--packed 4] [--tiny]

The model's weights stay frozen; the HeadSpec's out_scale [L, Hq, D] (starting at 1) and
out_bias (starting at 0) are the only parameters, trained through headops' fused backward on
next-token loss of a text (the standard library's docstrings). Prints the loss before and after.
--packed N cuts the text into N pieces of different lengths and trains on them flattened into one
row (transformers' DataCollatorWithFlattening: no padding), each piece attended on its own.
"""

import argparse

import _common
import torch
import transformers

import headops


def flattened(ids, pieces: int) -> dict:
    """The [1, n] ids cut into `pieces` of growing length, flattened into one row with position_ids
    restarting per piece and labels that do not cross from one piece to the next."""
    n = ids.shape[1]
    weights = torch.arange(1, pieces + 1, dtype=torch.float64)
    cuts = (weights.cumsum(0) / weights.sum() * n).round().long().tolist()
    rows = [{"input_ids": ids[0, a:b].tolist()} for a, b in zip([0] + cuts[:-1], cuts)]
    return transformers.DataCollatorWithFlattening(return_tensors="pt")(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--packed", type=int, default=0, help="train on the text cut into this many pieces, flattened")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    model, tok = _common.causal_lm(args.tiny)
    for w in model.parameters():
        w.requires_grad_(False)
    ids = _common.token_ids(tok, args.tokens)
    batch = flattened(ids, args.packed) if args.packed else {"input_ids": ids, "labels": ids}
    spec = headops.HeadSpec.dense(model)
    spec.out_scale = torch.ones(spec.num_layers, spec.num_heads, spec.out_dim, requires_grad=True)
    spec.out_bias = torch.zeros(spec.num_layers, spec.num_heads, spec.out_dim, requires_grad=True)
    headops.patch(model, spec)
    optimizer = torch.optim.Adam([spec.out_scale, spec.out_bias], lr=1e-2)
    losses = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(**batch, use_cache=False).loss.item()
    print(f"trainable parameters: {spec.out_scale.numel() + spec.out_bias.numel()} (model frozen)"
          + (f"; {args.packed} pieces flattened into one row of {batch['input_ids'].shape[1]} tokens" if args.packed
             else ""))
    print(f"loss before {losses[0]:.4f}, after {args.steps} steps {final:.4f}")
    headops.unpatch(model)
    return 0 if final < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
