"""Work counters of the kernels: how much work a call really did (the cost contract in numbers)."""

from __future__ import annotations

import contextlib
import dataclasses

from . import _C


@dataclasses.dataclass
class WorkCounts:
    """Work done by headops kernels since the last reset (all threads together).

    work_items: (batch, query head, query tile) items computed.
    key_blocks: key blocks loaded and multiplied with a query tile (one q.k^T tile product each).
    score_elements: query-key dot products computed.
    value_blocks: P.V tile products (a head under alpha uses two per key block it shares).
    heads_skipped: (batch, head) pairs never computed because their gate is exactly 0.
    gradient_elements: (query, key) pairs the CPU backward's dK and dV products reduce over
        (counted once per key block for the two; the CUDA backward does not count them).
    """

    work_items: int = 0
    key_blocks: int = 0
    score_elements: int = 0
    value_blocks: int = 0
    heads_skipped: int = 0
    gradient_elements: int = 0


def work_counters() -> WorkCounts:
    return WorkCounts(*_C.work_counters())


def reset_work_counters() -> None:
    _C.reset_work_counters()


@contextlib.contextmanager
def count_work():
    """``with headops.count_work() as w: ...``; w holds the counts of the block when it ends."""
    reset_work_counters()
    counts = WorkCounts()
    try:
        yield counts
    finally:
        for field, value in dataclasses.asdict(work_counters()).items():
            setattr(counts, field, value)
