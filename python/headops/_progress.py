"""Progress over an iterable on stderr: a tqdm bar where tqdm is installed, else a plain counter."""

from __future__ import annotations

import sys


def progress(iterable, *, desc: str, total: int | None = None, enabled: bool = True):
    """`iterable`, reporting each item done on stderr (nothing when enabled is False)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return _counted(iterable, desc, total if total is not None else len(iterable))
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr)


def _counted(iterable, desc, total):
    for done, item in enumerate(iterable, 1):
        yield item
        print(f"\r{desc}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
