"""Shared helpers of the headops benchmarks: timing, statistics, machine description, tables.

Timing protocol (what every benchmark here relies on):
- each candidate is called once before timing (warm-up; benchmarks keep that call's output for
  their correctness checks), then timed ``repeats`` times;
- the timed calls are *interleaved* (round-robin, alternating direction every round), so that
  drift on a shared machine (another process, thermal or frequency changes) hits every
  candidate alike and ratios measured in the same run stay meaningful;
- the statistic is the median; min and quartiles are kept in the raw results.
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

    @classmethod
    def of(cls, seconds: list) -> "Stats":
        ms = [s * 1e3 for s in seconds]
        ordered = sorted(ms)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ms), [round(x, 4) for x in ms])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_call(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds taken by one call of fn, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(candidates: dict, repeats: int) -> dict:
    """Times every candidate ``repeats`` times, round-robin; returns {name: Stats}.

    The garbage collector is off during the rounds (collected between rounds), and results are
    dropped right after each call so that one candidate's outputs do not inflate the next's
    allocations.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(candidates)
    samples = {name: [] for name in names}
    was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            gc.collect()
            gc.disable()
            for name in (names if r % 2 == 0 else names[::-1]):
                seconds, result = time_call(candidates[name])
                del result
                samples[name].append(seconds)
            if was_enabled:
                gc.enable()
    finally:
        if was_enabled:
            gc.enable()
    return {name: Stats.of(s) for name, s in samples.items()}


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


def text_table(header: list, rows: list) -> str:
    """A plain aligned table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(header: list, rows: list) -> str:
    def esc(c):
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
