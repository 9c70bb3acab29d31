"""Sequences packed into one row: headops' sequence_ids against what else attends them apart.

A flattened training batch (transformers' DataCollatorWithFlattening) holds several sequences of
different lengths in one row; each must attend only to itself. Candidates, in one run, timed
interleaved (bench/timing.py: median of --repeats, each called once before):

  headops         headops.attention(q, k, v, sequence_ids=ids): one call, split in C++ over views
  headops loop    headops.attention per sequence, from Python over split views (what a caller does
                  without it)
  SDPA loop       torch's scaled_dot_product_attention per sequence, is_causal=True, the same way
  SDPA mask       SDPA over the whole row with a dense block-diagonal causal bool mask (S x S)
  flex            torch.compile(flex_attention) with a document-causal BlockMask (forward only: it has
                  no backward on the CPU; --no-flex: left out)

Forward, and forward+backward (dL/dout of ones), per dtype. Outputs are checked against the SDPA
loop first. Usage:

  .venv/bin/python bench/packed.py                      # 4096 tokens in 12 sequences, fp32 + bf16
  .venv/bin/python bench/packed.py --lengths 64x64      # 64 sequences of 64 tokens
  .venv/bin/python bench/packed.py --quick --no-flex    # CI-sized
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


def parse_lengths(text: str, total: int, seed: int) -> list:
    """"64x64" (64 sequences of 64), "a,b,c" (those lengths) or "random:N" (N lengths summing to
    `total`, drawn with `seed`)."""
    if "x" in text:
        count, length = (int(x) for x in text.split("x"))
        return [length] * count
    if text.startswith("random:"):
        n = int(text.split(":")[1])
        g = torch.Generator().manual_seed(seed)
        cuts = torch.randperm(total - 1, generator=g)[:n - 1].add(1).sort().values.tolist()
        bounds = [0] + cuts + [total]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return [int(x) for x in text.split(",")]


def candidates(q, k, v, lengths, with_flex):
    """name -> forward callable, all over q, k, v [1, S, H, D] (bshd)."""
    S = q.shape[1]
    ids = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))

    def sdpa(x, y, z, **kw):  # bshd in and out
        return F.scaled_dot_product_attention(x.transpose(1, 2), y.transpose(1, 2), z.transpose(1, 2),
                                              **kw).transpose(1, 2)

    def each(attend):  # (split views: their gradient is one concatenation, not a zero-filled copy each)
        pieces = zip(*(t.split(lengths, dim=1) for t in (q, k, v)))
        return torch.cat([attend(*piece) for piece in pieces], dim=1)

    found = {
        "headops": lambda: headops.attention(q, k, v, sequence_ids=ids),
        "headops loop": lambda: each(headops.attention),
        "SDPA loop": lambda: each(lambda x, y, z: sdpa(x, y, z, is_causal=True)),
    }
    block_diagonal = (ids[:, None] == ids[None, :]) & torch.ones(S, S, dtype=torch.bool).tril()
    found["SDPA mask"] = lambda: sdpa(q, k, v, attn_mask=block_diagonal)
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (kv_idx <= q_idx)

        mask = create_block_mask(document_causal, 1, 1, S, S, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        # (forward only: FlexAttention has no backward on the CPU)
        found["flex"] = lambda: flex(*(t.detach().transpose(1, 2) for t in (q, k, v)), block_mask=mask).transpose(1, 2)
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--total", type=int, default=4096, help="tokens in the row (random lengths)")
    p.add_argument("--lengths", default="random:12", help='"random:N", "COUNTxLENGTH" or "a,b,c"')
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--quick", action="store_true", help="512 tokens in 6 sequences, 4 heads, 2 repeats")
    add_output_args(p)
    args = p.parse_args()
    if args.quick:
        args.total, args.lengths, args.heads, args.repeats = 512, "random:6", 4, 2
    lengths = parse_lengths(args.lengths, args.total, args.seed)
    S = sum(lengths)
    torch.manual_seed(args.seed)
    rows, results = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        q, k, v = (torch.randn(1, S, args.heads, args.dim, dtype=dtype, requires_grad=True) for _ in range(3))
        found = candidates(q, k, v, lengths, not args.no_flex)
        with torch.no_grad():
            want = found["SDPA loop"]().float()
            for name, fn in found.items():
                err = (fn().float() - want).abs().max().item()
                tol = 2e-4 if dtype == torch.float32 else 3e-2
                if not err <= tol:
                    raise SystemExit(f"{name} ({dtype_name}) differs from the SDPA loop by {err:.2e} (> {tol})")
        for kind in ("forward", "fwd+bwd"):
            if kind == "forward":
                timed = {n: (lambda fn=fn: torch.no_grad()(fn)()) for n, fn in found.items()}
            else:
                timed = {n: with_backward(fn, [q, k, v]) for n, fn in found.items() if n != "flex"}
            for fn in timed.values():
                fn()  # warm-up (flex compiles here)
            stats = interleaved(timed, args.repeats)
            base = stats["headops"].median_ms
            row = [dtype_name, kind] + [f"{stats[n].median_ms:.1f}" for n in timed] + \
                  [f"{stats['SDPA loop'].median_ms / base:.2f}x"] + \
                  ([f"{stats['flex'].median_ms / base:.2f}x"] if "flex" in stats else [])
            rows.append(row)
            results.append(dict(dtype=dtype_name, kind=kind, ms={n: s.as_dict() for n, s in stats.items()}))
            header = ["dtype", "pass"] + [f"{n} ms" for n in timed] + ["SDPA loop / headops"] + \
                     (["flex / headops"] if "flex" in stats else [])
            print(text_table(header, rows[-1:]), flush=True)
    summary = dict(lengths=lengths, heads=args.heads, dim=args.dim, repeats=args.repeats, machine=machine_info(),
                   results=results)
    path = os.path.join(output_dir(args), "packed.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"lengths {lengths} (S = {S}), H = {args.heads}, D = {args.dim}; medians of {args.repeats} interleaved "
          f"calls; {path}")


if __name__ == "__main__":
    main()
