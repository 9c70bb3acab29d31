#!/usr/bin/env python
"""ZeroTuning on SmolLM2: which heads should attend more, or less, to the first token?

    .venv/bin/python examples/first_token_scaling.py [--tiny] [--tokens 256] [--rows 4] [--heads 16] [--scale 1.5]

ZeroTuning (Han et al. 2025) scales each head's attention to the initial token (then
renormalises the row) and finds that heads differ in which way helps. Here:
1. one backward over rows of text (calibration) gives every head's dL/d log(scale) of its
   attention to the row's first token (headops.research.first_token_sensitivity; the scale is
   key_bias log(scale) on key 0: HeadSpec.scale_first_token);
2. the --heads heads with the largest gradients get --scale where attending more to the first
   token lowers the loss, 1/--scale where attending less does; against them: every head scaled
   up, every head scaled down, and as many random heads in random directions;
3. each spec's loss on other rows of text (held out).
Prints the loss of each and its change from the unscaled model.
"""

import argparse
import time

import _common  # noqa: F401  (the package path)
import torch

import headops
from headops import research


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokens", type=int, default=256, help="tokens per row")
    p.add_argument("--rows", type=int, default=4, help="rows of text for calibration, and as many held out")
    p.add_argument("--heads", type=int, default=16, help="heads scaled by their gradient")
    p.add_argument("--scale", type=float, default=1.5)
    args = p.parse_args(argv)
    model, tok = _common.causal_lm(args.tiny)
    text = _common.token_ids(tok, 2 * args.rows * args.tokens)
    if text.shape[1] < 2 * args.rows * args.tokens:
        raise SystemExit(f"the text has {text.shape[1]} tokens: ask for fewer --rows or --tokens")
    rows = text[0, :2 * args.rows * args.tokens].view(2 * args.rows, args.tokens)
    calibration, held_out = rows[:args.rows], rows[args.rows:]

    started = time.perf_counter()
    grad = research.first_token_sensitivity(model, [calibration])  # [L, Hq]
    L, H = grad.shape
    args.heads = min(args.heads, L * H)
    print(f"dL/d log(scale) of all {L * H} heads from one backward over {args.rows} x {args.tokens} tokens: "
          f"{time.perf_counter() - started:.1f} s; {int((grad < 0).sum())} heads would lower the loss by attending "
          f"more to the first token, {int((grad > 0).sum())} by attending less")

    top = grad.abs().flatten().argsort(descending=True)[:args.heads]
    chosen = torch.ones(L * H)
    chosen[top] = torch.where(grad.flatten()[top] < 0, args.scale, 1 / args.scale)
    g = torch.Generator().manual_seed(0)
    random = torch.ones(L * H)
    picked = torch.randperm(L * H, generator=g)[:args.heads]
    random[picked] = torch.where(torch.rand(args.heads, generator=g) < 0.5, args.scale, 1 / args.scale)
    dense = headops.HeadSpec.dense(model)
    specs = {"unscaled": dense,
             f"every head x{args.scale:g}": dense.scale_first_token(args.scale),
             f"every head x1/{args.scale:g}": dense.scale_first_token(1 / args.scale),
             f"{args.heads} random heads, random directions": dense.scale_first_token(random.view(L, H)),
             f"{args.heads} heads by their gradient": dense.scale_first_token(chosen.view(L, H))}
    print(f"the {args.heads} heads (layer.head: direction): " + " ".join(
        f"{int(i) // H}.{int(i) % H}:{'up' if grad.flatten()[i] < 0 else 'down'}" for i in top[:args.heads]))
    losses = {}
    for name, spec in specs.items():
        with research.with_spec(model, spec), torch.no_grad():
            losses[name] = float(research.causal_lm_loss(model, held_out))
    base = losses["unscaled"]
    print(f"held-out loss over {args.rows} x {args.tokens} other tokens:")
    for name, loss in losses.items():
        print(f"  {name:40s} {loss:.4f}  ({loss - base:+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
