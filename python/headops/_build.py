"""What the compiled extension was built with (python/headops/_build_info.py, written by setup.py),
and the check that the torch importing it is the one it was compiled against."""

from __future__ import annotations


def build_info() -> dict | None:
    """setup.py's record of the build (torch version, CUDA archs or why none), or None when the
    extension was built without it (an older build tree)."""
    try:
        from ._build_info import BUILD
    except ImportError:
        return None
    return dict(BUILD)


def check_torch(torch_version: str) -> None:
    """An ImportError naming both versions when the extension was compiled against another torch
    (its C++ ABI is torch's: loading it would fail with undefined symbols, or worse, not fail)."""
    info = build_info()
    if info is not None and info["torch_version"] != torch_version:
        raise ImportError(f"headops: its kernels were compiled against torch {info['torch_version']}, but this is torch "
                          f"{torch_version}; rebuild headops against this torch (`pip install --no-build-isolation .` "
                          "or `make build`)")
