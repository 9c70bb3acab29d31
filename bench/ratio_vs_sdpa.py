#!/usr/bin/env python
"""headops/SDPA time ratios of one shape, forward and forward+backward, fp32 and bf16 (--dtypes): the
quick check that a change kept the kernels' speed (run it on two trees, alternating).

    PYTHONPATH=python .venv/bin/python bench/ratio_vs_sdpa.py [--s 2048] [--repeats 5] [--label main] [--dtypes float16]

B=1, H=16, D=128, dense causal; median of --repeats interleaved calls (headops, then SDPA) on
the same tensors; prints one line per (dtype, pass)."""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import headops


def median_pair(a, b, repeats):
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def attention_calls(q, k, v, train: bool):
    """(headops call, SDPA call) of dense causal attention over q, k, v ([B, S, H, D]; SDPA gets
    [B, H, S, D] copies): forward only under no_grad, or forward and backward of the output's sum."""
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(train) for x in (q, k, v))

    def headops_call():
        if not train:
            with torch.no_grad():
                return headops.attention(q, k, v, causal=True)
        headops.attention(q, k, v, causal=True).sum().backward()

    def sdpa_call():
        if not train:
            with torch.no_grad():
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).sum().backward()

    return headops_call, sdpa_call


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--s", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--label", default="")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes (float16 too)")
    args = p.parse_args()
    torch.manual_seed(0)
    B, H, S, D = 1, args.heads, args.s, 128
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        q, k, v = (torch.randn(B, S, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
        pairs = (("forward", attention_calls(q, k, v, train=False)), ("fwd+bwd", attention_calls(q, k, v, train=True)))
        for name, pair in pairs:
            h, s = median_pair(*pair, args.repeats)
            print(f"{args.label} {str(dtype).removeprefix('torch.'):9s} {name:8s} S={S} headops {h * 1e3:8.1f} ms "
                  f"SDPA {s * 1e3:8.1f} ms headops/SDPA {h / s:.2f}", flush=True)


if __name__ == "__main__":
    main()
