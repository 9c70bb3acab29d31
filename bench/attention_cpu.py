#!/usr/bin/env python
"""CPU forward benchmark of ``headops.attention`` against named baselines.

    cd /work/main && PYTHONPATH=python .venv/bin/python bench/attention_cpu.py [--quick | --full] [options]

Shape: B=1, H=16, D=128, layout "bhsd", causal. Scenarios (docs/DESIGN.md section 1):

  dense        every head full causal attention (no per-head argument);
  gated 50%    gate = [1, 0] * 8: half of the heads switched off (head masking);
  stream 50%   half of the heads streaming (sinks 4 + window 256; window min(256, S/4) at tiny S),
               the other heads full (window -1, sinks 0), DuoAttention-style.

Baselines, measured in the same run on the same inputs, timed interleaved with headops
(bench/timing.py: one warm-up call each, then ``--repeats`` rounds; the median is reported):

  SDPA dense   torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True): dense causal
               attention over every head, whatever the scenario -- what you pay without headops;
  flex         torch.compile(flex_attention) with a BlockMask from a mask_mod that reads per-head
               window/sinks/active tensors (a gated head's block mask is empty, so flex skips it, and
               its output is 0 = gate * out); "first call" is the compile (fresh inductor cache per
               process unless TORCHINDUCTOR_CACHE_DIR is set), the block-mask build is timed apart;
  eager ref    headops.reference.attention (the test oracle; materialises S x S; only S <= --ref-max-s
               = 4096 and the rows --eager-ref selects, otherwise "skipped");
  eager-mask   how head-masking studies run today (transformers' eager attention): scores = q @ k^T *
               scale, mask (causal, or per-head window/sinks), fp32 softmax, cast, @ v, then head
               outputs multiplied by the gate; every head is computed, S x S is materialised; its
               boolean mask is built once outside the timing (a model builds it once per forward).

Correctness is checked once per row at the benchmark size, cheaply, and a mismatch makes the
script exit with status 1 (so a fast-but-wrong kernel cannot look good):
  - headops vs the eager reference on six blocks of 128 query rows spread over S (first and last
    rows included; the reference is called on the row slice, bottom-right aligned, so it costs
    128 x S per block, not S x S);
  - heads that are full and ungated vs SDPA over the whole tensor;
  - gated heads exactly 0, no NaN/inf anywhere;
  - headops' output unchanged after the other candidates ran and sharing memory with none of
    their outputs (the checks run on a snapshot taken right after the call).
Flex's and eager-mask's outputs are compared with headops too (reported, not fatal).

Presets (every row times headops, SDPA and eager-mask):
  --quick   S=256, fp32+bf16, 3 scenarios; flex on the "stream 50%" rows; eager ref on every row.
            For CI smoke tests add --no-flex (flex's compile dominates otherwise).
  default   S=4096, fp32+bf16, 3 scenarios; flex on the "stream 50%" rows (fp32 and bf16); eager ref
            on the dense fp32 row only (it computes in fp32 whatever the dtype and costs ~2.5 s a
            call at S=4096). Measured 261 s on the 2 shared cores while other jobs kept the load
            average at 3-5 (SDPA ~3x slower than idle); about 1.5-2 minutes on idle cores.
  --full    S=4096 and 8192, fp32+bf16, 3 scenarios; flex on every row; eager ref on every row with
            S <= 4096 ("skipped" above). Tens of minutes.
Overrides: --sizes, --dtypes, --scenarios, --flex-all / --no-flex, --eager-ref, --repeats, --threads.

Time box (bench/timing.py): headops and SDPA always get every timed call; a baseline whose
warm-up call shows that its --repeats timed calls would take more than --baseline-budget seconds
(default 10) in a row gets as many as fit, and when not even one fits, its warm-up call is its
only sample and later rows of the same dtype and S skip it. The table says so ("(1 run)",
"skipped (time box)"), the notes say why (e.g. no bf16 matrix unit: eager bf16 matmuls take about a
minute a call at S = 4096 on a 2-core AVX2 EPYC). --baseline-budget 0 times everything fully.

Each row's table line is printed as soon as the row is measured. Writes
bench/results/local/attention_cpu_<preset>.md (table) and .json (raw numbers, machine, date,
command line), untracked; --record writes the committed bench/results/ instead (make
bench-record), --out-dir anywhere. <preset> gets a "-custom" suffix when --sizes/--dtypes/
--scenarios/--flex-all override it. The files are rewritten after every row, so an interrupted
run leaves what it did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `bench.timing` when run as a script

# A fresh inductor cache per process, so that flex's first call measures a real compile and not
# whatever an earlier run left on disk. Must happen before torch is imported.
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="headops-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_CACHE

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import headops  # noqa: E402
except ImportError:  # run without PYTHONPATH=python
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import headops  # noqa: E402
import headops.reference  # noqa: E402

from bench.timing import (BASELINE_BUDGET_S, LiveTable, TimeBox, add_output_args, interleaved,  # noqa: E402
                          load_average, machine_info, markdown_table, mem_available_bytes, now_iso,
                          output_dir, runs_label, shown_path, time_box_notes, time_call)

B, H, D = 1, 16, 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# |headops - oracle| <= atol + rtol * |oracle|, elementwise
TOLERANCE = {"float32": (2e-4, 2e-4), "bfloat16": (2e-2, 2e-2), "float16": (4e-3, 4e-3)}
CHECK_ROWS = 128  # query rows per checked block
CHECK_BLOCKS = 6  # blocks spread evenly over S, the first and the last rows included
STREAM_SINKS, STREAM_WINDOW = 4, 256

PRESETS = {
    "quick": dict(sizes=[256], dtypes=["float32", "bfloat16"], flex="stream", eager_ref="all"),
    "default": dict(sizes=[4096], dtypes=["float32", "bfloat16"], flex="stream", eager_ref="dense-fp32"),
    "full": dict(sizes=[4096, 8192], dtypes=["float32", "bfloat16"], flex="all", eager_ref="all"),
}


# ----------------------------------------------------------------------------------------------
# scenarios


class Scenario:
    def __init__(self, key, label, gate=None, window=None, sinks=None):
        self.key, self.label = key, label
        self.gate, self.window, self.sinks = gate, window, sinks  # python lists of length H, or None

    def kwargs(self) -> dict:
        out = {}
        if self.gate is not None:
            out["gate"] = torch.tensor(self.gate, dtype=torch.float32)
        if self.window is not None:
            out["window"] = torch.tensor(self.window, dtype=torch.int64)
        if self.sinks is not None:
            out["sinks"] = torch.tensor(self.sinks, dtype=torch.int64)
        return out

    def head_gate(self, h):
        return 1.0 if self.gate is None else float(self.gate[h])

    def head_window(self, h):
        return -1 if self.window is None else int(self.window[h])

    def head_sinks(self, h):
        return 0 if self.sinks is None else int(self.sinks[h])

    def gated_heads(self):
        return [h for h in range(H) if self.head_gate(h) == 0.0]

    def full_heads(self):
        """Heads whose output equals dense causal attention (ungated, unit gate, no window)."""
        return [h for h in range(H) if self.head_gate(h) == 1.0 and self.head_window(h) < 0]

    def describe(self) -> dict:
        return {"key": self.key, "label": self.label, "gate": self.gate, "window": self.window, "sinks": self.sinks}


def scenarios_for(S: int) -> list:
    window = min(STREAM_WINDOW, max(1, S // 4))  # keep the streaming heads streaming at tiny S
    return [
        Scenario("dense", "dense"),
        Scenario("gated", "gated 50%", gate=[1.0, 0.0] * (H // 2)),
        Scenario("stream", "stream 50%", window=[window, -1] * (H // 2), sinks=[STREAM_SINKS, 0] * (H // 2)),
    ]


# ----------------------------------------------------------------------------------------------
# baselines


def visible_mask(sc: Scenario, S: int) -> torch.Tensor:
    """Boolean [1, Hm, S, S], True where a key is visible (Hm = 1 when every head is causal-dense).

    Written here (not taken from headops.reference) so that the eager-mask baseline and the oracle
    share no code."""
    i = torch.arange(S).view(S, 1)
    j = torch.arange(S).view(1, S)
    causal = j <= i
    if sc.window is None and sc.sinks is None:
        return causal.view(1, 1, S, S)
    out = torch.empty(1, H, S, S, dtype=torch.bool)
    distance = i - j
    for h in range(H):
        w, s = sc.head_window(h), sc.head_sinks(h)
        vis = causal.clone()
        if w >= 0:
            vis &= (distance < w) | (j < s)
        out[0, h] = vis
    return out


def eager_masking(q, k, v, hidden, gate, scale):
    """transformers-style eager attention + head mask: computes every head, materialises S x S."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.mul_(scale)
    scores.masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    del scores
    if probs.dtype != q.dtype:
        probs = probs.to(q.dtype)
    out = torch.matmul(probs, v)
    if gate is not None:
        out.mul_(gate.to(out.dtype).view(1, -1, 1, 1))
    return out


_FLEX = {}


def flex_available() -> tuple:
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def flex_compiled():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_block_mask(sc: Scenario, S: int):
    """BlockMask of the scenario's per-head visibility.

    The mask_mod reads per-head tensors (window, sinks, active); gated heads are inactive, so their
    block lists are empty. Built one head at a time (create_block_mask evaluates the mask_mod densely:
    for all heads at once that is H x S x S int64 temporaries, too much at S=8192) and assembled
    with BlockMask.from_kv_blocks."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    window = torch.tensor([sc.head_window(h) for h in range(H)], dtype=torch.int64)
    sinks = torch.tensor([sc.head_sinks(h) for h in range(H)], dtype=torch.int64)
    active = torch.tensor([sc.head_gate(h) != 0.0 for h in range(H)], dtype=torch.bool)
    if any(sc.head_gate(h) not in (0.0, 1.0) for h in range(H)):
        raise ValueError("flex baseline supports gates of 0 or 1 only")

    def mask_mod(b, h, q_idx, kv_idx):
        w = window[h]
        in_window = (w < 0) | (q_idx - kv_idx < w) | (kv_idx < sinks[h])
        return (kv_idx <= q_idx) & in_window & active[h]

    parts = []
    for head in range(H):
        def one_head(b, h, q_idx, kv_idx, _head=head):  # H=1 below, so h is always 0
            return mask_mod(b, h + _head, q_idx, kv_idx)

        parts.append(create_block_mask(one_head, 1, 1, S, S, device="cpu"))

    def cat(name):
        tensors = [getattr(p, name) for p in parts]
        return None if tensors[0] is None else torch.cat(tensors, dim=1)

    return BlockMask.from_kv_blocks(cat("kv_num_blocks"), cat("kv_indices"), cat("full_kv_num_blocks"),
                                    cat("full_kv_indices"), BLOCK_SIZE=parts[0].BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=(S, S))


def short_reason(e: BaseException, limit: int = 48) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def full_reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


# ----------------------------------------------------------------------------------------------
# correctness


def _compare(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> tuple:
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    bad = ~(diff <= atol + rtol * want.abs())  # NaN counts as bad
    max_diff = float(diff.max()) if diff.numel() else 0.0
    return max_diff, int(bad.sum())


def check_row(out, q, k, v, sc: Scenario, sdpa_out, dtype_name: str, S: int) -> dict:
    atol, rtol = TOLERANCE[dtype_name]
    spec = sc.kwargs()
    result = {"tolerance": {"atol": atol, "rtol": rtol}, "ok": True, "problems": []}
    if not bool(torch.isfinite(out).all()):
        result["ok"] = False
        result["problems"].append("non-finite values in headops output")

    R = min(CHECK_ROWS, S)
    starts = sorted({round(i * (S - R) / (CHECK_BLOCKS - 1)) for i in range(CHECK_BLOCKS)})
    worst, nbad = 0.0, 0
    for s0 in starts:
        e = s0 + R
        # bottom-right alignment: q rows s0..e-1 against keys 0..e-1 have positions s0..e-1
        want = headops.reference.attention(q[:, :, s0:e], k[:, :, :e], v[:, :, :e], causal=True, layout="bhsd",
                                           **spec)
        d, n = _compare(out[:, :, s0:e], want, atol, rtol)
        worst, nbad = max(worst, d), nbad + n
    result["ref_rows"] = {"row_starts": starts, "rows_each": R, "max_abs_diff": worst, "mismatches": nbad}
    if nbad:
        result["ok"] = False
        result["problems"].append(f"{nbad} elements differ from the eager reference (rows {starts} + {R})")

    full = sc.full_heads()
    if full and sdpa_out is not None:
        d, n = _compare(out[:, full], sdpa_out[:, full], atol, rtol)
        result["sdpa_full_heads"] = {"heads": full, "max_abs_diff": d, "mismatches": n}
        if n:
            result["ok"] = False
            result["problems"].append(f"{n} elements of full heads differ from SDPA")

    gated = sc.gated_heads()
    if gated:
        m = float(out[:, gated].float().abs().max())
        result["gated_heads"] = {"heads": gated, "max_abs": m}
        if m != 0.0:
            result["ok"] = False
            result["problems"].append(f"gated heads are not exactly 0 (max |out| = {m:.3g})")

    diffs = [worst] + [result[key]["max_abs_diff"] for key in ("sdpa_full_heads",) if key in result]
    result["max_abs_diff"] = max(diffs)
    return result


def informational_diff(out_baseline, out_headops, dtype_name: str) -> dict:
    atol, rtol = TOLERANCE[dtype_name]
    d, n = _compare(out_baseline, out_headops, atol, rtol)
    return {"max_abs_diff_vs_headops": d, "elements_outside_tolerance": n,
            "bitwise_equal_to_headops": bool(torch.equal(out_baseline, out_headops))}


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of two tensors overlaps."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes() and sa.nbytes() > 0 and sb.nbytes() > 0


# ----------------------------------------------------------------------------------------------
# one row: (scenario, dtype, S)


def make_inputs(S: int, dtype):
    g = torch.Generator().manual_seed(1234 + S)
    base = torch.randn(3, B, H, S, D, generator=g)
    return tuple(base[i].to(dtype).contiguous() for i in range(3))


def warm_up_candidate(name, fn, row, outputs, candidates):
    """First (warm-up) call of a baseline; on failure the row says why instead of crashing."""
    try:
        seconds, outputs[name] = time_call(fn)
        row[name] = {"status": "ok", "warmup_ms": seconds * 1e3}
        candidates[name] = fn
    except Exception as e:  # noqa: BLE001
        row[name] = {"status": "n/a", "reason": full_reason(e)}


# the baselines the time box may thin (never headops or SDPA), as the tables name them
BASELINES = {"flex": "flex", "eager_ref": "eager ref", "eager_mask": "eager-mask"}


def run_row(sc: Scenario, dtype_name: str, S: int, q, k, v, args, use_flex: bool, use_ref: bool,
            timebox: TimeBox | None = None) -> dict:
    dtype = DTYPES[dtype_name]
    timebox = timebox or TimeBox(None, args.repeats)
    where = f"{sc.label} {SHORT[dtype_name]} S={S}"
    elt = torch.tensor([], dtype=dtype).element_size()
    spec = sc.kwargs()
    scale = 1.0 / math.sqrt(D)
    row = {"scenario": sc.key, "label": sc.label, "spec": sc.describe(), "dtype": dtype_name, "S": S,
           "B": B, "H": H, "D": D, "layout": "bhsd", "causal": True}
    started = time.perf_counter()
    candidates, outputs = {}, {}

    # headops (failures are fatal for the row: nothing to compare)
    def run_headops():
        return headops.attention(q, k, v, causal=True, layout="bhsd", **spec)

    counting = getattr(headops, "count_work", None)  # the kernels' work counters, when the build has them
    try:
        with (counting() if counting else contextlib.nullcontext()) as work:
            seconds, outputs["headops"] = time_call(run_headops)
        if work is not None:
            row["headops_work"] = dict(vars(work))
    except Exception as e:  # noqa: BLE001
        row["headops"] = {"status": "error", "reason": full_reason(e)}
        row["check"] = {"ok": False, "problems": [f"headops failed: {short_reason(e, 200)}"], "max_abs_diff": None}
        traceback.print_exc()
        return row
    row["headops"] = {"status": "ok", "warmup_ms": seconds * 1e3}
    candidates["headops"] = run_headops
    # a snapshot taken before any other candidate allocates: if headops' output were released while
    # still referenced (or alias anything), a baseline's result could land in it and pass the checks
    headops_snapshot = outputs["headops"].clone()

    # SDPA dense causal
    def run_sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    warm_up_candidate("sdpa", run_sdpa, row, outputs, candidates)

    # FlexAttention
    if not use_flex:
        row["flex"] = {"status": "off", "reason": "not in this preset (--flex-all)"
                       if not args.no_flex else "--no-flex"}
    elif timebox.skip_reason(("flex", dtype_name, S)):
        row["flex"] = {"status": "skipped", "reason": timebox.skip_reason(("flex", dtype_name, S))}
    else:
        ok, why = flex_available()
        if not ok:
            row["flex"] = {"status": "n/a", "reason": why}
        else:
            try:
                t0 = time.perf_counter()
                block_mask = flex_block_mask(sc, S)
                block_mask_s = time.perf_counter() - t0
                fn = flex_compiled()

                def run_flex():
                    return fn(q, k, v, block_mask=block_mask, scale=scale)

                first_s, _ = time_call(run_flex)
                seconds, outputs["flex"] = time_call(run_flex)  # warm-up after the compile
                row["flex"] = {"status": "ok", "first_call_s": first_s, "block_mask_s": block_mask_s,
                               "warmup_ms": seconds * 1e3, "block_mask_sparsity_pct": float(block_mask.sparsity())}
                candidates["flex"] = run_flex
            except Exception as e:  # noqa: BLE001
                row["flex"] = {"status": "n/a", "reason": full_reason(e)}
                print(f"    flex n/a: {short_reason(e, 200)}", flush=True)

    avail = mem_available_bytes()

    # eager reference (the oracle; S x S in fp32)
    ref_bytes = 6 * B * H * S * S * 4
    if not use_ref:
        row["eager_ref"] = {"status": "skipped", "reason": "not in this preset (--eager-ref all)"}
    elif timebox.skip_reason(("eager_ref", dtype_name, S)):
        row["eager_ref"] = {"status": "skipped", "reason": timebox.skip_reason(("eager_ref", dtype_name, S))}
    elif S > args.ref_max_s:
        row["eager_ref"] = {"status": "skipped", "reason": f"S > {args.ref_max_s} (materialises S x S)"}
    elif avail is not None and ref_bytes > 0.7 * avail:
        row["eager_ref"] = {"status": "skipped", "reason": f"needs ~{ref_bytes / 2**30:.0f} GiB"}
    else:
        def run_ref():
            return headops.reference.attention(q, k, v, causal=True, layout="bhsd", **spec)

        warm_up_candidate("eager_ref", run_ref, row, outputs, candidates)

    # eager masking (what head-masking studies run)
    mask_heads = 1 if (sc.window is None and sc.sinks is None) else H
    em_bytes = B * H * S * S * (elt + 4 + (elt if elt != 4 else 0)) + mask_heads * S * S
    if args.no_eager_mask:
        row["eager_mask"] = {"status": "skipped", "reason": "--no-eager-mask"}
    elif timebox.skip_reason(("eager_mask", dtype_name, S)):
        row["eager_mask"] = {"status": "skipped", "reason": timebox.skip_reason(("eager_mask", dtype_name, S))}
    elif avail is not None and em_bytes > 0.7 * avail:
        row["eager_mask"] = {"status": "skipped", "reason": f"needs ~{em_bytes / 2**30:.0f} GiB"}
    else:
        try:
            hidden = ~visible_mask(sc, S)
            gate = spec.get("gate")

            def run_eager_mask():
                return eager_masking(q, k, v, hidden, gate, scale)

            seconds, outputs["eager_mask"] = time_call(run_eager_mask)
            row["eager_mask"] = {"status": "ok", "warmup_ms": seconds * 1e3}
            candidates["eager_mask"] = run_eager_mask
        except Exception as e:  # noqa: BLE001
            row["eager_mask"] = {"status": "n/a", "reason": full_reason(e)}

    # correctness at the benchmark size
    row["check"] = check_row(headops_snapshot, q, k, v, sc, outputs.get("sdpa"), dtype_name, S)
    if not torch.equal(outputs["headops"], headops_snapshot):
        row["check"]["ok"] = False
        row["check"]["problems"].append("headops' output changed after it returned (released or aliased storage)")
    for name, t in outputs.items():
        if name != "headops" and _overlaps(t, outputs["headops"]):
            row["check"]["ok"] = False
            row["check"]["problems"].append(f"headops' output shares memory with {name}'s output")
    outputs["headops"] = headops_snapshot
    for name in ("flex", "eager_ref", "eager_mask"):
        if name in outputs:
            row[name].update(informational_diff(outputs[name], outputs["headops"], dtype_name))
    outputs.clear()

    # timing, interleaved; a baseline whose warm-up call says its timed calls would not fit in the
    # budget gets fewer (bench/timing.py: TimeBox)
    runs, warmups = {}, {}
    for name in candidates:
        warmups[name] = row[name]["warmup_ms"] / 1e3
        if name in BASELINES:
            runs[name] = timebox.runs((name, dtype_name, S), warmups[name], where)
            if timebox.entry(runs[name], dtype_name):
                row[name]["time_box"] = timebox.entry(runs[name], dtype_name)
    stats = interleaved(candidates, args.repeats, runs=runs, warmups=warmups)
    for name, st in stats.items():
        row[name].update(st.as_dict(), repeats=args.repeats)

    def med(name):
        return row[name].get("median_ms") if row.get(name, {}).get("status") == "ok" else None

    ho, sd, fx, em = med("headops"), med("sdpa"), med("flex"), med("eager_mask")
    row["ratios"] = {
        "headops_over_sdpa": ho / sd if ho and sd else None,
        "headops_over_flex": ho / fx if ho and fx else None,
        "eager_mask_over_headops": em / ho if ho and em else None,
    }
    row["row_seconds"] = time.perf_counter() - started
    return row


# ----------------------------------------------------------------------------------------------
# reporting

HEADER = ["scenario", "dtype", "S", "headops ms", "SDPA dense ms", "headops/SDPA", "flex ms (compile s)",
          "headops/flex", "eager ref ms", "eager-mask ms", "eager-mask/headops", "check max|Δ|"]
MIN_WIDTHS = [10, 0, 5, 0, 0, 0, 0, 0, 14, 18, 0, 11]  # the live table's columns (cells like "skipped (time box)")


def _ms(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _runs(entry: dict) -> str:
    label = runs_label(entry, entry["repeats"]) if "repeats" in entry else ""
    return f" ({label})" if label else ""


def _cell(entry: dict, table_reasons: bool = True) -> str:
    if entry is None:
        return "-"
    status = entry.get("status")
    if status == "ok":
        return _ms(entry["median_ms"]) + _runs(entry)
    if status == "error":
        return "ERROR"
    if status == "off":
        return "off"
    reason = entry.get("reason", "")
    reason = reason.splitlines()[0] if reason else ""
    if reason.startswith("time box"):
        reason = "time box"
    if len(reason) > 30:
        reason = reason[:27] + "..."
    return f"{status} ({reason})" if table_reasons and reason else status


def _ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def table_rows(rows: list) -> list:
    out = []
    for r in rows:
        flex = r.get("flex")
        if flex and flex.get("status") == "ok":
            flex_cell = f"{_ms(flex['median_ms'])} ({flex['first_call_s']:.1f} s){_runs(flex)}"
        elif flex and flex.get("status") == "off":
            flex_cell = "off"
        else:
            flex_cell = _cell(flex)
        eager_ref = r.get("eager_ref")
        ref_cell = _cell(eager_ref)
        if eager_ref and eager_ref.get("status") == "skipped" and not ref_cell.endswith("(time box)"):
            ref_cell = "skipped"
        ratios = r.get("ratios", {})
        check = r.get("check", {})
        if check.get("max_abs_diff") is None:
            check_cell = "FAIL"
        else:
            check_cell = ("ok " if check.get("ok") else "FAIL ") + f"{check['max_abs_diff']:.1e}"
        out.append([r["label"], SHORT[r["dtype"]], r["S"], _cell(r.get("headops")), _cell(r.get("sdpa")),
                    _ratio(ratios.get("headops_over_sdpa")), flex_cell, _ratio(ratios.get("headops_over_flex")),
                    ref_cell, _cell(r.get("eager_mask")), _ratio(ratios.get("eager_mask_over_headops")), check_cell])
    return out


NOTES = """\
- Times are medians of the timed calls (one warm-up call each before), in milliseconds; the
  candidates are timed interleaved, round-robin, so drift on a shared machine hits all alike.
- headops/SDPA and headops/flex: below 1 means headops is faster. eager-mask/headops: above 1
  means headops is faster.
- SDPA dense: dense causal attention over all heads whatever the scenario (the cost without
  per-head behaviour). flex: torch.compile(flex_attention) with a per-head BlockMask (gated heads
  empty); in parentheses the first call (the compile; fresh inductor cache per run).
- eager ref: headops.reference.attention (the oracle); "skipped" where S > 4096 or the preset
  leaves it out (the default preset times it on the dense fp32 row only). eager-mask: scores,
  mask, fp32 softmax, @ v, outputs times the gate; computes every head and materialises S x S.
- flex compiles once per dtype and shape, not per mask pattern (the mask_mod reads per-head
  tensors), so a "(0.0 s)" first call reused the kernel compiled for an earlier row.
- check: headops vs the eager reference on 6 x 128 query rows spread over S, full ungated heads
  vs SDPA on the whole tensor, gated heads exactly 0; "ok" followed by the largest absolute
  difference found. A failed check makes the script exit with status 1.
- time box: headops and SDPA always get every timed call. A baseline (flex, eager ref,
  eager-mask) whose warm-up call shows that its timed calls would take more than the budget
  (--baseline-budget seconds per row) gets as many as fit -- "(N runs)" after its time; when not
  even one fits, its warm-up call is its only sample "(1 run)" and later rows of the same dtype
  and S skip it ("skipped (time box)"). Decided by measuring the first call, not by the CPU model.
"""






def write_results(path_base: str, meta: dict, rows: list, complete: bool) -> None:
    meta = dict(meta, complete=complete, rows=rows, finished=now_iso() if complete else None)
    os.makedirs(os.path.dirname(path_base), exist_ok=True)
    tmp = path_base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path_base + ".json")

    m = meta["machine"]
    lines = [f"# headops attention, CPU forward: preset `{meta['preset']}`", ""]
    if not complete:
        lines += ["**Incomplete run** (interrupted or still running).", ""]
    lines += [
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu_model']} ({', '.join(m['cpu_flags'])}), {m['cpus_usable']} usable CPUs, "
        f"torch {m['torch']}, {meta['config']['threads']} threads",
        f"- shape: B={B}, H={H}, D={D}, layout bhsd, causal; repeats {meta['config']['repeats']} (median)",
    ]
    if meta.get("elapsed_s") is not None:
        lines.append(f"- wall time of the run: {meta['elapsed_s']:.0f} s")
    lines += ["", markdown_table(HEADER, table_rows(rows)), "", "Notes:", "", NOTES]
    extra = []
    for note in time_box_notes(rows, BASELINES, SHORT):
        extra.append("- " + note)
    for r in rows:
        for name in ("headops", "sdpa", "flex", "eager_ref", "eager_mask"):
            e = r.get(name) or {}
            if e.get("status") in ("n/a", "error"):
                extra.append(f"- {r['label']} {SHORT[r['dtype']]} S={r['S']}, {name}: {e.get('reason')}")
        for p in r.get("check", {}).get("problems", []):
            extra.append(f"- {r['label']} {SHORT[r['dtype']]} S={r['S']}, CHECK: {p}")
        for name in ("flex", "eager_mask"):
            e = r.get(name) or {}
            if e.get("elements_outside_tolerance"):
                extra.append(f"- {r['label']} {SHORT[r['dtype']]} S={r['S']}, {name} output differs from "
                             f"headops: max |diff| {e['max_abs_diff_vs_headops']:.2e}, "
                             f"{e['elements_outside_tolerance']} elements outside the tolerance (informational)")
    if extra:
        lines += ["Time box, failures, unavailable baselines, differences:", ""] + extra + [""]
    tmp = path_base + ".md.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path_base + ".md")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny sizes (S=256), for CI smoke tests")
    g.add_argument("--full", action="store_true", help="S=4096 and 8192, flex for every row (long)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per candidate (median; default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~30 s)")
    p.add_argument("--flex-all", action="store_true", help="run flex for every row, not only the stream 50%% rows")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="override the preset's sequence lengths, e.g. 1024,2048")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=None,
                   help=f"override the preset's dtypes (comma-separated: {', '.join(DTYPES)})")
    p.add_argument("--scenarios", type=lambda s: s.split(","), default=None,
                   help="subset of: dense, gated, stream")
    p.add_argument("--eager-ref", choices=["all", "dense-fp32", "off"], default=None,
                   help="rows that time the eager reference (presets: quick all, default dense-fp32, full all)")
    p.add_argument("--ref-max-s", type=int, default=4096, help="largest S for the eager reference (default 4096)")
    p.add_argument("--no-eager-mask", action="store_true",
                   help="skip the eager-masking baseline (it materialises S x S; bf16 without a bf16 matrix unit "
                        "takes tens of seconds a call at S = 2048)")
    p.add_argument("--baseline-budget", type=float, default=BASELINE_BUDGET_S, metavar="SECONDS",
                   help="time box: seconds of timed calls a baseline (flex, eager ref, eager-mask) may take per row; "
                        f"fewer calls when its warm-up call says they would not fit (default {BASELINE_BUDGET_S:g}; "
                        "0: no limit)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.dtypes:
        for d in args.dtypes:
            if d not in DTYPES:
                p.error(f"unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    if args.scenarios:
        for s in args.scenarios:
            if s not in ("dense", "gated", "stream"):
                p.error(f"unknown scenario {s!r} (dense, gated, stream)")
    if args.no_flex and args.flex_all:
        p.error("--no-flex and --flex-all contradict each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "full" if args.full else "default"
    config = dict(PRESETS[preset])
    custom = False
    for name in ("sizes", "dtypes", "scenarios"):
        if getattr(args, name):
            config[name] = getattr(args, name)
            custom = True
    if args.eager_ref and args.eager_ref != config["eager_ref"]:
        config["eager_ref"] = args.eager_ref
        custom = True
    if args.no_flex:
        config["flex"] = "off"
    elif args.flex_all and config["flex"] != "all":
        config["flex"] = "all"
        custom = True
    config.setdefault("scenarios", ["dense", "gated", "stream"])
    config.update(repeats=args.repeats, threads=torch.get_num_threads(), ref_max_s=args.ref_max_s,
                  baseline_budget_s=args.baseline_budget or None,
                  preset=preset, inductor_cache=("fresh temporary directory (cold compile)" if _OWN_INDUCTOR_CACHE
                                                 else os.environ.get("TORCHINDUCTOR_CACHE_DIR")))
    name = preset + ("-custom" if custom else "")
    path_base = os.path.join(output_dir(args), f"attention_cpu_{name}")

    meta = {
        "benchmark": "bench/attention_cpu.py",
        "preset": name,
        "date": now_iso(),
        "command": shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(["attention_cpu.py"] + argv),
        "cwd": os.getcwd(),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "headops_version": getattr(headops, "__version__", None),
        "machine": machine_info(),
        "config": config,
        "elapsed_s": None,
    }
    print(f"headops CPU attention benchmark, preset {name}: S={config['sizes']}, dtypes={config['dtypes']}, "
          f"flex={config['flex']}, eager ref={config['eager_ref']}, repeats={args.repeats}, threads={config['threads']}", flush=True)
    print(f"machine: {meta['machine']['cpu_model']}, torch {meta['machine']['torch']}", flush=True)

    started = time.perf_counter()
    rows = []
    timebox = TimeBox(args.baseline_budget, args.repeats)
    live = LiveTable(HEADER, MIN_WIDTHS)
    live.start()
    try:
        with torch.no_grad():
            for S in config["sizes"]:
                scenarios = [sc for sc in scenarios_for(S) if sc.key in config["scenarios"]]
                for dtype_name in config["dtypes"]:
                    q, k, v = make_inputs(S, DTYPES[dtype_name])
                    for sc in scenarios:
                        use_flex = config["flex"] == "all" or (
                            config["flex"] == "stream" and sc.key == "stream")
                        use_ref = config["eager_ref"] == "all" or (
                            config["eager_ref"] == "dense-fp32" and sc.key == "dense" and dtype_name == "float32")
                        row = run_row(sc, dtype_name, S, q, k, v, args, use_flex, use_ref, timebox)
                        row["load_average"] = load_average()
                        rows.append(row)
                        live.row(table_rows([row])[0])
                        meta["elapsed_s"] = time.perf_counter() - started
                        write_results(path_base, meta, rows, complete=False)
                    del q, k, v
        meta["elapsed_s"] = time.perf_counter() - started
        meta["machine"]["load_average_at_end"] = load_average()
        meta["time_box"] = timebox.describe()
        failures = [r for r in rows if not r.get("check", {}).get("ok")]
        meta["checks_ok"] = not failures
        write_results(path_base, meta, rows, complete=True)
    finally:
        if _OWN_INDUCTOR_CACHE:
            shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)

    notes = time_box_notes(rows, BASELINES, SHORT)
    if notes:
        print("\ntime box (--baseline-budget):\n" + "\n".join("  " + n for n in notes))
    print()
    print(f"wall time {meta['elapsed_s']:.0f} s; wrote {shown_path(path_base)}.md and .json")
    if failures:
        print("\nCORRECTNESS FAILURE: headops output does not match (see the check column and the .md):")
        for r in failures:
            for p in r["check"].get("problems", []):
                print(f"  {r['label']} {SHORT[r['dtype']]} S={r['S']}: {p}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
