#!/usr/bin/env python
"""CPU forward+backward benchmark of ``headops.attention`` against named baselines.

    cd /work/main && .venv/bin/python bench/attention_cpu_train.py [--quick] [options]

Shape: B=1, H=16, D=128, layout "bhsd", causal; one call = forward, then backward of a fixed
random output gradient into q, k and v (``out.backward(grad)``). Scenarios:

  dense        every head full causal attention;
  stream 50%   half of the heads streaming (sinks 4 + window 256), the others full (DuoAttention);
  gated 50%    gate = [1, 0] * 8, the gate not requiring grad (a pruned model being fine-tuned);
  importance   the same gate, requiring grad (Michel et al.: dL/dgate of every head, the gated
               heads included -- so they are computed in the forward);
  duo alpha    every head mixes full and streaming attention (sinks 4 + window 256) with a learnt
               alpha (DuoAttention's gate optimisation);
  calibrate    a learnt softmax_scale and sink_logit per head (attention calibration).
  The last two learn per-head sums whose terms cancel: in bfloat16 they read P (and dL/do) as two
  bfloat16 parts (docs/attention.md).

Baselines, timed interleaved with headops in the same run (bench/timing.py; median of --repeats):

  SDPA dense   F.scaled_dot_product_attention(q, k, v, is_causal=True) forward+backward over all
               heads whatever the scenario: what training costs without headops;
  eager ref    autograd through headops.reference.attention (the test oracle, S x S), S <= 2048;
  eager-mask   autograd through transformers-style eager attention with a per-head boolean mask
               and the head outputs multiplied by the gate (S x S), S <= 2048.

Checks (a failure exits with status 1): every gradient finite; for heads that are full and
ungated, dq, dk, dv equal SDPA's; for the other heads, the gradients of a 64-row query slice
equal the eager reference's (bottom-right aligned slice: the keys a slice sees are all there).

Peak memory (--memory-s, default 16384; 0 skips): in a fresh subprocess, one dense causal
forward+backward of headops at B=1, H=4, D=128, fp32; reports the growth of the peak resident
set (VmHWM, reset through /proc/self/clear_refs once the inputs exist) over the inputs, and
compares it with one S x S fp32 matrix per head.

Time box (bench/timing.py, as in bench/attention_cpu.py): headops and SDPA always get every timed
call; a baseline whose warm-up call shows that its timed calls would take more than
--baseline-budget seconds (default 10) in a row gets as many as fit, and when not even one fits,
its warm-up call is its only sample ("1 run") and later rows of the same dtype and S skip it
(eager bf16 autograd without a bf16 matrix unit: tens of seconds a call at S = 2048 on a 2-core
AVX2 EPYC). --baseline-budget 0 times everything fully.

Each row's table line is printed as soon as the row is measured. Writes
bench/results/local/attention_cpu_train_<preset>.md and .json (untracked); --record writes the
committed bench/results/ instead (make bench-record), --out-dir anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import headops  # noqa: E402
from headops import reference  # noqa: E402
from bench.timing import (BASELINE_BUDGET_S, LiveTable, TimeBox, add_output_args,  # noqa: E402
                          forward_backward, interleaved, load_average, machine_info, markdown_table, now_iso, output_dir,
                          runs_label, shown_path, time_box_notes, time_call)

B, H, D = 1, 16, 128
SINKS, WINDOW = 4, 256
EAGER_MAX_S = 2048
CHECK_ROWS = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
PRESETS = {
    "quick": [("dense", "float32", 256), ("stream", "float32", 256), ("importance", "float32", 256),
              ("duo", "bfloat16", 256), ("calibrate", "bfloat16", 256)],
    "default": [("dense", "float32", 2048), ("stream", "float32", 2048), ("gated", "float32", 2048),
                ("importance", "float32", 2048), ("dense", "bfloat16", 2048), ("duo", "bfloat16", 2048),
                ("calibrate", "bfloat16", 2048), ("stream", "float32", 8192)],
}
LABELS = {"dense": "dense", "stream": "stream 50%", "gated": "gated 50%", "importance": "importance",
          "duo": "duo alpha", "calibrate": "calibrate"}
# scenarios whose per-head arguments eager-mask cannot express (alpha mixing, sink logit, scale)
NOT_MASKS = ("duo", "calibrate")
# the check tolerances: float32 gradients summed over up to S keys in a different order
GRAD_TOL = {"float32": (2e-4, 1e-3), "bfloat16": (5e-2, 5e-2)}


def head_args(scenario: str, S: int) -> dict:
    window = min(WINDOW, max(1, S // 4))
    if scenario == "stream":
        return dict(window=torch.tensor([window, -1] * (H // 2)), sinks=torch.tensor([SINKS, 0] * (H // 2)))
    if scenario in ("gated", "importance"):
        gate = torch.tensor([1.0, 0.0] * (H // 2))
        return dict(gate=gate.requires_grad_(scenario == "importance"))
    if scenario == "duo":
        return dict(alpha=torch.linspace(0.1, 0.9, H).requires_grad_(), window=window, sinks=SINKS)
    if scenario == "calibrate":
        return dict(softmax_scale=torch.full((H,), D ** -0.5).requires_grad_(),
                    sink_logit=torch.zeros(H).requires_grad_())
    return {}


def full_heads(scenario: str) -> list:
    if scenario == "dense":
        return list(range(H))
    if scenario in NOT_MASKS:
        return []
    return list(range(1, H, 2)) if scenario == "stream" else list(range(0, H, 2))


def eager_mask_attention(q, k, v, hidden, gate):
    """transformers-style eager attention with a head mask: every head computed, S x S stored."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)
    return out if gate is None else out * gate.to(out.dtype).view(1, -1, 1, 1)


# the baselines the time box may thin (never headops or SDPA), as the tables name them
BASELINES = {"eager_ref": "eager ref", "eager_mask": "eager-mask"}


def run_row(scenario: str, dtype_name: str, S: int, repeats: int, timebox: TimeBox | None = None) -> dict:
    dtype = DTYPES[dtype_name]
    timebox = timebox or TimeBox(None, repeats)
    gen = torch.Generator().manual_seed(S)
    q, k, v, grad_out = (torch.randn(B, H, S, D, generator=gen).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    args = head_args(scenario, S)
    def fwd_bwd(fn):
        return forward_backward(q, k, v, args, grad_out, fn)

    candidates = {
        "headops": fwd_bwd(lambda: headops.attention(q, k, v, layout="bhsd", **args)),
        "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }
    if S <= EAGER_MAX_S:
        candidates["eager_ref"] = fwd_bwd(lambda: reference.attention(q, k, v, layout="bhsd", **args))
    if S <= EAGER_MAX_S and scenario not in NOT_MASKS:
        hidden = ~reference.visibility(S, S, causal=True, window=args.get("window"), sinks=args.get("sinks"),
                                       B=1, Hq=H)
        candidates["eager_mask"] = fwd_bwd(lambda: eager_mask_attention(q, k, v, hidden, args.get("gate")))

    row = {"scenario": scenario, "label": LABELS[scenario], "dtype": dtype_name, "S": S}
    where = f"{LABELS[scenario]} {SHORT[dtype_name]} S={S}"
    warm, warmups, runs = {}, {}, {}
    for name in list(candidates):  # warm-up calls, kept for the checks
        key = (name, dtype_name, S)
        if name in BASELINES and timebox.skip_reason(key):
            row[name] = {"status": "skipped", "reason": timebox.skip_reason(key)}
            del candidates[name]
            continue
        warmups[name], warm[name] = time_call(candidates[name])
        if name in BASELINES:
            runs[name] = timebox.runs(key, warmups[name], where)
    row["check"] = check_row(scenario, dtype_name, S, q, k, v, grad_out, args, warm)
    del warm
    stats = interleaved(candidates, repeats, runs=runs, warmups=warmups)
    for name, st in stats.items():
        row[name] = dict(st.as_dict(), status="ok", repeats=repeats, warmup_ms=warmups[name] * 1e3)
        if timebox.entry(runs.get(name, repeats), dtype_name):
            row[name]["time_box"] = timebox.entry(runs[name], dtype_name)
    return row


def check_row(scenario, dtype_name, S, q, k, v, grad_out, args, warm) -> dict:
    problems = []
    mine = warm["headops"]
    learnt = ["d" + n for n, a in args.items() if isinstance(a, torch.Tensor) and a.requires_grad]
    for name, g in zip(["dq", "dk", "dv"] + learnt, mine):
        if not torch.isfinite(g).all():
            problems.append(f"{name} has NaN/inf")
    atol, rtol = GRAD_TOL[dtype_name]
    worst = 0.0
    heads = full_heads(scenario)
    for name, a, b in zip(["dq", "dk", "dv"], mine, warm["sdpa"]) if heads else ():
        diff = (a[:, heads].float() - b[:, heads].float()).abs()
        bound = atol + rtol * b[:, heads].float().abs()
        worst = max(worst, diff.max().item())
        if (diff > bound).any():
            problems.append(f"{name} of full heads differs from SDPA's by {diff.max().item():.2e}")
    others = [h for h in range(H) if h not in heads]
    if others:
        # a query slice at the end sees every key: its dq equals the reference's on that slice
        qs = q.detach()[:, :, -CHECK_ROWS:].clone().requires_grad_(True)
        ref_args = {n: (a.detach() if isinstance(a, torch.Tensor) else a) for n, a in args.items()}
        ref = reference.attention(qs.double(), k.detach().double(), v.detach().double(), layout="bhsd", **ref_args)
        (dq_ref,) = torch.autograd.grad(ref, qs, grad_out[:, :, -CHECK_ROWS:].double())
        got = mine[0][:, others, -CHECK_ROWS:].float()
        want = dq_ref[:, others].float()
        diff = (got - want).abs()
        worst = max(worst, diff.max().item())
        if (diff > atol + rtol * want.abs()).any():
            problems.append(f"dq of the last {CHECK_ROWS} rows of the other heads differs from the reference's by "
                            f"{diff.max().item():.2e}")
    return {"ok": not problems, "max_abs_diff": worst, "problems": problems}


def measure_memory(S: int, heads: int = 4) -> dict:
    """Peak RSS growth of one dense causal forward+backward, in a fresh process."""
    code = f"""
import json, torch, headops

def status(field):  # kB values of /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

torch.manual_seed(0)
q, k, v, g = (torch.randn(1, {heads}, {S}, {D}) for _ in range(4))
for t in (q, k, v): t.requires_grad_(True)
headops.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], layout="bhsd").backward(g[:, :, :256])  # first-call set-up
q.grad = k.grad = v.grad = None
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
base = status("VmRSS:")
out = headops.attention(q, k, v, layout="bhsd")
out.backward(g)
peak = status("VmHWM:")
print(json.dumps(dict(base_kib=base, peak_kib=peak, finite=bool(torch.isfinite(q.grad).all()))))
"""
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    data = json.loads(res.stdout.strip().splitlines()[-1])
    growth = (data["peak_kib"] - data["base_kib"]) * 1024
    tensor_bytes = heads * S * D * 4  # one [1, H, S, D] fp32 tensor
    return {"S": S, "heads": heads, "growth_bytes": growth, "growth_in_qkv_sized_tensors": growth / tensor_bytes,
            "bytes_per_head_per_token": growth / (heads * S), "s_by_s_bytes_per_head": S * S * 4,
            "finite": data["finite"], "seconds": time.perf_counter() - started}


HEADER = ["scenario", "dtype", "S", "headops ms", "SDPA dense ms", "headops/SDPA", "eager ref ms", "ref/headops",
          "eager-mask ms", "mask/headops", "check"]
MIN_WIDTHS = [11, 0, 5, 0, 0, 0, 18, 0, 18, 0, 10]  # the live table's columns


def _baseline_cell(entry: dict | None) -> str:
    if not entry or entry.get("median_ms") is None:
        reason = (entry or {}).get("reason", "")
        return "skipped (time box)" if reason.startswith("time box") else "skipped"
    label = runs_label(entry, entry.get("repeats", entry["n"]))
    return f"{entry['median_ms']:.1f}" + (f" ({label})" if label else "")


def table_rows(rows):
    out = []
    for r in rows:
        hd, sd = r["headops"]["median_ms"], r["sdpa"]["median_ms"]
        ref = r.get("eager_ref", {}).get("median_ms")
        mask = r.get("eager_mask", {}).get("median_ms")
        out.append([r["label"], SHORT[r["dtype"]], r["S"], f"{hd:.1f}", f"{sd:.1f}", f"{hd / sd:.2f}x",
                    _baseline_cell(r.get("eager_ref")), f"{ref / hd:.1f}x" if ref else "-",
                    _baseline_cell(r.get("eager_mask")), f"{mask / hd:.1f}x" if mask else "-",
                    ("ok " if r["check"]["ok"] else "FAILED ") + f"{r['check']['max_abs_diff']:.1e}"])
    return out


def write_results(path_base, meta, rows, memory):
    with open(path_base + ".json", "w") as f:
        json.dump(dict(meta, rows=rows, memory=memory), f, indent=2, default=str)
        f.write("\n")
    m = meta["machine"]
    lines = [f"# headops attention, CPU forward+backward: preset `{meta['preset']}`", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, torch {m['torch']}, "
             f"{m['torch_threads']} threads",
             f"- shape: B={B}, H={H}, D={D}, layout bhsd, causal; forward + backward into q, k, v "
             f"(and the gate for 'importance'); median of {meta['repeats']} interleaved calls",
             f"- wall time: {meta['elapsed_s']:.0f} s", "", markdown_table(HEADER, table_rows(rows)), ""]
    if memory:
        lines += [f"Peak memory, dense causal forward+backward, B=1, H={memory['heads']}, S={memory['S']}, D={D}, "
                  f"fp32: the peak resident set grew by {memory['growth_bytes'] / 2**20:.0f} MiB over the inputs "
                  f"= {memory['growth_in_qkv_sized_tensors']:.1f} tensors of q's size = "
                  f"{memory['bytes_per_head_per_token'] / 1024:.1f} KiB per head and token (O(S·D)); one S x S "
                  f"fp32 matrix would be {memory['s_by_s_bytes_per_head'] / 2**20:.0f} MiB per head.", ""]
    lines += ["Notes: ratios below 1 in headops/SDPA mean headops is faster; ref/headops and mask/headops above 1 "
              "mean headops is faster. SDPA dense is dense causal attention over every head whatever the scenario. "
              "check: gradients finite, full ungated heads equal SDPA's, the other heads' dq on the last "
              f"{CHECK_ROWS} query rows equals the reference's (largest abs difference shown). eager-mask does "
              "not run on duo alpha and calibrate: a mask cannot express alpha mixing, a sink logit or a scale.", ""]
    notes = time_box_notes(rows, BASELINES, SHORT)
    if notes:
        lines += [f"Time box: headops and SDPA always get every timed call; a baseline whose warm-up call shows "
                  f"that its timed calls would take more than {meta['baseline_budget_s']:g} s in a row "
                  "(--baseline-budget) gets as many as fit, \"1 run\" (its warm-up call) when none fits, and then "
                  "later rows of the same dtype and S skip it:", ""] + [f"- {n}" for n in notes] + [""]
    for r in rows:
        for p in r["check"]["problems"]:
            lines.append(f"- {r['label']} {SHORT[r['dtype']]} S={r['S']}: CHECK FAILED: {p}")
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S=256 rows only (CI smoke test)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory-s", type=int, default=None, help="S of the peak-memory run (0 skips; default 16384, "
                                                               "quick: 0)")
    p.add_argument("--rows", type=lambda s: [r.split(":") for r in s.split(",")], default=None,
                   help="only these rows of the preset, as scenario:dtype:S (e.g. dense:float32:2048,stream:float32:2048)")
    p.add_argument("--max-s", type=int, default=None,
                   help="only the rows of the preset with S <= this (make demo: 2048, leaving out the S=8192 row)")
    p.add_argument("--baseline-budget", type=float, default=BASELINE_BUDGET_S, metavar="SECONDS",
                   help="time box: seconds of timed calls a baseline (eager ref, eager-mask) may take per row; "
                        "fewer calls when its warm-up call says they would not fit "
                        f"(default {BASELINE_BUDGET_S:g}; 0: no limit)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "default"
    memory_s = args.memory_s if args.memory_s is not None else (0 if args.quick else 16384)
    meta = {"benchmark": "bench/attention_cpu_train.py", "preset": preset, "date": now_iso(),
            "command": shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                                   else sys.executable] + (sys.argv if argv is None else ["attention_cpu_train.py"] + argv)),
            "machine": machine_info(), "repeats": args.repeats, "baseline_budget_s": args.baseline_budget or None}
    print(f"headops CPU forward+backward benchmark, preset {preset}, {torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    rows = []
    selected = PRESETS[preset]
    if args.rows:
        wanted = {(s, d, int(n)) for s, d, n in args.rows}
        unknown = wanted - set(selected)
        if unknown:
            p.error(f"--rows: {sorted(unknown)} not in the {preset} preset {selected}")
        selected = [r for r in selected if r in wanted]
    if args.max_s is not None:
        selected = [r for r in selected if r[2] <= args.max_s]
        if not selected:
            p.error(f"--max-s {args.max_s}: no row of the {preset} preset left")
    timebox = TimeBox(args.baseline_budget, args.repeats)
    live = LiveTable(HEADER, MIN_WIDTHS)
    live.start()
    for scenario, dtype_name, S in selected:
        row = run_row(scenario, dtype_name, S, args.repeats, timebox)
        row["load_average"] = load_average()
        rows.append(row)
        live.row(table_rows([row])[0])
    memory = measure_memory(memory_s) if memory_s else None
    meta["elapsed_s"] = time.perf_counter() - started
    meta["time_box"] = timebox.describe()
    out_dir = output_dir(args)
    os.makedirs(out_dir, exist_ok=True)
    path_base = os.path.join(out_dir, f"attention_cpu_train_{preset}")
    write_results(path_base, meta, rows, memory)
    notes = time_box_notes(rows, BASELINES, SHORT)
    if notes:
        print("\ntime box (--baseline-budget):\n" + "\n".join("  " + n for n in notes))
    if memory:
        print(f"\npeak memory, dense f+b S={memory['S']} H={memory['heads']}: +{memory['growth_bytes'] / 2**20:.0f} MiB "
              f"({memory['bytes_per_head_per_token'] / 1024:.1f} KiB per head and token; S x S fp32 per head would be "
              f"{memory['s_by_s_bytes_per_head'] / 2**20:.0f} MiB)")
    print(f"\nwall time {meta['elapsed_s']:.0f} s; wrote {shown_path(path_base)}.md and .json")
    return 0 if all(r["check"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
