"""Values of another head dim than the keys' (multi-head latent attention): headops against SDPA.

DeepSeek V2/V3's attention, once its latent is expanded, has q and k of 192 dims (128 + 64
rotary) and v of 128. headops.attention pads v with zeros to 192 (the kernels take one head
dim) and cuts the output back. Candidates, in one run, timed interleaved (bench/timing.py: median
of --repeats, each called once before), causal, layout bhsd as transformers calls them:

  headops          headops.attention(q, k, v): v of Dv, padded inside
  headops Dv=D     headops.attention on a v already of D dims: the padded call's kernels alone
                   (the difference to "headops" is the pad and the cut)
  SDPA             scaled_dot_product_attention(q, k, v) as transformers' "sdpa" calls it: with
                   v's head dim differing, PyTorch's CPU flash kernel declines and the math path
                   runs (S x S)
  SDPA padded      v padded to D for SDPA's flash kernel, the output cut (as transformers'
                   FlashAttention path does for these models)

Forward and forward+backward (dL/dout of ones, gradients of q, k, v), per dtype; outputs are
checked against SDPA first. Usage:

  .venv/bin/python bench/value_head_dim.py                     # S = 2048, H = 16, D = 192, Dv = 128
  .venv/bin/python bench/value_head_dim.py --s 4096 --dtypes bfloat16
  .venv/bin/python bench/value_head_dim.py --quick             # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import (add_output_args, interleaved, machine_info, output_dir, text_table,  # noqa: E402
                          with_backward)

import headops  # noqa: E402


def candidates(q, k, v, v_wide):
    """name -> forward callable over q, k [B, H, S, D] and v [B, H, S, Dv] (v_wide: v's values with
    zeros to D, a leaf of its own)."""
    Dv = v.shape[-1]
    return {
        "headops": lambda: headops.attention(q, k, v, layout="bhsd"),
        "headops Dv=D": lambda: headops.attention(q, k, v_wide, layout="bhsd"),
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "SDPA padded": lambda: F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - Dv)),
                                                              is_causal=True)[..., :Dv],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--s", type=int, default=2048, help="sequence length")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=192, help="q's and k's head dim")
    p.add_argument("--value-dim", type=int, default=128, help="v's head dim")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="S = 256, 4 heads, 2 repeats")
    add_output_args(p)
    args = p.parse_args()
    if args.quick:
        args.s, args.heads, args.repeats = 256, 4, 2
    torch.manual_seed(0)
    rows, results = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        shape = (1, args.heads, args.s)
        q, k = (torch.randn(*shape, args.dim, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(*shape, args.value_dim, dtype=dtype, requires_grad=True)
        v_wide = F.pad(v.detach(), (0, args.dim - args.value_dim)).requires_grad_(True)
        found = candidates(q, k, v, v_wide)
        with torch.no_grad():
            want = found["SDPA"]().float()
            for name, fn in found.items():
                got = fn().float()[..., :args.value_dim]
                err = (got - want).abs().max().item()
                tol = 2e-4 if dtype == torch.float32 else 3e-2
                if not err <= tol:
                    raise SystemExit(f"{name} ({dtype_name}) differs from SDPA by {err:.2e} (> {tol})")
        for kind in ("forward", "fwd+bwd"):
            if kind == "forward":
                timed = {n: (lambda fn=fn: torch.no_grad()(fn)()) for n, fn in found.items()}
            else:
                timed = {n: with_backward(fn, [q, k, v_wide if n == "headops Dv=D" else v]) for n, fn in found.items()}
            for fn in timed.values():
                fn()  # warm-up
            stats = interleaved(timed, args.repeats)
            base = stats["headops"].median_ms
            rows.append([dtype_name, kind] + [f"{stats[n].median_ms:.1f}" for n in timed] +
                        [f"{base / stats['SDPA'].median_ms:.2f}x", f"{base / stats['SDPA padded'].median_ms:.2f}x",
                         f"{base / stats['headops Dv=D'].median_ms:.2f}x"])
            results.append(dict(dtype=dtype_name, kind=kind, ms={n: s.as_dict() for n, s in stats.items()}))
            header = ["dtype", "pass"] + [f"{n} ms" for n in timed] + \
                     ["headops / SDPA", "headops / SDPA padded", "headops / headops Dv=D"]
            print(text_table(header, rows[-1:]), flush=True)
    summary = dict(s=args.s, heads=args.heads, dim=args.dim, value_dim=args.value_dim, repeats=args.repeats,
                   machine=machine_info(), results=results)
    path = os.path.join(output_dir(args), "value_head_dim.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"B = 1, H = {args.heads}, S = {args.s}, D = {args.dim}, Dv = {args.value_dim}, causal; medians of "
          f"{args.repeats} interleaved calls; {path}")


if __name__ == "__main__":
    main()
