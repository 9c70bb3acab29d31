"""Where the commands write: <out>.csv always, <out>.png unless --no-plot."""

from __future__ import annotations

import csv
import os


def write_csv(path: str, header: list, rows: list) -> None:
    """rows: lists in the order of header."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def say_written(out: str, plotted: bool) -> None:
    print(f"wrote {out}.csv and {out}.png" if plotted else f"wrote {out}.csv")
