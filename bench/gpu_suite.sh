#!/usr/bin/env bash
# headops on a GPU machine: build the CUDA extension from source, run the CUDA tests, run
# compute-sanitizer on a small case, benchmark against SDPA and FlexAttention.
#
# For a machine with torch (CUDA build), nvcc and ninja preinstalled and no internet: nothing is
# installed; the extension is built in place (python/headops/_C*.so) against the torch there.
#   bash bench/gpu_suite.sh            # results under $OUT (default /tmp/headops_gpu)
# Environment: PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (nproc), OUT,
#              SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_BENCH=1.
# Every step runs even if an earlier one failed; the exit status is the number of failed steps.
# The whole suite may take more than 10 minutes on a fresh machine (build ~2-4 min, tests, two
# sanitizer passes, FlexAttention compiles): split it with the SKIP_* variables if needed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/headops_gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export HEADOPS_CUDA=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
failed=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nvcc --version | tail -1

if [ -z "${SKIP_BUILD:-}" ]; then
  step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  start=$(date +%s)
  if "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
    echo "built in $(( $(date +%s) - start )) s"
  else
    echo "BUILD FAILED (last lines of $OUT/build.log):"; tail -40 "$OUT/build.log"; failed=$((failed + 1))
  fi
  # registers and spills of the CUDA kernels (ptxas), and HMMA in the SASS
  # (the forward kernel, then the KV cache's decode and append kernels)
  for obj in $(find build -name forward_kernel.o | head -1) $(find build -path "*kvcache*" -name "*_kernel.o"); do
    echo "$obj:"
    cuobjdump -res-usage "$obj" 2>/dev/null | grep -E "Function|REG" | paste - - | sed 's/_ZN7headops[^ ]*_kernel_cu_[0-9a-f]*//' | head -20
    echo "HMMA instructions in SASS: $(cuobjdump -sass "$obj" 2>/dev/null | grep -c HMMA)"
  done
fi
"$PY" -c "import headops; assert headops._C.cuda_compiled, 'extension built without CUDA'; print('headops CUDA build ok')" \
  || { echo "headops import failed"; failed=$((failed + 1)); }

if [ -z "${SKIP_TESTS:-}" ]; then
  step "tests/test_attention_cuda.py tests/test_kvcache_cuda.py"
  "$PY" -m pytest tests/test_attention_cuda.py tests/test_kvcache_cuda.py -q -rf --maxfail=25 -p no:cacheprovider --junitxml="$OUT/test_cuda.xml" 2>&1 \
    | tee "$OUT/test_cuda.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
fi

if [ -z "${SKIP_SANITIZER:-}" ]; then
  step "compute-sanitizer memcheck (bench/cuda_sanitizer_case.py)"
  if command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 "$PY" bench/cuda_sanitizer_case.py \
      > "$OUT/sanitizer.log" 2>&1
    rc=$?
    tail -25 "$OUT/sanitizer.log"
    [ $rc -eq 0 ] || { echo "memcheck exit status $rc"; failed=$((failed + 1)); }
    compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 "$PY" bench/cuda_sanitizer_case.py \
      > "$OUT/racecheck.log" 2>&1
    rc=$?
    tail -8 "$OUT/racecheck.log"
    [ $rc -eq 0 ] || { echo "racecheck exit status $rc"; failed=$((failed + 1)); }
  else
    echo "compute-sanitizer not found"; failed=$((failed + 1))
  fi
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  step "benchmark (bench/attention_cuda.py)"
  "$PY" bench/attention_cuda.py --json "$OUT/attention_cuda.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^W[0-9]" \
    | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
fi

echo; echo "gpu_suite: $failed step(s) failed; logs in $OUT"
exit "$failed"
