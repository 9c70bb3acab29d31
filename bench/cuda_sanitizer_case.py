"""Small CUDA forward calls for compute-sanitizer (memcheck/racecheck): both kernels, partial query
tiles, GQA, Sq > Sk, strided inputs, every per-head feature, alpha, gated heads, empty inputs;
then backward calls (the generic CUDA backward) with every gradient wanted.

    compute-sanitizer --tool memcheck python3 bench/cuda_sanitizer_case.py
    compute-sanitizer --tool racecheck python3 bench/cuda_sanitizer_case.py --small
``--small``: one small call per kernel (tensor-core and generic forward, the generic kernel's
and the decode's wide variants for head dims past 256, the skipped-heads and upload kernels, the
backward, a cache's append and decode), for a
time-capped run (bench/gpu_suite.sh). Exits non-zero if an output is not finite where it must be.
Run on an H200 (2026-12-04: 0 errors, 0 hazards, 0 synccheck errors).
"""

import os
import sys

import torch

import headops

# HEADOPS_CASE_DEVICE=cpu: a dry run of this script on the CPU kernel
DEVICE = os.environ.get("HEADOPS_CASE_DEVICE", "cuda")


def case(B, Sq, Sk, Hq, Hkv, D, dtype, layout="bshd", strided=False, grad=False, **kw):
    g = torch.Generator().manual_seed(B * 1000 + Sq + Sk + D)
    shape_q = (B, Sq, Hq, D) if layout == "bshd" else (B, Hq, Sq, D)
    shape_k = (B, Sk, Hkv, D) if layout == "bshd" else (B, Hkv, Sk, D)

    def make(shape):
        if strided:  # a view of a wider buffer on the GPU: rows not 16-byte aligned
            return torch.randn(*shape[:-1], D + 3, generator=g).to(dtype).to(DEVICE)[..., 1:D + 1]
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q, k, v = make(shape_q), make(shape_k), make(shape_k)
    kw = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        kw = {n: (t.float().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
              for n, t in kw.items()}
    out = headops.attention(q, k, v, layout=layout, **kw)
    if grad:
        leaves = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        dout = torch.randn(out.shape, generator=g).to(DEVICE)
        out = torch.autograd.grad((out.float() * dout).sum(), leaves)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def cache_case(dtypes=(torch.bfloat16, torch.float32), dims=(64, 40)):
    """A HeadSparseCache on the device (csrc/kvcache/cuda/: kv_append, decode_attention): full,
    streaming (compensated, wrapping rings) and budget KV heads, GQA 4 (8 rows at 2 tokens), split-K, per-head
    arguments with a head gated off, steps of one and two tokens. Returns the non-finite steps."""
    bad = 0
    for dtype in dtypes:
        for D in dims:
            g = torch.Generator().manual_seed(D)
            # GQA 4: steps of 2 tokens give 8 rows a KV head (the decode kernel's row groups)
            B, Hq, Hkv, S = 2, 16, 4, 150
            twice = lambda values: [x for x in values for _ in range(2)]  # noqa: E731
            cache = headops.HeadSparseCache(
                num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, batch_size=B, dtype=dtype,
                device=DEVICE, kinds=["full", "streaming", "budget", "streaming"],
                window=twice([-1, 40, 7, 7, -1, -1, 5, 3]), sinks=twice([0, 2, 1, 2, 0, 0, 0, 4]),
                budget=[None, None, 20, None], compensation=[None, "weighted", None, None], budget_recent=3,
                max_step=2, split_keys=64)
            kw = dict(gate=torch.tensor(twice([1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0, 0.0])).to(DEVICE),
                      sink_logit=torch.randn(Hq, generator=g).to(DEVICE))
            new = lambda n, H: torch.randn(B, n, H, D, generator=g).to(dtype).to(DEVICE)
            outs = [cache.attention(0, new(S, Hq), new(S, Hkv), new(S, Hkv), **kw)]
            for n in (1, 2, 1, 2, 2, 1):
                outs.append(cache.attention(0, new(n, Hq), new(n, Hkv), new(n, Hkv), **kw))
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            bad += sum(int(not torch.isfinite(o).all()) for o in outs)
    return bad


def small():
    """One small call per kernel: forward (tensor-core with alpha and a gated head, planning
    arguments on the host, the work list uploaded both ways; generic in float32), backward, and a
    cache's append and decode (full, compensated streaming and budget heads)."""
    H = 4
    host = dict(window=torch.tensor([16, 64, 1, -1]), sinks=torch.tensor([4, 0, 2, 0]),
                gate=torch.tensor([1.0, 0.0, -0.5, 2.0]), alpha=torch.tensor([0.0, 0.5, 1.0, 0.25]))
    outs = [case(1, 130, 200, H, 2, 64, torch.bfloat16, sink_logit=torch.randn(H), **host)]
    os.environ["HEADOPS_CUDA_UPLOAD"] = "kernel"
    outs.append(case(1, 130, 200, H, 2, 64, torch.bfloat16, **host))
    os.environ.pop("HEADOPS_CUDA_UPLOAD")
    outs.append(case(1, 40, 70, H, 1, 40, torch.float32, key_bias=torch.randn(H, 70), **host))
    # the generic kernel's wide variant (D past 256: Gemma 4's 512)
    outs.append(case(1, 20, 40, H, 2, 264, torch.float32, **host))
    grads = case(1, 33, 50, H, 2, 40, torch.float32, grad=True, window=9, sinks=2, sink_logit=torch.randn(H))
    bad = sum(int(not torch.isfinite(o).all()) for o in outs) + sum(int(not torch.isfinite(t).all()) for t in grads)
    # and the decode's (float32 at D = 264: the last lane's 64-byte slice of a value row)
    return bad + cache_case(dtypes=(torch.bfloat16,), dims=(64,)) + cache_case(dtypes=(torch.float32,), dims=(264,))


def main():
    if "--small" in sys.argv[1:]:
        bad = small()
        print("non-finite outputs:", bad)
        sys.exit(1 if bad else 0)
    bad = 0
    H = 4
    full = dict(softmax_scale=torch.tensor([0.1, 0.2, 0.125, 0.3]), window=torch.tensor([1, 70, -1, 5]),
                sinks=torch.tensor([3, 0, 1, 200]), key_bias=torch.randn(H, 300),
                sink_logit=torch.tensor([0.0, -1.0, 2.0, -30.0]), out_scale=torch.randn(H, 128),
                out_bias=torch.randn(H, 128), gate=torch.tensor([1.0, 0.0, -0.5, 2.0]))
    for kernel in ("auto", "generic"):
        if kernel == "generic":
            os.environ["HEADOPS_CUDA_KERNEL"] = "generic"
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for D in (64, 128, 40):
                kw = {n: (t[..., :D] if n in ("out_scale", "out_bias") else t) for n, t in full.items()}
                outs = [
                    case(2, 130, 300, H, 2, D, dtype, **kw),
                    case(1, 300, 130, H, 1, D, dtype, layout="bhsd", causal=False,
                         **{n: t for n, t in kw.items() if n != "key_bias"}),
                    case(1, 77, 300, H, 4, D, dtype, alpha=torch.tensor([0.0, 0.5, 1.0, 0.25]),
                         window=torch.tensor([16, 64, 1, -1]), sinks=torch.tensor([4, 0, 2, 0])),
                    case(1, 65, 65, H, 2, D, dtype, strided=True, window=9, sinks=2),
                    case(2, 1, 300, H, 1, D, dtype),
                ]
                bad += sum(int(not torch.isfinite(o).all()) for o in outs)
        case(1, 0, 10, H, 1, 64, torch.bfloat16)
        case(1, 5, 0, H, 1, 64, torch.bfloat16)
    os.environ.pop("HEADOPS_CUDA_KERNEL", None)
    # backward: every gradient wanted (gated-off heads and alpha 0/1 are computed then)
    for dtype in (torch.bfloat16, torch.float32):
        for D in (64, 40):
            kw = {n: (t[..., :D] if n in ("out_scale", "out_bias") else t) for n, t in full.items()}
            grads = [
                *case(2, 130, 300, H, 2, D, dtype, grad=True, **kw),
                *case(1, 77, 300, H, 4, D, dtype, grad=True, alpha=torch.tensor([0.0, 0.5, 1.0, 0.25]),
                      window=torch.tensor([16, 64, 1, -1]), sinks=torch.tensor([4, 0, 2, 0])),
                *case(1, 300, 130, H, 1, D, dtype, layout="bhsd", causal=False, strided=True, grad=True,
                      window=9, sinks=2),
            ]
            bad += sum(int(not torch.isfinite(t).all()) for t in grads)
    case(1, 5, 0, H, 1, 64, torch.float32, grad=True)
    bad += cache_case()
    print("non-finite outputs:", bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
