#!/usr/bin/env python
"""Head-sparse KV cache benchmark: memory held and decode-step time against a dense cache.

    cd /work/main && .venv/bin/python bench/kvcache.py [--quick] [options]

Shape: Llama-3-8B-like attention, one layer: 32 query heads, 8 KV heads, D = 128, batch 1,
one new token per step. Head mixes: all KV heads full; 50 % and 25 % full, the others
streaming (sinks 4 + window 1024). Contexts 8k, 32k, 128k (--quick: 2k, 8k); fp32 and bf16.

For each (dtype, context) the cache is filled by appending random K/V in chunks of 4096
tokens (`cache.append`: no prompt of the whole context ever exists), then timed:

  headops     one decode step through the public API: cache.attention(0, q, k_new, v_new)
              (appends the token, then one decode_attention call over every head's storage);
  SDPA dense  F.scaled_dot_product_attention(q, K, V, enable_gqa=True) over a dense
              [1, 8, context, 128] cache holding the same keys (what a dense cache costs).

A timed sample is 4 consecutive steps (time / 4 reported), as a model runs its layers back to
back: the first call after an idle pause pays for waking the worker threads (about 1.5 ms on
this VM), which a real decode loop does not. Median of --repeats interleaved samples
(bench/timing.py). "read GB/s" = the bytes the cache keeps (K and V of the kept tokens) / step
time, against two passes over 256 MiB timed in the same rounds as the row's steps -- a torch
copy (bytes read + written / time) and a read-only pass (x.sum()) -- and SDPA's rate on the
dense cache. Each row is checked: the full heads' outputs equal SDPA's on the dense cache, the
streaming heads' equal SDPA over their sinks + last window keys.

Memory (fresh subprocess per context, fp32, 25 % full heads): peak resident-set growth while
the cache is filled chunk by chunk, against cache.nbytes() (what it holds), ideal_nbytes()
(exactly the kept tokens) and dense_nbytes().

Methods (DESIGN section 6; --methods only runs these): a decode step at 32k context with 75 % of
the KV heads streaming and compensated (RazorAttention) against the same heads uncompensated
(sinks 4 + window 1024, fp32 and bf16); AdaKV allocation + selection at prefill (scores from the
last 32 queries, max-pool 7, budget 1024 for every KV head; `cache.fill` of an 8192-token prompt)
against that prompt's attention (`headops.attention`, causal, same shape); and, for every method
at 8192 tokens (fp32), the bytes the cache holds against the ideal (exactly the kept tokens).

Each row's line is printed as soon as it is measured. Writes bench/results/local/kvcache_<preset>.md
(or kvcache_methods.md) and .json (untracked); --record writes the committed bench/results/ instead
(make bench-record), --out-dir anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import headops  # noqa: E402
from bench.timing import (add_output_args, interleaved, load_average, machine_info, markdown_table,  # noqa: E402
                          now_iso, output_dir, shown_path, text_table)

HQ, HKV, D = 32, 8, 128
WINDOW, SINKS = 1024, 4
CHUNK = 4096
STEPS = 4  # decode steps per timed sample
MIXES = {"all full": 8, "50% full": 4, "25% full": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PRESETS = {"quick": [2048, 8192], "default": [8192, 32768, 131072]}
TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-3}


def make_cache(n_full: int, dtype, split_keys: int = 1024):
    group = HQ // HKV
    kinds = ["full"] * n_full + ["streaming"] * (HKV - n_full)
    window = [-1] * (n_full * group) + [WINDOW] * ((HKV - n_full) * group)
    sinks = [0] * (n_full * group) + [SINKS] * ((HKV - n_full) * group)
    return headops.HeadSparseCache(num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, kinds=kinds,
                                   window=window, sinks=sinks, batch_size=1, dtype=dtype, max_step=1,
                                   split_keys=split_keys)  # sized now: the memory test measures the appends


def gb_per_s(nbytes: float, ms: float) -> float:
    return nbytes / (ms / 1e3) / 1e9


class MemoryPasses:
    """Two passes over 256 MiB timed in the same rounds as each row's steps (a VM's memory
    bandwidth moves with its neighbours: by 30 % within one run on the 2-core EPYCs): a copy (its
    bytes read + written / time) and a read-only pass (x.sum(): one plain stream of reads, as a
    decode step's are)."""

    def __init__(self):
        self.src = torch.randn(64 << 20)
        self.dst = torch.empty_like(self.src)

    def candidates(self) -> dict:
        return {"copy": lambda: self.dst.copy_(self.src), "read pass": lambda: self.src.sum()}

    def rates(self, stats) -> tuple:
        """(copy GB/s, read-pass GB/s) from the medians of candidates()' timings."""
        nbytes = self.src.numel() * self.src.element_size()
        return gb_per_s(2 * nbytes, stats["copy"].median_ms), gb_per_s(nbytes, stats["read pass"].median_ms)


def run_context(dtype_name: str, ctx: int, repeats: int, passes: MemoryPasses) -> list:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(ctx)
    # the dense cache of the baseline; the last position is the new token of the timed step
    k = torch.randn(1, HKV, ctx, D, generator=gen).to(dtype)
    v = torch.randn(1, HKV, ctx, D, generator=gen).to(dtype)
    q = torch.randn(1, HQ, 1, D, generator=gen).to(dtype)
    rows = []
    for mix, n_full in MIXES.items():
        cache = make_cache(n_full, dtype)
        for start in range(0, ctx - 1, CHUNK):
            stop = min(ctx - 1, start + CHUNK)
            cache.append(0, k[:, :, start:stop].transpose(1, 2), v[:, :, start:stop].transpose(1, 2))
        q_new, k_new, v_new = q.transpose(1, 2), k[:, :, -1:].transpose(1, 2), v[:, :, -1:].transpose(1, 2)
        out = cache.attention(0, q_new, k_new, v_new)  # the first step, kept for the check
        check = check_step(out, q, k, v, n_full, dtype_name)
        kept = cache.ideal_nbytes()

        def step():
            # STEPS consecutive decode steps, as the layers of a model run back to back (the
            # context grows by one token per step)
            for _ in range(STEPS):
                out = cache.attention(0, q_new, k_new, v_new)
            return out

        def sdpa():
            for _ in range(STEPS):
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return out

        stats = interleaved({"headops": step, "sdpa": sdpa, **passes.candidates()}, repeats)
        hd, sd = stats["headops"].median_ms / STEPS, stats["sdpa"].median_ms / STEPS
        copy_gb_s, read_pass_gb_s = passes.rates(stats)
        dense_bytes = 2 * k.numel() * k.element_size()
        read_gb_s = gb_per_s(kept, hd)
        rows.append({
            "dtype": dtype_name, "context": ctx, "mix": mix, "full_kv_heads": n_full,
            "headops": stats["headops"].as_dict(), "sdpa": stats["sdpa"].as_dict(), "steps_per_sample": STEPS,
            "headops_ms_per_step": hd, "sdpa_ms_per_step": sd,
            "ratio": hd / sd, "kept_bytes": kept, "nbytes": cache.nbytes(), "dense_nbytes": cache.dense_nbytes(),
            "read_gb_s": read_gb_s, "sdpa_read_gb_s": gb_per_s(dense_bytes, sd),
            "copy_gb_s": copy_gb_s, "read_pass_gb_s": read_pass_gb_s, "read_vs_copy": read_gb_s / copy_gb_s,
            "read_vs_read_pass": read_gb_s / read_pass_gb_s, "check": check, "load_average": load_average(),
        })
        print(f"  {SHORT[dtype_name]} ctx {ctx:>6} {mix:<9}: headops {hd:7.2f} ms, SDPA dense {sd:7.2f} ms "
              f"({hd / sd:.2f}x), {read_gb_s:.1f} GB/s (copy {copy_gb_s:.1f}, read pass "
              f"{read_pass_gb_s:.1f}), check {'ok' if check['ok'] else 'FAILED'}",
              flush=True)
        del cache
    return rows


def check_step(out, q, k, v, n_full, dtype_name) -> dict:
    """Full heads vs SDPA on the dense cache, streaming heads vs SDPA on their kept keys."""
    group = HQ // HKV
    ctx = k.shape[2]
    want_full = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    kept = torch.cat([torch.arange(min(SINKS, ctx)), torch.arange(max(SINKS, ctx - WINDOW), ctx)])
    want_stream = F.scaled_dot_product_attention(q, k[:, :, kept], v[:, :, kept], enable_gqa=True)
    got = out.transpose(1, 2).float()
    split = n_full * group
    diff_full = (got[:, :split] - want_full[:, :split].float()).abs().max().item() if split else 0.0
    diff_stream = (got[:, split:] - want_stream[:, split:].float()).abs().max().item() if split < HQ else 0.0
    worst = max(diff_full, diff_stream)
    ok = worst <= TOL[dtype_name] and bool(torch.isfinite(got).all())
    return {"ok": ok, "max_abs_diff": worst}


MEMORY_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from bench.kvcache import make_cache, CHUNK, HKV, D

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

ctx = {ctx}
cache = make_cache(2, torch.float32)
chunk_k, chunk_v = torch.randn(1, CHUNK, HKV, D), torch.randn(1, CHUNK, HKV, D)
warm = make_cache(2, torch.float32)  # the first append starts the worker threads: not the cache's memory
warm.append(0, chunk_k[:, :8], chunk_v[:, :8])
del warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
for start in range(0, ctx, CHUNK):
    n = min(CHUNK, ctx - start)
    cache.append(0, chunk_k[:, :n], chunk_v[:, :n])
peak = status("VmHWM:")
print(json.dumps(dict(context=ctx, rss_growth=peak - base, nbytes=cache.nbytes(), ideal=cache.ideal_nbytes(),
                      dense=cache.dense_nbytes())))
"""


def measure_memory(ctx: int) -> dict:
    code = MEMORY_SCRIPT.format(root=ROOT, ctx=ctx)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    data["nbytes_over_ideal"] = data["nbytes"] / data["ideal"]
    data["rss_over_nbytes"] = data["rss_growth"] / data["nbytes"]
    return data


# ------------------------------------------------------------------ the compression methods

METHOD_CONTEXT = 32768  # the compensation row
ADAKV_PROMPT, ADAKV_BUDGET, OBSERVATION, POOL = 8192, 1024, 32, 7
BYTES_CONTEXT = 8192


def method_cache(method: str, dtype, *, batch_size=1):
    """One layer of the benchmark's shape (32 query / 8 KV heads, D = 128) for a method."""
    group = HQ // HKV
    common = dict(num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, batch_size=batch_size, dtype=dtype)
    if method in ("streaming 75%", "razor 75%", "razor 75% unweighted", "duo 50%", "streaming_llm"):
        n_full = {"duo 50%": 4, "streaming_llm": 0}.get(method, 2)
        comp = {"razor 75%": "weighted", "razor 75% unweighted": "unweighted"}.get(method)
        kinds = ["full"] * n_full + ["streaming"] * (HKV - n_full)
        return headops.HeadSparseCache(**common, kinds=kinds, max_step=1,
                                       window=[-1] * (n_full * group) + [WINDOW] * ((HKV - n_full) * group),
                                       sinks=[0] * (n_full * group) + [SINKS] * ((HKV - n_full) * group),
                                       compensation=[None] * n_full + [comp] * (HKV - n_full))
    if method == "dense":
        return headops.HeadSparseCache(**common, kinds="full", max_step=1)
    budgets = {"snapkv": [ADAKV_BUDGET] * HKV, "adakv": [ADAKV_BUDGET] * HKV,
               "headkv": [int(x) for x in torch.linspace(ADAKV_BUDGET * 0.5, ADAKV_BUDGET * 1.5, HKV)]}[method]
    allocation = {"snapkv": "uniform", "adakv": "adakv", "headkv": "headkv"}[method]
    return headops.HeadSparseCache(**common, kinds="budget", budget=budgets, budget_recent=OBSERVATION,
                                   allocation=allocation, observation_window=OBSERVATION, pool_kernel=POOL,
                                   max_step=1)


def run_compensation(dtype_name: str, repeats: int) -> dict:
    """Decode step, 75 % of the KV heads streaming: compensated vs not (same tokens)."""
    dtype = DTYPES[dtype_name]
    ctx = METHOD_CONTEXT
    gen = torch.Generator().manual_seed(ctx)
    k = torch.randn(1, ctx, HKV, D, generator=gen).to(dtype)
    v = torch.randn(1, ctx, HKV, D, generator=gen).to(dtype)
    q = torch.randn(1, 1, HQ, D, generator=gen).to(dtype)
    caches = {}
    for method in ("streaming 75%", "razor 75%"):
        cache = method_cache(method, dtype)
        for start in range(0, ctx - 1, CHUNK):
            stop = min(ctx - 1, start + CHUNK)
            cache.append(0, k[:, start:stop], v[:, start:stop])
        caches[method] = cache

    def steps(cache):
        def run():
            for _ in range(STEPS):
                out = cache.attention(0, q, k[:, -1:], v[:, -1:])
            return out
        return run

    stats = interleaved({name: steps(c) for name, c in caches.items()}, repeats)
    plain, comp = (stats[n].median_ms / STEPS for n in ("streaming 75%", "razor 75%"))
    row = {"dtype": dtype_name, "context": ctx, "plain_ms": plain, "compensated_ms": comp, "ratio": comp / plain,
           "plain": stats["streaming 75%"].as_dict(), "compensated": stats["razor 75%"].as_dict(),
           "load_average": load_average()}
    print(f"  {SHORT[dtype_name]} ctx {ctx}: streaming 75% {plain:.3f} ms, compensated {comp:.3f} ms "
          f"({comp / plain:.3f}x)", flush=True)
    return row


def run_adakv_prefill(dtype_name: str, repeats: int) -> dict:
    """AdaKV allocation + selection at prefill (cache.fill: store, score, allocate, keep) vs the
    prompt's attention (headops.attention, causal)."""
    dtype = DTYPES[dtype_name]
    S = ADAKV_PROMPT
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(1, S, HQ, D, generator=gen).to(dtype)
    k = torch.randn(1, S, HKV, D, generator=gen).to(dtype)
    v = torch.randn(1, S, HKV, D, generator=gen).to(dtype)
    last = q[:, -OBSERVATION:]

    def fill():
        cache = method_cache("adakv", dtype)
        cache.fill(0, k, v, queries=last)
        return cache

    cache = fill()
    sizes = cache._layers[0].budget_sizes(0)
    stats = interleaved({"attention": lambda: headops.attention(q, k, v), "adakv": fill}, repeats)
    attn, sel = stats["attention"].median_ms, stats["adakv"].median_ms
    row = {"dtype": dtype_name, "prompt": S, "budget": ADAKV_BUDGET, "attention_ms": attn, "adakv_ms": sel,
           "fraction": sel / attn, "sizes": sizes, "attention": stats["attention"].as_dict(),
           "adakv": stats["adakv"].as_dict(), "load_average": load_average()}
    print(f"  {SHORT[dtype_name]} prompt {S}: attention {attn:.1f} ms, AdaKV allocation + selection {sel:.1f} ms "
          f"({100 * sel / attn:.1f} %), sizes {sizes}", flush=True)
    return row


BYTE_METHODS = ["dense", "streaming_llm", "duo 50%", "razor 75%", "snapkv", "adakv", "headkv"]


def run_bytes() -> list:
    """Bytes held vs ideal for every method after an 8192-token prompt and 16 decode steps (fp32)."""
    ctx = BYTES_CONTEXT
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, ctx + 16, HQ, D, generator=gen)
    k = torch.randn(1, ctx + 16, HKV, D, generator=gen)
    v = torch.randn(1, ctx + 16, HKV, D, generator=gen)
    rows = []
    for method in BYTE_METHODS:
        cache = method_cache(method, torch.float32)
        cache.fill(0, k[:, :ctx], v[:, :ctx], queries=q[:, ctx - OBSERVATION:ctx])
        for p in range(ctx, ctx + 16):
            cache.attention(0, q[:, p:p + 1], k[:, p:p + 1], v[:, p:p + 1])
        held, ideal, dense = cache.nbytes(), cache.ideal_nbytes(), cache.dense_nbytes()
        rows.append({"method": method, "nbytes": held, "ideal": ideal, "dense": dense, "over_ideal": held / ideal})
        print(f"  {method:<14} held {held / 2**20:7.2f} MiB, ideal {ideal / 2**20:7.2f} MiB ({held / ideal:.4f}x), "
              f"dense {dense / 2**20:.1f} MiB", flush=True)
    return rows


def method_tables(comp, adakv, nbytes) -> list:
    lines = [f"Compensated streaming heads (RazorAttention): decode step, {HQ} query / {HKV} KV heads, D={D}, "
             f"context {METHOD_CONTEXT}, 2 full + 6 streaming KV heads (sinks {SINKS} + window {WINDOW}), "
             "compensated vs not (target <= 1.05x):", "",
             markdown_table(["dtype", "streaming ms", "compensated ms", "ratio"],
                            [[SHORT[r["dtype"]], f"{r['plain_ms']:.3f}", f"{r['compensated_ms']:.3f}",
                              f"{r['ratio']:.3f}x"] for r in comp]), "",
             f"AdaKV allocation + selection at prefill (`cache.fill`: store, SnapKV scores of the last {OBSERVATION} "
             f"queries with max-pool {POOL}, allocation, selection; budget {ADAKV_BUDGET} x {HKV} KV heads) vs the "
             f"prompt's attention (`headops.attention`, causal), {ADAKV_PROMPT} tokens (target <= 10 %):", "",
             markdown_table(["dtype", "attention ms", "AdaKV ms", "fraction", "sizes per KV head"],
                            [[SHORT[r["dtype"]], f"{r['attention_ms']:.1f}", f"{r['adakv_ms']:.1f}",
                              f"{100 * r['fraction']:.1f} %", " ".join(map(str, r["sizes"]))] for r in adakv]), "",
             f"Bytes held vs ideal per method, {BYTES_CONTEXT}-token prompt (`cache.fill`) + 16 decode steps, fp32 "
             "(target: within 2 %):", "",
             markdown_table(["method", "nbytes MiB", "ideal MiB", "nbytes/ideal", "dense MiB"],
                            [[r["method"], f"{r['nbytes'] / 2**20:.2f}", f"{r['ideal'] / 2**20:.2f}",
                              f"{r['over_ideal']:.4f}", f"{r['dense'] / 2**20:.1f}"] for r in nbytes]), ""]
    return lines


HEADER = ["dtype", "context", "heads", "headops ms", "SDPA dense ms", "headops/SDPA", "read GB/s", "of copy BW",
          "of read pass", "SDPA GB/s", "nbytes MiB", "dense MiB", "check"]


def table_rows(rows):
    return [[SHORT[r["dtype"]], r["context"], r["mix"], f"{r['headops_ms_per_step']:.2f}",
             f"{r['sdpa_ms_per_step']:.2f}", f"{r['ratio']:.2f}x", f"{r['read_gb_s']:.1f}",
             f"{100 * r['read_vs_copy']:.0f}%", f"{100 * r['read_vs_read_pass']:.0f}%", f"{r['sdpa_read_gb_s']:.1f}",
             f"{r['nbytes'] / 2**20:.0f}",
             f"{r['dense_nbytes'] / 2**20:.0f}", ("ok " if r["check"]["ok"] else "FAILED ") +
             f"{r['check']['max_abs_diff']:.1e}"] for r in rows]


MEM_HEADER = ["context", "nbytes MiB", "ideal MiB", "nbytes/ideal", "peak RSS growth MiB", "RSS/nbytes", "dense MiB"]


def memory_rows(memory):
    return [[m["context"], f"{m['nbytes'] / 2**20:.1f}", f"{m['ideal'] / 2**20:.1f}", f"{m['nbytes_over_ideal']:.4f}",
             f"{m['rss_growth'] / 2**20:.1f}", f"{m['rss_over_nbytes']:.3f}", f"{m['dense'] / 2**20:.1f}"]
            for m in memory]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="contexts 2k and 8k (CI smoke test)")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"],
                   help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=7)
    add_output_args(p)
    p.add_argument("--methods", action="store_true", help="only the compression methods' rows (kvcache_methods.md)")
    args = p.parse_args(argv)
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: {', '.join(unknown)} not among {', '.join(DTYPES)}")
    if args.methods:
        return main_methods(args, argv)
    preset = "quick" if args.quick else "default"
    contexts = args.contexts or PRESETS[preset]
    if args.contexts:
        preset += "-custom"
    meta = {"benchmark": "bench/kvcache.py", "preset": preset, "date": now_iso(),
            "command": shlex.join(["bench/kvcache.py"] + (sys.argv[1:] if argv is None else argv)),
            "machine": machine_info(), "repeats": args.repeats,
            "shape": dict(heads_q=HQ, heads_kv=HKV, head_dim=D, window=WINDOW, sinks=SINKS, batch=1)}
    print(f"headops head-sparse KV cache benchmark, preset {preset}, contexts {contexts}, "
          f"{torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    passes = MemoryPasses()
    rows = []
    for dtype_name in args.dtypes:
        for ctx in contexts:
            rows += run_context(dtype_name, ctx, args.repeats, passes)
    del passes
    bandwidth = statistics.median(r["copy_gb_s"] for r in rows)
    read_pass = statistics.median(r["read_pass_gb_s"] for r in rows)
    meta["copy_bandwidth_gb_s"], meta["read_pass_gb_s"] = bandwidth, read_pass
    memory = [measure_memory(ctx) for ctx in contexts]
    meta["elapsed_s"] = time.perf_counter() - started

    out_dir = output_dir(args)
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"kvcache_{preset}")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta, rows=rows, memory=memory), f, indent=2, default=str)
        f.write("\n")
    m = meta["machine"]
    lines = [f"# headops head-sparse KV cache: preset `{preset}`", "", f"- date: {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, torch {m['torch']}, "
             f"{m['torch_threads']} threads; memory copy bandwidth {bandwidth:.1f} GB/s (read + write), read-only "
             f"pass {read_pass:.1f} GB/s (medians over the rows)",
             f"- one layer, B=1, {HQ} query heads, {HKV} KV heads, D={D}; streaming heads sinks {SINKS} + window "
             f"{WINDOW}; one new token per step; median of {args.repeats} interleaved samples of {STEPS} consecutive "
             f"steps (time per step shown)",
             f"- wall time: {meta['elapsed_s']:.0f} s", "", markdown_table(HEADER, table_rows(rows)), "",
             "Memory while filling the cache in 4096-token chunks (fp32, 25 % full heads; fresh process each):", "",
             markdown_table(MEM_HEADER, memory_rows(memory)), "",
             "read GB/s: bytes of the kept K/V / step time; of copy BW, of read pass: that rate over the copy "
             "bandwidth (bytes read + written) and the read-only pass timed in the same rounds as the row. "
             "check: full heads vs SDPA on the dense cache, streaming heads vs SDPA on their kept keys.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print()
    print(text_table(HEADER, table_rows(rows)))
    print()
    print(text_table(MEM_HEADER, memory_rows(memory)))
    print(f"\nwall time {meta['elapsed_s']:.0f} s; wrote {shown_path(base)}.md and .json")
    return 0 if all(r["check"]["ok"] for r in rows) else 1


def main_methods(args, argv) -> int:
    """The compression methods' rows alone: bench/results/kvcache_methods.md and .json."""
    meta = {"benchmark": "bench/kvcache.py --methods", "date": now_iso(),
            "command": shlex.join(["bench/kvcache.py"] + (sys.argv[1:] if argv is None else argv)),
            "machine": machine_info(), "repeats": args.repeats}
    print(f"headops KV cache methods benchmark, {torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    comp = [run_compensation(d, args.repeats) for d in args.dtypes]
    adakv = [run_adakv_prefill(d, args.repeats) for d in args.dtypes]
    nbytes = run_bytes()
    meta["elapsed_s"] = time.perf_counter() - started
    out_dir = output_dir(args)
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, "kvcache_methods")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta, compensation=comp, adakv=adakv, nbytes=nbytes), f, indent=2, default=str)
        f.write("\n")
    m = meta["machine"]
    lines = ["# headops head-sparse KV cache: the compression methods", "", f"- date: {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, torch {m['torch']}, {m['torch_threads']} "
             f"threads; median of {args.repeats} interleaved samples", f"- wall time: {meta['elapsed_s']:.0f} s", ""]
    lines += method_tables(comp, adakv, nbytes)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {base}.md and .json")
    ok = all(r["over_ideal"] <= 1.02 for r in nbytes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
