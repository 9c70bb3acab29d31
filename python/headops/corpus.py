"""Real English text available offline, for measurements that need natural language but no
download: the docstrings of Python standard library modules, and the pieces of the offline
long-context tasks (headops.tasks): the passkey literature's repeated filler and a word list."""

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


# The filler of the passkey retrieval test (Mohtashami & Jaggi 2023, "Landmark Attention"),
# repeated as often as a context needs.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# Plain English words for the keys and values of the tasks' needles (RULER draws keys from a
# word list, DuoAttention's passkeys are random words): fixed here, so prompts do not depend on
# the Python version as stdlib_text does.
WORDS = tuple("""
apple arrow badge basket beacon blanket bottle bridge bucket butter cabin camera candle canvas carpet castle
cedar chalk cherry circle cloud coffee copper cotton crystal dragon eagle ember engine falcon feather fence
forest fossil garden ginger glacier granite guitar hammer harbor helmet honey island ivory jacket jungle kettle
ladder lantern lemon letter marble meadow mirror monkey needle orange orchid oyster paddle palace pepper pillow
planet pocket puzzle rabbit ribbon river rocket saddle salmon silver spider stone sugar summer tiger timber
tomato tunnel turtle velvet violin wagon walnut whistle window winter wizard yellow zebra anchor breeze canyon
desert harvest lagoon meteor nectar parrot quartz shadow thunder valley
""".split())
