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
    ("lofit_training.py --packed 3", "3 pieces flattened into one row"),
    ("batched_generation.py", "as recomputing without a cache"),
    ("attention_rows.py", "output_attentions would hold"),
    ("headkv_compression.py", "SnapKV, 48 tokens every KV head: "),
    ("first_token_scaling.py", "heads by their gradient"),
])
def test_example_runs(example, expected):
    script, *options = example.split()
    proc = subprocess.run([sys.executable, os.path.join("examples", script), "--tiny", *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expected in proc.stdout


def test_tensor_parallel_example_runs_on_two_ranks(capfd, tmp_path):
    """examples/tensor_parallel.py --tiny in 2 processes with torchrun's environment (run_ranks)."""
    import importlib

    from transformers import AutoModelForCausalLM

    from headops.testing import run_ranks, tiny_llama

    # what the ranks import, imported once here: forked, they start with it (not 2 imports at once)
    tiny_llama()[0].save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path)
    importlib.import_module("torch.distributed.tensor")

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import tensor_parallel
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    assert run_ranks(lambda rank: tensor_parallel.main(["--tiny", "--new-tokens", "4"]), 2) == [0, 0]
    out = capfd.readouterr().out
    assert "rank 1: 2 of 4 query heads and 1 of 2 KV heads per layer" in out
    assert "whole model's cache" in out and "held over 2 ranks" in out
