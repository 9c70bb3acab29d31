#!/usr/bin/env bash
# headops on a GPU machine, in one call of at most ~8 minutes, in this order: build the CUDA
# extension, the GPU-specific tests (graph capture, no sync, streams, devices), the cache and
# placement tests, compute-sanitizer (memcheck, racecheck, synccheck) on one small call per kernel, the
# benchmarks, the decode step's profile (torch.profiler, Nsight Compute where ncu is found), then the
# long attention sweeps (forward, gradients) in whatever time is left.
#
# For a machine with torch (CUDA build), nvcc and ninja preinstalled and no internet (e.g. 16
# cores, one H200, python 3.12, torch 2.11 CUDA 13): nothing is installed; the extension is built
# in place (python/headops/_C*.so) against the torch there.
#   bash bench/gpu_suite.sh              # logs and results under $OUT (default /tmp/headops_gpu)
#   bash bench/gpu_suite.sh --dry-run    # the whole script on the CPU, here (no build, no sanitizer:
#                                        # the tests with HEADOPS_TEST_CUDA_DEVICE=cpu, benches --device cpu)
# Environment: PYTHON (python3; a dry run: .venv/bin/python where it exists), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16, at most nproc), OUT,
#              SUITE_BUDGET_S (470: no step starts past it, and every step's timeout is cut to it),
#              SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_BENCH=1.
# Every step runs under `timeout` (a hang costs its cap, not the device time) and even if an
# earlier one failed; everything printed also goes to $OUT/gpu_suite.log; a summary (per step:
# ok / FAILED / TIMEOUT / skipped, seconds) comes last. Exit status: the number of failed steps.
# Run on an H200: 2026-12-04 at e7f5b5a and at 4b8636b, 0 failed steps (README, docs/cuda.md).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run]"; exit 2 ;;
  esac
done
# the GPU machine's python3 has torch; here (a dry run) the project's .venv has it
if [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/headops_gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_suite.log") 2>&1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
cores=$(nproc)
export MAX_JOBS=${MAX_JOBS:-$(( cores < 16 ? cores : 16 ))}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export HEADOPS_CUDA=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${SUITE_BUDGET_S:-470}
SUITE_START=$(date +%s)
if [ "$DRY" = 1 ]; then
  export HEADOPS_TEST_CUDA_DEVICE=cpu HEADOPS_CASE_DEVICE=cpu
  BENCH_DEVICE=(--device cpu)
else
  BENCH_DEVICE=()
fi

names=(); results=(); seconds=()
failed=0
record() { names+=("$1"); results+=("$2"); seconds+=("$3"); }
skip() {  # skip NAME REASON
  echo; echo "=== $1: skipped ($2)"; record "$1" "skipped" 0
}
# run NAME CAP_S CMD...: the command under timeout (cut to what is left of the budget)
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - SUITE_START) ))
  if [ "$left" -lt 15 ]; then skip "$name" "suite budget of ${BUDGET} s spent"; failed=$((failed + 1)); return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo; echo "=== $name (cap ${cap} s; $(date -u +%H:%M:%S))"
  local start; start=$(date +%s)
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  local took=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then record "$name" "ok" "$took"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "--- $name: TIMEOUT after ${cap} s"; record "$name" "TIMEOUT" "$took"; failed=$((failed + 1))
  else echo "--- $name: exit status $rc"; record "$name" "FAILED" "$took"; failed=$((failed + 1)); fi
}

echo "=== machine ($( [ "$DRY" = 1 ] && echo "DRY RUN on the CPU" || echo GPU ))"
if [ "$DRY" = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
command -v nvcc > /dev/null && nvcc --version | tail -1

build() {
  "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  # registers and spills (ptxas) and HMMA in the SASS: the forward kernel, the cache's kernels
  for obj in $(find build -name forward_kernel.o | head -1) $(find build -path "*kvcache*" -name "*_kernel.o"); do
    echo "$obj:"
    cuobjdump -res-usage "$obj" 2>/dev/null | grep -E "Function|REG" | paste - - | sed 's/_ZN7headops[^ ]*_kernel_cu_[0-9a-f]*//' | head -12
    echo "HMMA instructions in SASS: $(cuobjdump -sass "$obj" 2>/dev/null | grep -c HMMA)"
  done
}
if [ "$DRY" = 1 ]; then skip "build" "dry run: the build already in place is used (no GPU here)"
elif [ -n "${SKIP_BUILD:-}" ]; then skip "build" "SKIP_BUILD"
else  # `timeout` runs programs, not shell functions: the function goes to a child bash
  export -f build; export PY OUT
  run "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)" 180 bash -c build; fi
if [ "$DRY" = 1 ]; then
  run "import" 60 "$PY" -c "import headops; print('headops imports; CUDA kernels compiled:', headops._C.cuda_compiled)"
else
  run "import" 60 "$PY" -c "import headops; assert headops._C.cuda_compiled, 'extension built without CUDA'; print('headops CUDA build ok')"
fi

PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
if [ -n "${SKIP_TESTS:-}" ]; then skip "tests" "SKIP_TESTS"
else
  # first the GPU-specific tests (graphs, no sync, streams, devices, kernel choice): short, and
  # the ones this suite exists for; then the sweeps
  A=tests/test_attention_cuda.py; K=tests/test_kvcache_cuda.py
  SPECIFIC=($A::test_forward_captured_in_a_cuda_graph $A::test_forward_with_host_planning_does_not_synchronise
            $A::test_kernel_parameter_upload_matches_the_pinned_copy $A::test_planning_arguments_on_the_host_match_the_device
            $A::test_inputs_not_modified_and_current_stream_used $A::test_non_default_device_index
            $A::test_alpha_d128_falls_back_to_generic_where_shared_memory_is_short $A::test_kernel_choice
            $A::test_gated_heads_are_not_computed $A::test_window_walks_only_visible_blocks
            $A::test_parameters_on_another_device_refused $A::test_device_sequence_ids_under_capture_are_refused_by_name
            $K::test_decode_step_is_capturable_in_a_cuda_graph $K::test_decode_step_does_not_synchronise
            $K::test_decode_step_with_host_gate_does_not_synchronise $K::test_whole_cache_decode_step_captured_in_a_cuda_graph)
  run "tests: graphs, no-sync, streams, devices" 90 "${PYTEST[@]}" "${SPECIFIC[@]}" --junitxml="$OUT/test_cuda_specific.xml"
  run "tests: cache, placement and probes" 150 "${PYTEST[@]}" tests/test_kvcache_cuda.py tests/test_cuda_placement.py \
    tests/test_probes_cuda.py --maxfail=20 \
    --junitxml="$OUT/test_kvcache_cuda.xml"
fi

if [ -n "${SKIP_SANITIZER:-}" ]; then skip "sanitizer" "SKIP_SANITIZER"
elif [ "$DRY" = 1 ]; then
  skip "compute-sanitizer memcheck" "dry run: compute-sanitizer needs a GPU"
  skip "compute-sanitizer racecheck" "dry run: compute-sanitizer needs a GPU"
  skip "compute-sanitizer synccheck" "dry run: compute-sanitizer needs a GPU"
  run "sanitizer case script (CPU, no sanitizer)" 60 "$PY" bench/cuda_sanitizer_case.py --small
elif ! command -v compute-sanitizer > /dev/null; then
  echo "compute-sanitizer not found"; record "compute-sanitizer" "FAILED" 0; failed=$((failed + 1))
else
  run "compute-sanitizer memcheck (one small call per kernel)" 75 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --print-limit 20 "$PY" bench/cuda_sanitizer_case.py --small
  run "compute-sanitizer racecheck (one small call per kernel)" 75 compute-sanitizer --tool racecheck --error-exitcode 9 \
    --print-limit 20 "$PY" bench/cuda_sanitizer_case.py --small
  run "compute-sanitizer synccheck (one small call per kernel)" 75 compute-sanitizer --tool synccheck --error-exitcode 9 \
    --print-limit 20 "$PY" bench/cuda_sanitizer_case.py --small
fi

if [ -n "${SKIP_BENCH:-}" ]; then skip "benchmarks" "SKIP_BENCH"
else
  if [ "$DRY" = 1 ]; then
    ATT=(--seq 256 --heads 4 --dim 64 --window 64 --repeats 2 --no-flex)
  else
    ATT=(--seq 8192 --heads 32 --dim 128 --window 1024 --repeats 10)
  fi
  run "bench: forward vs SDPA flash/cuDNN and FlexAttention" 100 "$PY" bench/attention_cuda.py "${BENCH_DEVICE[@]}" \
    "${ATT[@]}" --json "$OUT/attention_cuda.json"
  run "bench: decode vs SDPA over a dense cache (split_keys auto, 256, 1024)" 100 "$PY" bench/kvcache_cuda.py \
    "${BENCH_DEVICE[@]}" --split-keys auto,256,1024 --json "$OUT/kvcache_cuda.json"
  if [ "$DRY" = 1 ]; then PROBE=(--quick --repeats 2); else PROBE=(--device cuda --repeats 5); fi
  run "bench: probes (row blocks) vs the forward and eager statistics" 60 "$PY" bench/probe.py "${BENCH_DEVICE[@]}" \
    "${PROBE[@]}" --out-dir "$OUT"
  # where a decode step goes: host vs each kernel (torch.profiler), then Nsight Compute on one step's
  # decode kernel for a full and an all-streaming cache (occupancy, stalls, throughput)
  if [ "$DRY" = 1 ]; then PROFILE=(--device cpu); else PROFILE=(--contexts 32768); fi
  run "profile: a decode step, host vs kernels" 60 "$PY" bench/profile_decode_cuda.py "${PROFILE[@]}" \
    --split-keys auto,1024 --steps 20
  NCU_SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
                --section SchedulerStats --section MemoryWorkloadAnalysis)
  for kind in full "stream 100%"; do
    if [ "$DRY" = 1 ]; then
      run "decode steps for ncu ($kind; no ncu in a dry run)" 30 "$PY" bench/profile_decode_cuda.py "${PROFILE[@]}" \
        --for-profiler "$kind" --steps 5 --split-keys 1024
    elif command -v ncu > /dev/null; then
      run "ncu: the decode kernel, 32k, $kind" 60 ncu --kernel-name regex:key_split --launch-skip 3 --launch-count 1 \
        "${NCU_SECTIONS[@]}" "$PY" bench/profile_decode_cuda.py --for-profiler "$kind" --steps 5 --contexts 32768 \
        --split-keys 1024
    else
      skip "ncu: the decode kernel, $kind" "ncu not found"
    fi
  done
fi

# last, the long sweeps (whatever the budget leaves them): the forward, then the gradients
if [ -n "${SKIP_TESTS:-}" ]; then skip "tests: attention sweep" "SKIP_TESTS"
else
  FWD=(-k "not grads and not backward"); BWD=(-k "grads or backward")
  if [ "$DRY" = 1 ]; then  # the three largest sweeps take ~3 of the file's ~4 minutes on 2 CPU cores
    echo "(dry run: the forward sweep without test_plain/test_feature/test_low_precision; the whole file:"
    echo " HEADOPS_TEST_CUDA_DEVICE=cpu pytest tests/test_attention_cuda.py)"
    FWD=(-k "not grads and not backward and not test_plain and not test_feature and not test_low_precision")
  fi
  run "tests: attention forward sweep" 120 "${PYTEST[@]}" tests/test_attention_cuda.py --maxfail=25 "${FWD[@]}" \
    --junitxml="$OUT/test_attention_cuda_fwd.xml"
  run "tests: attention gradients" 100 "${PYTEST[@]}" tests/test_attention_cuda.py --maxfail=25 "${BWD[@]}" \
    --junitxml="$OUT/test_attention_cuda_bwd.xml"
fi

echo
echo "=== summary ($( [ "$DRY" = 1 ] && echo "DRY RUN on the CPU: nothing ran on a GPU" || echo GPU ); $(( $(date +%s) - SUITE_START )) s in all; logs in $OUT)"
for i in "${!names[@]}"; do printf '%-8s %5s s  %s\n' "${results[$i]}" "${seconds[$i]}" "${names[$i]}"; done
echo "gpu_suite: $failed step(s) failed"
exit "$failed"
