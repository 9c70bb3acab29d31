"""Real English text available offline, for measurements that need natural language but no
download: the docstrings of Python standard library modules. (Offline text for long-context
tasks belongs here too.)"""

from __future__ import annotations

import importlib
import inspect
import sys

STDLIB_MODULES = ("collections", "functools", "itertools", "json", "pathlib", "re", "string", "textwrap",
                  "argparse", "logging", "heapq", "bisect", "statistics", "fractions", "decimal", "datetime")


def stdlib_text() -> str:
    """The docstrings of the STDLIB_MODULES and of their own functions and classes, joined by blank lines."""
    parts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def stdlib_source() -> str:
    """Where stdlib_text comes from, in words (results print it: the text depends on the Python version)."""
    return f"docstrings of the Python {sys.version.split()[0]} standard library modules {', '.join(STDLIB_MODULES)}"
