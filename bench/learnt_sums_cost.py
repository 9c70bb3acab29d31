#!/usr/bin/env python
"""What learning softmax_scale, sink_logit, alpha or key_bias costs a bfloat16 forward+backward.

    PYTHONPATH=python .venv/bin/python bench/learnt_sums_cost.py [--s 2048] [--repeats 7]

Those four gradients sum terms that cancel, so a bfloat16 call that learns one of them reads its
probabilities (and, for softmax_scale and key_bias, dL/do) as two bfloat16 parts
(docs/attention.md). Per parameter, three calls of B=1, H=16, D=128, causal, layout "bshd",
forward then backward of a fixed bfloat16 output gradient into q, k, v (and the parameter):

  fixed     bfloat16, the parameter given but not learnt (P rounded to bfloat16, as SDPA does);
  learnt    bfloat16, the parameter learnt (P and dL/do in two parts);
  float32   the same inputs in float32, the parameter learnt (what headops did until 2026-12-06).

alpha's calls stream with window 64 and 4 sinks. Median of --repeats interleaved rounds
(bench/timing.py) of the eight bfloat16 calls, then of the four float32 ones (so that no
bfloat16 call is timed right after a float32 call's much larger allocations); prints
learnt/fixed and float32/fixed per parameter.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import headops  # noqa: E402
from bench.timing import forward_backward, interleaved, machine_info  # noqa: E402

B, H, D = 1, 16, 128
PARAMETERS = ("sink_logit", "softmax_scale", "key_bias", "alpha")


def parameter_args(name: str, S: int, learnt: bool) -> dict:
    value = {"sink_logit": torch.zeros(H), "softmax_scale": torch.full((H,), D ** -0.5),
             "key_bias": torch.zeros(H, S), "alpha": torch.linspace(0.1, 0.9, H)}[name]
    args = {name: value.requires_grad_(learnt)}
    if name == "alpha":
        args.update(window=64, sinks=4)
    return args


def train_call(q, k, v, grad_out, args):
    return forward_backward(q, k, v, args, grad_out, lambda: headops.attention(q, k, v, **args))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--s", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0, g0 = (torch.randn(B, args.s, H, D, generator=gen) for _ in range(4))
    grad_out = g0.bfloat16()
    m = machine_info()
    print(f"{m['cpu_model']}, {torch.get_num_threads()} threads; B={B} H={H} S={args.s} D={D}, causal, "
          f"forward+backward, median of {args.repeats} interleaved rounds")
    candidates = {}
    for name in PARAMETERS:
        for kind in ("fixed", "learnt", "float32"):
            dtype = torch.float32 if kind == "float32" else torch.bfloat16
            # a copy each: a float32 call's q0.requires_grad_() would make later .to(bfloat16) calls
            # non-leaves whose backward also converts and accumulates into q0.grad
            q, k, v = (x.to(dtype, copy=True).requires_grad_() for x in (q0, k0, v0))
            candidates[(name, kind)] = train_call(q, k, v, grad_out, parameter_args(name, args.s, kind != "fixed"))
    stats = {}
    for kinds in (("fixed", "learnt"), ("float32",)):
        chosen = {key: call for key, call in candidates.items() if key[1] in kinds}
        for call in chosen.values():
            call()  # warm-up
        stats.update(interleaved(chosen, args.repeats))
    print(f"{'parameter':<14} {'fixed ms':>9} {'learnt ms':>10} {'float32 ms':>11} {'learnt/fixed':>13} "
          f"{'float32/fixed':>14}")
    for name in PARAMETERS:
        fixed, learnt, f32 = (stats[(name, kind)].median_ms for kind in ("fixed", "learnt", "float32"))
        print(f"{name:<14} {fixed:>9.1f} {learnt:>10.1f} {f32:>11.1f} {learnt / fixed:>12.2f}x {f32 / fixed:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
