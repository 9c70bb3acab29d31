"""The examples under examples/ run (in their small --tiny configuration: a tiny random model)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("example, expected", [
    ("head_importance.py", "most important (layer, head)"),
    ("head_masking.py", "similarity"),
    ("lofit_training.py", "loss before"),
])
def test_example_runs(example, expected):
    proc = subprocess.run([sys.executable, os.path.join("examples", example), "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expected in proc.stdout
