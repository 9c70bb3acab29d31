"""GPU decode benchmark of headops.HeadSparseCache against SDPA over a dense KV cache.

One layer, B = 1, 32 query heads / 8 KV heads (GQA 4), D = 128, bfloat16; contexts 32k and 128k.
Scenarios (the headops cache; SDPA always reads the dense cache):
  full          every KV head keeps every token (the same work as SDPA, head-sparse storage)
  full, grown   the same tokens appended 64 at a time, as a generation grows the cache: the full
                storage in 176 segments at 32k (262 at 128k) instead of one (each max(64, held / 64)
                tokens), which the decode finds by a binary search per key and whose table the
                host writes to the device twice a step
  stream 50%    every other KV head streaming: 4 sinks + a window of 1024 (only those kept)
  stream 100%   every KV head streaming (StreamingLLM)
Candidates:
  headops step  HeadSparseCache.attention for one new token: Python checks, kv_append and the
                split-K decode kernels (what a user pays per generated token and layer); the
                cache grows by one token per call
  ..., CUDA graph  the same step captured once and replayed (HeadSparseCache.reserve / sync_lengths;
                on a GPU only): the step without the host's work
  SDPA          scaled_dot_product_attention(q [1, 32, 1, 128], K/V [1, 8, S, 128], enable_gqa=True)
                over a preallocated dense cache (no append: a lower bound for a dense cache)
Bandwidth: the bytes a step must read (cache.nbytes(): the keys and values each head keeps) over
the step's time, beside the device's copy bandwidth measured in the same run (a 1 GiB
device-to-device copy: 2 bytes moved per byte copied), so "fraction of copy bandwidth" says how
close the decode kernel gets to reading what it keeps at memory speed.
Split sizes: `--split-keys auto,256,1024` times each headops row with each split size (keys per
CTA; auto: split_keys=None, which the cache chooses from its storages and the GPU's SMs; a cache of
its own per size, interleaved with the rest).
Timing: a warm-up, then `--repeats` calls each timed by a pair of CUDA events, interleaved; the
median is reported. Correctness: each "full" cache's first step against SDPA over the same tokens.

    python3 bench/kvcache_cuda.py [--contexts 32768,131072] [--repeats 30] [--split-keys auto,256,1024]
                                  [--json out.json]
    python3 bench/kvcache_cuda.py --device cpu      # a dry run on the CPU kernels (tiny sizes; numbers mean nothing)

Run on an H200 (bench/gpu_suite.sh, 2026-12-04; docs/cuda.md has the tables).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import headops


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--split-keys", type=lambda s: [None if x == "auto" else int(x) for x in s.split(",")],
                    default=[None], help="HeadSparseCache(split_keys=...): keys per CTA, 'auto' (None: chosen "
                    "from the cache and the GPU); a list times each, e.g. auto,256,1024")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dry = args.device == "cpu"
    args.contexts = args.contexts or ([1024, 4096] if dry else [32768, 131072])
    args.heads = args.heads or (8 if dry else 32)
    args.kv_heads = args.kv_heads or (2 if dry else 8)
    if dry:
        args.dim, args.window, args.repeats = min(args.dim, 64), min(args.window, 256), min(args.repeats, 3)
    return args


class Timer:
    """Times a callable: CUDA events on a GPU, perf_counter on the CPU (dry run)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def copy_bandwidth(device, timer, repeats) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(max(3, repeats // 3))]
    return 2 * n / statistics.median(times) / 1e9


def make_cache(kind, S, args, device, dtype, g, split_keys=None):
    """A one-layer cache of `kind` (split_keys None: the cache chooses; see split_label)."""
    Hq, Hkv, D = args.heads, args.kv_heads, args.dim
    group = Hq // Hkv
    if kind.startswith("full"):
        kinds = ["full"] * Hkv
    elif kind == "stream 50%":
        kinds = ["full" if h % 2 == 0 else "streaming" for h in range(Hkv)]
    else:
        kinds = ["streaming"] * Hkv
    window = [args.window if kinds[q // group] == "streaming" else -1 for q in range(Hq)]
    sinks = [args.sinks if kinds[q // group] == "streaming" else 0 for q in range(Hq)]
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, batch_size=1,
                                    dtype=dtype, device=device, kinds=kinds, window=window, sinks=sinks,
                                    max_step=1, split_keys=split_keys)
    return cache


def split_label(cache, split):
    """'auto (768)': what split_keys=None chose for the cache's next step; else the number."""
    if split is not None:
        return str(split)
    st = cache._layers[0]
    return f"auto ({headops.cache._split_keys(None, st, st.lengths.device)})"


def step_inputs(S, args, device, dtype):
    """(generator, the S cached keys and values, one step's q, k, v), drawn from a seed of S."""
    Hq, Hkv, D = args.heads, args.kv_heads, args.dim
    g = torch.Generator().manual_seed(S)
    k = torch.randn(1, S, Hkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(1, S, Hkv, D, generator=g).to(dtype).to(device)
    q = torch.randn(1, 1, Hq, D, generator=g).to(dtype).to(device)
    k1 = torch.randn(1, 1, Hkv, D, generator=g).to(dtype).to(device)
    v1 = torch.randn(1, 1, Hkv, D, generator=g).to(dtype).to(device)
    return g, k, v, q, k1, v1


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and headops._C.cuda_compiled):
        print("kvcache_cuda: needs a GPU and a CUDA build of headops (or --device cpu for a dry run)")
        return 2
    dtype = torch.bfloat16
    timer = Timer(device)
    Hq, Hkv, D = args.heads, args.kv_heads, args.dim
    gbps_copy = copy_bandwidth(device, timer, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}; copy bandwidth {gbps_copy:.0f} GB/s (read + write)")
    rows = []
    for S in args.contexts:
        g, k, v, q, k1, v1 = step_inputs(S, args, device, dtype)
        # SDPA over the dense cache holding the same S + 1 tokens as the cache's first step
        dense_k = torch.cat([k, k1], 1).transpose(1, 2).contiguous()
        dense_v = torch.cat([v, v1], 1).transpose(1, 2).contiguous()
        qt = q.transpose(1, 2)

        def sdpa():
            return F.scaled_dot_product_attention(qt, dense_k, dense_v, enable_gqa=True)

        kinds = ("full", "full, grown", "stream 50%", "stream 100%")
        runs = [(kind, split) for kind in kinds for split in args.split_keys]
        caches = {}
        for kind, split in runs:
            cache = make_cache(kind, S, args, device, dtype, g, split)
            if kind == "full, grown":
                for t in range(0, S, 64):
                    cache.append(0, k[:, t:t + 64], v[:, t:t + 64])
            else:
                cache.append(0, k, v)
            caches[(kind, split)] = cache
        # correctness: each full cache's first step against SDPA over the same S + 1 tokens
        errs = {}
        for kind, split in runs:
            out = caches[(kind, split)].attention(0, q, k1, v1)  # (also the warm-up)
            if kind.startswith("full"):
                errs[(kind, split)] = (out.transpose(1, 2).float() - sdpa().float()).abs().max().item()
        steps = {run: (lambda cache=caches[run]: cache.attention(0, q, k1, v1)) for run in runs}
        graphs = {}
        if device.type == "cuda":  # the same step replayed from one CUDA graph: no host work a step
            for kind in ("full", "stream 100%"):
                run = (kind + ", CUDA graph", args.split_keys[0])
                try:
                    cache = make_cache(kind, S, args, device, dtype, g, run[1])
                    cache.append(0, k, v)
                    cache.attention(0, q, k1, v1)  # eager warm-up
                    cache.reserve(cache.get_seq_length() + args.repeats + 8)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        cache.attention(0, q, k1, v1)
                    graph.replay()  # (warm)
                except Exception as e:  # (the other rows still run)
                    print(f"kvcache_cuda: {run[0]} at {S} failed: {type(e).__name__}: {e}")
                    continue
                caches[run], graphs[run], steps[run] = cache, graph, graph.replay
                runs.append(run)
        sdpa()
        times = {run: [] for run in runs}
        times["SDPA"] = []
        for _ in range(args.repeats):
            for run in runs:
                times[run].append(timer(steps[run]))
            times["SDPA"].append(timer(sdpa))
        for run in graphs:
            caches[run].sync_lengths()  # (raises had a replay gone past the reserve)
        dense_bytes = 2 * dense_k.numel() * dense_k.element_size()
        t_sdpa = statistics.median(times["SDPA"])
        rows.append(dict(context=S, candidate="SDPA (dense)", ms=t_sdpa * 1e3, kept_bytes=dense_bytes,
                         gbps=dense_bytes / t_sdpa / 1e9, vs_sdpa=1.0, max_abs_err=None))
        for kind, split in runs:
            t = statistics.median(times[(kind, split)])
            kept = caches[(kind, split)].nbytes()
            label = f"headops {kind} [split {split_label(caches[(kind, split)], split)}]"
            rows.append(dict(context=S, candidate=label, split_keys=split, ms=t * 1e3, kept_bytes=kept,
                             gbps=kept / t / 1e9, vs_sdpa=t_sdpa / t, max_abs_err=errs.get((kind, split))))
        del caches, dense_k, dense_v, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"decode step, B=1, Hq={Hq}, Hkv={Hkv}, D={D}, bfloat16, window {args.window} + {args.sinks} sinks "
          f"for streaming heads; median of {args.repeats}")
    print("| context | candidate | ms / step | kept MB | GB/s read | of copy bw | speed-up vs SDPA | max abs err |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        err = "" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
        print(f"| {r['context']} | {r['candidate']} | {r['ms']:.3f} | {r['kept_bytes'] / 1e6:.1f} | {r['gbps']:.1f} | "
              f"{r['gbps'] / gbps_copy:.0%} | {r['vs_sdpa']:.2f}x | {err} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, copy_gbps=gbps_copy, args=vars(args), rows=rows), f, indent=1)
    bad = [r for r in rows if r["max_abs_err"] is not None and not r["max_abs_err"] < 5e-2]
    if bad:
        print(f"kvcache_cuda: headops full cache differs from SDPA by {bad[0]['max_abs_err']:.3g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
