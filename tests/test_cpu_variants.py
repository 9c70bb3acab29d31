"""The CPU kernel is compiled once per instruction set; the suite's main run exercises only the
one this machine picks. Here the correctness sweep runs again under each other variant (ATen's
ATEN_CPU_CAPABILITY override, and plain AVX-512 for bfloat16 instead of AVX512-BF16): the attention
kernel's tests and the decode kernel's."""

import os
import subprocess
import sys

import pytest

import headops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
BEST = AVAILABLE.get(headops._C.cpu_capability(), 0)
# every attention-kernel test, and the decode kernel's comparisons with full attention in each
# dtype, with every per-head argument and over budget heads' kept sets
DECODE_TESTS = ["test_decode_matches_full_attention_with_per_head_args", "test_decode_lower_precision",
                "test_decode_lower_precision_head_dims",
                "test_budget_heads_equal_attention_over_the_kept_set"]
SWEPT = [os.path.join(ROOT, "tests", "test_attention_cpu.py")] + [
    os.path.join(ROOT, "tests", "test_kvcache.py") + "::" + name for name in DECODE_TESTS]


def run_sweep(env_extra, expect_capability):
    env = dict(os.environ, **env_extra)
    # the headops this run imported (python/, or build-asan/pkg under make test-asan)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(headops.__file__)))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    probe = subprocess.run([sys.executable, "-c", "import headops; print(headops._C.cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == expect_capability
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + SWEPT,
                          env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_sweep_under_lower_instruction_sets(capability):
    if AVAILABLE[capability] >= BEST:
        pytest.skip(f"{capability} is already what this machine runs")
    run_sweep({"ATEN_CPU_CAPABILITY": capability.lower()}, capability)


def test_bfloat16_without_the_avx512_bf16_variant():
    if headops._C.cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 machine")
    run_sweep({"HEADOPS_CPU_NO_BF16_VARIANT": "1"}, "AVX512")
