"""The CPU kernel is compiled once per instruction set; the suite's main run exercises only the
one this machine picks. Here the correctness sweep runs again under each other variant (ATen's
ATEN_CPU_CAPABILITY override, plain AVX-512 for bfloat16 instead of AVX512-BF16, tiles through
BLAS where this CPU runs them through brgemm, float tiles through brgemm at every row count, and
bfloat16 AMX tiles through oneDNN's brgemm where headops runs its own AMX loops): the attention
kernel's tests, its backward's, the 16-bit property tests and the decode kernel's."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import headops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
BEST = AVAILABLE.get(headops._C.cpu_capability(), 0)
# every attention-kernel test, the probe kernel's, the 16-bit property tests, and the decode kernel's
# comparisons with full attention in each dtype, with every per-head argument, over budget heads'
# kept sets and across many segments
DECODE_TESTS = ["test_decode_matches_full_attention_with_per_head_args", "test_decode_lower_precision",
                "test_decode_lower_precision_head_dims",
                "test_budget_heads_equal_attention_over_the_kept_set", "test_decode_across_many_segments"]
SWEPT_DECODE = [os.path.join(ROOT, "tests", "test_kvcache.py") + "::" + name for name in DECODE_TESTS]
SWEPT = [os.path.join(ROOT, "tests", name) for name in ("test_attention_cpu.py", "test_autograd.py", "test_probes.py",
                                                          "test_properties_half.py")] + SWEPT_DECODE


def run_sweep(env_extra, expect, swept=SWEPT, probe="headops._C.cpu_capability()"):
    env = dict(os.environ, **env_extra)
    # the headops this run imported (python/, or build-asan/pkg under make test-asan)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(headops.__file__)))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    seen = subprocess.run([sys.executable, "-c", f"import headops, torch; print({probe})"], env=env,
                          capture_output=True, text=True, check=True)
    # the switch reached the kernel's choice (a sweep under an ignored switch would prove nothing)
    assert seen.stdout.strip() == expect
    # inductor's on-disk FX graph cache does not key on the vector ISA that ATEN_CPU_CAPABILITY
    # makes it pick: a graph cached by a run at another capability comes back with the other
    # vector width (on the AVX512-BF16 EPYC, AVX2 forced, the compiled training step's loss was
    # 383.8 against eager's 1163.2, and plain SDPA compiled at AVX512 after an AVX2 run corrupted
    # the heap). Each sweep therefore compiles into its own cache.
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + swept,
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


def test_tiles_through_blas_instead_of_brgemm():
    """HEADOPS_CPU_NO_PACKED=1: the path of CPUs without brgemm tiles (AVX2; AVX-512 without BF16
    for bfloat16/float16, whose tiles are converted to float): float tiles through BLAS sgemm, on
    a CPU whose float (AVX-512) or 16-bit tiles run through brgemm."""
    if not any(headops._C.cpu_uses_packed_operands(dtype, 64) for dtype in (torch.float32, torch.bfloat16,
                                                                             torch.float16)):
        pytest.skip("this CPU runs every tile through BLAS already")
    run_sweep({"HEADOPS_CPU_NO_PACKED": "1"}, headops._C.cpu_capability())



def test_bfloat16_amx_tiles_through_onednn():
    """HEADOPS_CPU_AMX_BY_ONEDNN=1: bfloat16 tiles through oneDNN's brgemm (as float16's always
    are) on a CPU where headops runs them through its own AMX loops (csrc/cpu/amx_tiles.h)."""
    if not headops._C.cpu_runs_own_amx_tiles(torch.bfloat16, 64):
        pytest.skip("this CPU runs no AMX tiles of headops' own")
    run_sweep({"HEADOPS_CPU_AMX_BY_ONEDNN": "1"}, "False", probe="headops._C.cpu_runs_own_amx_tiles(torch.bfloat16, 64)")


def test_float_tiles_packed_from_the_first_row():
    """HEADOPS_CPU_FLOAT_PACKING_ROWS=1: float tiles through brgemm on packed operands at every row
    count, where this CPU sends calls with fewer rows per key than float_packing_rows to BLAS (on
    an Intel CPU with MKL, the backward packs only from 512 rows per key, which few test shapes
    reach)."""
    if not headops._C.cpu_uses_packed_operands(torch.float32, 64):
        pytest.skip("this CPU runs no float tiles through brgemm")
    run_sweep({"HEADOPS_CPU_FLOAT_PACKING_ROWS": "1"}, "(1, 1)",
              probe="(headops._C.cpu_float_packing_rows(False), headops._C.cpu_float_packing_rows(True))")
