"""GPU forward benchmark of headops.attention against torch SDPA and FlexAttention.

B=1, H=32, S=8192, D=128, bfloat16, causal, layout bhsd (SDPA's); scenarios:
  dense        every head dense causal
  gated 50%    every other head gated to exactly 0 (headops never launches it)
  stream 50%   every other head streaming: window 1024 + 4 sinks (headops walks only those keys)
Candidates:
  headops      headops.attention (the CUDA forward; includes its Python validation and the host
               work-list build, i.e. what a user pays per call)
  SDPA         torch.nn.functional.scaled_dot_product_attention, is_causal=True, dense for every
               scenario (what one pays without head sparsity); the best of the flash and cuDNN
               backends, each timed separately
  flex         torch.compile(flex_attention) with a BlockMask of the scenario's per-head mask
               (gated heads: empty block lists); compile time reported apart
Timing: one warm-up call each, then `--repeats` rounds, interleaved; each call timed with a pair
of torch.cuda.Events; the median is reported. Correctness: headops against SDPA on the dense heads
and against flex on every head (max |diff|), printed with the table.

Usage: python3 bench/attention_cuda.py [--seq 8192] [--heads 32] [--repeats 20] [--no-flex]
                                        [--json out.json]
       python3 bench/attention_cuda.py --device cpu --seq 256 --heads 4 --dim 64 --window 64 --repeats 3
           (a dry run of the script itself on the CPU kernel; its numbers mean nothing)
Prints a markdown table last. First run on an H200 (bench/gpu_suite.sh, 2026-12-04; numbers in docs/cuda.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script on the CPU kernel (tiny sizes)")
    return ap.parse_args()


def scenarios(H, window, sinks):
    half = lambda a, b: [a, b] * (H // 2)  # noqa: E731
    return [
        dict(key="dense", label="dense causal", gate=None, window=None, sinks=None),
        dict(key="gated", label="50 % heads gated off", gate=half(1.0, 0.0), window=None, sinks=None),
        dict(key="stream", label=f"50 % streaming (window {window}, sinks {sinks})", gate=None,
             window=half(window, -1), sinks=half(sinks, 0)),
    ]


def headops_kwargs(sc, device):
    kw = {}
    if sc["gate"] is not None:
        kw["gate"] = torch.tensor(sc["gate"], dtype=torch.float32, device=device)
    if sc["window"] is not None:
        kw["window"] = torch.tensor(sc["window"], dtype=torch.int64, device=device)
        kw["sinks"] = torch.tensor(sc["sinks"], dtype=torch.int64, device=device)
    return kw


def flex_block_mask(sc, B, H, S, device):
    from torch.nn.attention.flex_attention import create_block_mask

    window = torch.tensor(sc["window"] or [-1] * H, dtype=torch.int64, device=device)
    sinks = torch.tensor(sc["sinks"] or [0] * H, dtype=torch.int64, device=device)
    active = torch.tensor([g != 0.0 for g in (sc["gate"] or [1.0] * H)], dtype=torch.bool, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        w = window[h]
        in_window = (w < 0) | (q_idx - kv_idx < w) | (kv_idx < sinks[h])
        return (kv_idx <= q_idx) & in_window & active[h]

    import warnings

    try:  # compiled mask creation: no H x S x S temporaries
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return create_block_mask(mask_mod, B, H, S, S, device=device, _compile=True)
    except TypeError:
        return create_block_mask(mask_mod, B, H, S, S, device=device)


def cuda_time(fn):
    """Milliseconds of one call, between two CUDA events (wall clock on the CPU dry run)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name(dev):
    return torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"


def main():
    args = parse_args()
    import headops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    dev = torch.device(args.device)
    assert dev.type == "cpu" or torch.cuda.is_available(), "needs a CUDA GPU (or --device cpu for a dry run)"
    B, H, S, D = args.batch, args.heads, args.seq, args.dim
    dtype = torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
    print(f"device: {device_name(dev)}, torch {torch.__version__}, B={B} H={H} S={S} D={D} bf16 causal")
    if dev.type == "cuda":
        print("headops kernel:", headops._C.cuda_kernel_for(q, k, v, True))

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    candidates = {}  # name -> (callable, scenario key or None for all)
    sdpa_out = None
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            out = sdpa(backend)()
            synchronize()
            candidates[name] = sdpa(backend)
            sdpa_out = out if sdpa_out is None else sdpa_out
        except Exception as e:  # noqa: BLE001
            print(f"{name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")

    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"flex: unavailable ({type(e).__name__}: {e})")

    rows = []
    checks = []
    for sc in scenarios(H, args.window, args.sinks):
        kw = headops_kwargs(sc, dev)
        fns = {"headops": lambda kw=kw: headops.attention(q, k, v, layout="bhsd", **kw)}
        fns.update(candidates)
        ho = fns["headops"]()
        synchronize()
        # correctness: dense heads (ungated, no window) against SDPA
        dense_heads = [h for h in range(H) if (sc["gate"] is None or sc["gate"][h] == 1.0)
                       and (sc["window"] is None or sc["window"][h] < 0)]
        if sdpa_out is not None and dense_heads:
            diff = (ho[:, dense_heads].float() - sdpa_out[:, dense_heads].float()).abs().max().item()
            checks.append(f"{sc['key']}: headops vs SDPA on {len(dense_heads)} dense heads: max |diff| {diff:.3g}")
        compile_s = None
        if flex is not None:
            try:
                bm = flex_block_mask(sc, B, H, S, dev)
                t0 = time.perf_counter()
                fo = flex(q, k, v, block_mask=bm)
                synchronize()
                compile_s = time.perf_counter() - t0
                if sc["gate"] is not None:  # flex gives 0 for a head with no visible key; so does gate 0
                    fo = fo * torch.tensor(sc["gate"], device=dev, dtype=fo.dtype).view(1, H, 1, 1)
                diff = (ho.float() - fo.float()).abs().max().item()
                checks.append(f"{sc['key']}: headops vs flex on all heads: max |diff| {diff:.3g}")
                fns["flex"] = lambda bm=bm: flex(q, k, v, block_mask=bm)
            except Exception as e:  # noqa: BLE001
                print(f"flex ({sc['key']}): failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        for fn in fns.values():  # warm-up
            fn()
        synchronize()
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(cuda_time(fns[name]))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        sdpa_names = [n for n in med if n.startswith("SDPA")]
        best_sdpa = min(sdpa_names, key=lambda n: med[n]) if sdpa_names else None
        flops = 4 * B * H * S * S / 2 * D  # dense causal: QK^T and PV over half the matrix
        rows.append(dict(scenario=sc["label"], headops_ms=med["headops"],
                         headops_tflops=flops / med["headops"] / 1e9 if sc["key"] == "dense" else None,
                         sdpa_ms=med[best_sdpa] if best_sdpa else None, sdpa_backend=best_sdpa,
                         sdpa_all={n: med[n] for n in sdpa_names},
                         flex_ms=med.get("flex"), flex_compile_s=compile_s,
                         samples={n: ts for n, ts in times.items()}))
        print(f"{sc['key']}: " + ", ".join(f"{n} {m:.3f} ms" for n, m in med.items()), flush=True)

    for line in checks:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(dev), torch=torch.__version__, B=B, H=H, S=S, D=D,
                           rows=rows), f, indent=1)

    fmt = lambda x, spec=".3f": "–" if x is None else format(x, spec)  # noqa: E731
    print()
    print(f"| scenario (B={B} H={H} S={S} D={D} bf16 causal) | headops ms | SDPA ms (dense, best backend) | "
          f"headops/SDPA | flex ms (compile s) | headops/flex |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["headops_ms"] / r["sdpa_ms"] if r["sdpa_ms"] else None
        fr = r["headops_ms"] / r["flex_ms"] if r["flex_ms"] else None
        tf = f" ({r['headops_tflops']:.0f} TFLOP/s)" if r["headops_tflops"] else ""
        backend = f" ({r['sdpa_backend'].split()[-1]})" if r["sdpa_backend"] else ""
        flex_cell = "–" if r["flex_ms"] is None else f"{r['flex_ms']:.3f} ({r['flex_compile_s']:.1f})"
        print(f"| {r['scenario']} | {r['headops_ms']:.3f}{tf} | {fmt(r['sdpa_ms'])}{backend} | "
              f"{fmt(ratio, '.2f')}× | {flex_cell} | {fmt(fr, '.2f')}× |")


if __name__ == "__main__":
    main()
