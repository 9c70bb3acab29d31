"""Where a GPU decode step of headops.HeadSparseCache spends its time: host or kernels.

On an H200 (2026-12-04) a step of the first decode kernel took ~1.15 ms whatever the cache held
(4 MB or 136 MB), against 0.065 ms for SDPA over a dense cache; with the key-split kernel that
replaced it, 0.19-0.22 ms at 32k, of which the kernels ~0.11-0.13 ms (docs/cuda.md). This splits one
step (the cache of bench/kvcache_cuda.py: B = 1, 32 query / 8 KV heads, D = 128, bf16):
  host   the Python call's own time, steps issued back to back without a sync (launch-bound
         when this is close to the event-timed step)
  events the step between two CUDA events (what kvcache_cuda.py reports)
  kernels each CUDA kernel's mean device time per step (torch.profiler), and their sum

    python3 bench/profile_decode_cuda.py [--contexts 32768] [--steps 50] [--split-keys auto,1024]
    python3 bench/profile_decode_cuda.py --device cpu      # a dry run of the script (tiny sizes)
    ncu --kernel-name regex:key_split --launch-skip 3 --launch-count 1 python3 bench/profile_decode_cuda.py \
        --for-profiler full --steps 5 --contexts 32768 --split-keys 1024   # one step's kernel under Nsight Compute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kvcache_cuda import Timer, make_cache, parse, split_label, step_inputs  # noqa: E402


def run_steps(cache, n, q, k1, v1, cuda):
    """n decode steps of the cache's layer 0, then (on a GPU) a synchronize."""
    for _ in range(n):
        cache.attention(0, q, k1, v1)
    if cuda:
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--for-profiler", metavar="KIND", default=None,
                    help="only run --steps steps of one cache (full, 'stream 50%%', 'stream 100%%') at the first "
                         "context and split size, for an outside profiler (ncu: the 4th step is --launch-skip 3)")
    own, rest = ap.parse_known_args(argv)
    args = parse(rest)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if own.for_profiler is not None:
        S = args.contexts[0]
        _, k, v, q, k1, v1 = step_inputs(S, args, device, torch.bfloat16)
        cache = make_cache(own.for_profiler, S, args, device, torch.bfloat16, None, args.split_keys[0])
        cache.append(0, k, v)
        run_steps(cache, own.steps, q, k1, v1, cuda)
        print(f"{own.steps} steps of a {own.for_profiler} cache, context {S}, split_keys "
              f"{split_label(cache, args.split_keys[0])}")
        return 0
    timer = Timer(device)
    dtype = torch.bfloat16
    from torch.profiler import ProfilerActivity, profile
    for S in args.contexts:
        g, k, v, q, k1, v1 = step_inputs(S, args, device, dtype)
        for kind, split in [(kind, split) for kind in ("full", "stream 100%") for split in args.split_keys]:
            cache = make_cache(kind, S, args, device, dtype, g, split)
            cache.append(0, k, v)
            run_steps(cache, 3, q, k1, v1, cuda)
            t0 = time.perf_counter()
            for _ in range(own.steps):
                cache.attention(0, q, k1, v1)
            host = (time.perf_counter() - t0) / own.steps
            if cuda:
                torch.cuda.synchronize()
            drained = (time.perf_counter() - t0) / own.steps
            events = statistics.median(timer(lambda: cache.attention(0, q, k1, v1)) for _ in range(own.steps))
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                run_steps(cache, own.steps, q, k1, v1, cuda)
            print(f"\n=== context {S}, {kind}, split_keys {split_label(cache, split)}: host {host * 1e3:.3f} ms/step "
                  f"issued, {drained * 1e3:.3f} ms/step with the queue drained, {events * 1e3:.3f} ms/step between "
                  "events")
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
            total = 0.0
            print(f"{'name':<70} {'calls/step':>10} {'us/step':>9}")
            if cuda:
                rows = [e for e in rows if e.device_type == torch.autograd.DeviceType.CUDA]
            for e in rows[:25]:
                t = getattr(e, key, 0) / own.steps
                total += t
                print(f"{e.key[:70]:<70} {e.count / own.steps:10.1f} {t:9.1f}")
            if cuda:
                print(f"{'sum of kernel time':<70} {'':>10} {total:9.1f}")
            del cache
        del k, v
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
