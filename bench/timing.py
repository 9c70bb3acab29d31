"""Shared helpers of the headops benchmarks: timing, statistics, machine description, tables.

Timing protocol (what every benchmark here relies on):
- each candidate is called once before timing (warm-up; benchmarks keep that call's output for
  their correctness checks), then timed ``repeats`` times;
- the timed calls are *interleaved* (round-robin, alternating direction every round), so that
  drift on a shared machine (another process, thermal or frequency changes) hits every
  candidate alike and ratios measured in the same run stay meaningful;
- the statistic is the median; min and quartiles are kept in the raw results;
- time box: a *baseline* (never headops or SDPA, whose ratio is the point) whose warm-up call
  shows that its timed calls would not fit in ``budget_s`` seconds (per row) is timed fewer
  times (``thinned_runs``), and when even one call does not fit, its warm-up call is its only
  sample and later rows of the same kind skip it (``TimeBox``). Decided by measuring, never by
  the CPU model; eager attention in bf16 on a CPU without a bf16 matrix unit (a minute a call at
  S = 4096 on a 2-core AVX2 EPYC) is the case this exists for. Tables say "N runs" where a
  candidate got fewer than the others.

Results go to ``bench/results/local/`` (untracked) unless ``--record`` asks for the committed
files under ``bench/results/`` (``add_output_args`` / ``output_dir``).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_DIR = os.path.join(ROOT, "bench", "results")  # committed: refreshed by --record (make bench-record)
LOCAL_DIR = os.path.join(RECORD_DIR, "local")  # untracked (.gitignore): every other run
BASELINE_BUDGET_S = 10.0  # default seconds of timed calls a baseline may take in one row


@dataclasses.dataclass
class Stats:
    """Statistics of the times of one candidate, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    n: int
    samples_ms: list
    warmup_only: bool = False  # the time box left it no timed call: its warm-up call is the sample

    @classmethod
    def of(cls, seconds: list, warmup_only: bool = False) -> "Stats":
        ms = [s * 1e3 for s in seconds]
        ordered = sorted(ms)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ms), [round(x, 4) for x in ms],
                   warmup_only)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_call(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds taken by one call of fn, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def forward_backward(q, k, v, args: dict, grad_out, forward: Callable[[], object]) -> Callable[[], list]:
    """A training step to time: forward() then its backward against grad_out, with the gradients of
    q, k, v and every tensor in args that requires one cleared first and returned."""
    leaves = [q, k, v] + [a for a in args.values() if getattr(a, "requires_grad", False)]

    def call():
        for t in leaves:
            t.grad = None
        forward().to(grad_out.dtype).backward(grad_out)
        return [t.grad for t in leaves]
    return call


def with_backward(forward: Callable[[], object], leaves: list) -> Callable[[], list]:
    """A training step to time: forward() and the backward of its float sum (dL/dout of ones), the
    leaves' gradients cleared first and returned."""
    def call():
        for t in leaves:
            t.grad = None
        forward().float().sum().backward()
        return [t.grad for t in leaves]
    return call


def spread_rounds(n: int, repeats: int) -> set:
    """The n of ``repeats`` rounds (0-based) a thinned candidate is timed in, spread evenly: 1 of 5
    is round 2, 2 of 5 rounds 1 and 3, 3 of 5 rounds 0, 2, 4."""
    return {(2 * i + 1) * repeats // (2 * n) for i in range(n)}


def interleaved(candidates: dict, repeats: int, runs: dict | None = None, warmups: dict | None = None) -> dict:
    """Times every candidate ``repeats`` times, round-robin; returns {name: Stats}.

    ``runs`` (optional, from ``TimeBox``) gives some candidates fewer timed calls, spread evenly
    over the rounds (``spread_rounds``); a candidate with 0 runs is not called here and its
    Stats hold its warm-up call (``warmups[name]``, seconds), marked ``warmup_only``.

    The garbage collector is off during the rounds (collected between rounds), and results are
    dropped right after each call so that one candidate's outputs do not inflate the next's
    allocations.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    runs = runs or {}
    names = list(candidates)
    rounds = {}
    for name in names:
        n = min(repeats, runs.get(name, repeats))
        if n < 0:
            raise ValueError(f"runs[{name!r}] must be >= 0")
        if n == 0 and (warmups is None or name not in warmups):
            raise ValueError(f"{name!r} has 0 timed runs: its warm-up time must be given in warmups")
        rounds[name] = spread_rounds(n, repeats) if n else set()
    samples = {name: [] for name in names}
    was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            gc.collect()
            gc.disable()
            for name in (names if r % 2 == 0 else names[::-1]):
                if r not in rounds[name]:
                    continue
                seconds, result = time_call(candidates[name])
                del result
                samples[name].append(seconds)
            if was_enabled:
                gc.enable()
    finally:
        if was_enabled:
            gc.enable()
    return {name: Stats.of(s) if s else Stats.of([warmups[name]], warmup_only=True) for name, s in samples.items()}


# ----------------------------------------------------------------------------------------------
# time box: baselines that are pathologically slow on this machine


def thinned_runs(first_call_s: float, repeats: int, budget_s: float | None) -> int:
    """Timed calls a baseline gets after a warm-up call of ``first_call_s`` seconds: all ``repeats``
    when they fit in ``budget_s``, otherwise as many as fit, 0 when not even one does (its
    warm-up call is then its only sample). ``budget_s`` None or <= 0: no limit."""
    if not budget_s or budget_s <= 0 or first_call_s * repeats <= budget_s:
        return repeats
    return int(budget_s // first_call_s)


def matrix_unit_note(dtype_name: str, flags: list | None = None) -> str:
    """Why eager matmuls in this dtype may be slow here, from the CPU flags (a description of the
    machine for the tables, not what decides the time box): '' when the CPU has the unit."""
    units = {"bfloat16": ("bf16", ("amx_bf16", "avx512_bf16")), "float16": ("fp16", ("amx_fp16", "avx512_fp16"))}
    if dtype_name not in units:
        return ""
    short, wanted = units[dtype_name]
    have = cpu_flags(wanted) if flags is None else [f for f in wanted if f in flags]
    return "" if have else f"no {short} matrix unit ({' / '.join(wanted)} absent)"


class TimeBox:
    """The time box of one benchmark run (see the module docstring).

    After a baseline's warm-up call, ``runs(key, first_call_s, where)`` says how many timed calls
    it gets in this row and remembers a key (e.g. ("eager_mask", "bfloat16", 4096)) whose
    single call is over the budget; ``skip_reason(key)`` is then the reason later rows skip it.
    """

    def __init__(self, budget_s: float | None, repeats: int):
        self.budget_s = budget_s if budget_s and budget_s > 0 else None
        self.repeats = repeats
        self.over = {}  # key -> (first-call seconds, where it was measured)
        self.thinned = []  # (key, where, first-call seconds, runs) of every thinned row, for the notes

    def runs(self, key, first_call_s: float, where: str) -> int:
        n = thinned_runs(first_call_s, self.repeats, self.budget_s)
        if n < self.repeats:
            self.thinned.append((key, where, first_call_s, n))
        if n == 0:
            self.over.setdefault(key, (first_call_s, where))
        return n

    def skip_reason(self, key) -> str | None:
        if key not in self.over:
            return None
        seconds, where = self.over[key]
        return f"time box: {seconds_text(seconds)} a call on the {where} row > budget {self.budget_s:g} s"

    def entry(self, runs: int, dtype_name: str) -> dict | None:
        """What a row keeps of a baseline thinned to ``runs`` timed calls (None: not thinned)."""
        if runs >= self.repeats:
            return None
        return {"budget_s": self.budget_s, "runs": runs, "slow_note": matrix_unit_note(dtype_name)}

    def describe(self) -> dict:
        return {"budget_s": self.budget_s, "repeats": self.repeats,
                "thinned": [{"key": list(k), "where": w, "first_call_s": s, "runs": n} for k, w, s, n in self.thinned]}


def seconds_text(x: float) -> str:
    """'62 s', '3.4 s', '0.27 s'."""
    return f"{x:.0f} s" if x >= 10 else f"{x:.2g} s"


def runs_label(stats: dict, repeats: int) -> str:
    """'' when a candidate got every timed call, else '1 run' / 'N runs' (a warm-up-only sample
    counts as 1 run) -- what the tables append to a thinned candidate's time."""
    n = stats.get("n", repeats)
    if n >= repeats and not stats.get("warmup_only"):
        return ""
    return "1 run" if n == 1 else f"{n} runs"


def time_box_notes(rows: list, names: dict, short: dict) -> list:
    """One line per thinned baseline, dtype and S, e.g. 'eager-mask bf16 S=4096: 1 run on the dense
    row (62 s a call, budget 10 s; no bf16 matrix unit ...); skipped on the gated 50% row; ...'.

    rows: the benchmark's row dicts (label, dtype, S; per baseline an entry with warmup_ms,
    repeats, n, time_box, or status "skipped" with a "time box" reason); names: {baseline key:
    display name}; short: {dtype name: short name}."""
    groups = {}
    for r in rows:
        for name in names:
            e = r.get(name) or {}
            key = (name, r["dtype"], r["S"])
            if e.get("time_box"):
                tb = e["time_box"]
                why = f"{seconds_text(e['warmup_ms'] / 1e3)} a call, budget {tb['budget_s']:g} s"
                if tb.get("slow_note"):
                    why += f"; {tb['slow_note']}"
                groups.setdefault(key, []).append(f"{runs_label(e, e['repeats'])} on the {r['label']} row ({why})")
            elif e.get("status") == "skipped" and str(e.get("reason", "")).startswith("time box"):
                groups.setdefault(key, []).append(f"skipped on the {r['label']} row")
    return [f"{names[name]} {short[dtype]} S={S}: " + "; ".join(parts) for (name, dtype, S), parts in groups.items()]


# ----------------------------------------------------------------------------------------------
# where results go


def add_output_args(parser) -> None:
    """--out-dir and --record, the same for every benchmark."""
    parser.add_argument("--record", action="store_true",
                        help="write the committed results under bench/results/ (make bench-record) instead of the "
                             "untracked bench/results/local/")
    parser.add_argument("--out-dir", default=None,
                        help="where the .md and .json go (default bench/results/local/, untracked; --record: "
                             "bench/results/)")


def shown_path(path: str) -> str:
    """A path as the scripts print it: relative to the repository when inside it."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def output_dir(args) -> str:
    """--out-dir if given, else bench/results/ with --record, else bench/results/local/; made if
    missing (a fresh clone has no local/)."""
    if getattr(args, "out_dir", None):
        path = os.path.abspath(args.out_dir)
    else:
        path = RECORD_DIR if getattr(args, "record", False) else LOCAL_DIR
    os.makedirs(path, exist_ok=True)
    return path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    mem = mem_available_bytes()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_parallel_info": _first_lines(torch.__config__.parallel_info(), 6),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mem_available_gib": None if mem is None else round(mem / 2**30, 1),
        "load_average_at_start": load_average(),
    }


def _first_lines(text: str, n: int) -> list:
    return [line.strip() for line in text.splitlines() if line.strip()][:n]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _text_line(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def text_table(header: list, rows: list) -> str:
    """A plain aligned table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    out = [_text_line(header, widths), "  ".join("-" * w for w in widths)]
    out += [_text_line(r, widths) for r in rows]
    return "\n".join(out)


class LiveTable:
    """A text table printed one row at a time, flushed, as each row is measured (a benchmark row
    can take minutes). Columns are as wide as the header or ``min_widths``; a longer cell shifts
    its line rather than being cut."""

    def __init__(self, header: list, min_widths: list | None = None, file=None):
        self.header = header
        self.widths = [max(len(str(h)), (min_widths or [0] * len(header))[i]) for i, h in enumerate(header)]
        self.file = file
        self.started = False

    def _print(self, text):
        print(text, file=self.file or sys.stdout, flush=True)

    def start(self):
        if not self.started:
            self._print(_text_line(self.header, self.widths))
            self._print("  ".join("-" * w for w in self.widths))
            self.started = True

    def row(self, cells: list):
        self.start()
        self._print(_text_line(cells, self.widths))


def markdown_table(header: list, rows: list) -> str:
    def esc(c):
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
