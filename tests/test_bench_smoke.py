"""Smoke tests of the CPU benchmarks: the quick presets run, checks pass, results are written; the
time box (bench/timing.py), the live table, and where results go (bench/results/local/ unless
--record; make demo leaves git status clean)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_attention_cpu_quick(tmp_path):
    _run("bench/attention_cpu.py", "--quick", "--no-flex", "--repeats", "2", "--out-dir", str(tmp_path))

    md = tmp_path / "attention_cpu_quick.md"
    js = tmp_path / "attention_cpu_quick.json"
    assert md.is_file() and js.is_file(), sorted(p.name for p in tmp_path.iterdir())
    assert "headops/SDPA" in md.read_text()

    data = json.loads(js.read_text())
    assert data["complete"] and data["checks_ok"]
    assert data["machine"]["torch"] and data["command"] and data["date"]
    rows = data["rows"]
    assert {(r["scenario"], r["dtype"]) for r in rows} == {
        (s, d) for s in ("dense", "gated", "stream") for d in ("float32", "bfloat16")}
    for r in rows:
        assert r["check"]["ok"], r["check"]
        for name in ("headops", "sdpa", "eager_ref", "eager_mask"):
            assert r[name]["status"] == "ok", (name, r[name])
            assert r[name]["n"] == 2 and r[name]["median_ms"] > 0
        assert r["flex"]["status"] == "off"
        assert r["ratios"]["headops_over_sdpa"] > 0


def test_attention_cpu_train_quick(tmp_path):
    _run("bench/attention_cpu_train.py", "--quick", "--repeats", "2", "--memory-s", "2048",
         "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "attention_cpu_train_quick.json").read_text())
    assert "headops/SDPA" in (tmp_path / "attention_cpu_train_quick.md").read_text()
    assert {r["scenario"] for r in data["rows"]} == {"dense", "stream", "importance", "duo", "calibrate"}
    for r in data["rows"]:
        assert r["check"]["ok"], r["check"]
        # a mask cannot express duo's alpha mixing or calibrate's sink logit and scale
        baselines = ("eager_ref",) if r["scenario"] in ("duo", "calibrate") else ("eager_ref", "eager_mask")
        assert ("eager_mask" in r) == ("eager_mask" in baselines)
        for name in ("headops", "sdpa") + baselines:
            assert r[name]["n"] == 2 and r[name]["median_ms"] > 0
    memory = data["memory"]
    assert memory["finite"] and memory["S"] == 2048
    # O(S * D): a handful of q-sized tensors, far below one S x S matrix per head
    assert 0 < memory["growth_bytes"] < 16 * memory["heads"] * memory["S"] * 128 * 4


def test_kvcache_quick(tmp_path):
    _run("bench/kvcache.py", "--quick", "--repeats", "2", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "kvcache_quick.json").read_text())
    assert len(data["rows"]) == 2 * 2 * 3  # dtypes x contexts x head mixes
    for r in data["rows"]:
        assert r["check"]["ok"], r["check"]
        assert r["headops_ms_per_step"] > 0 and r["sdpa_ms_per_step"] > 0
        # the memory passes are timed with each row's steps, so each row has its own yardsticks
        assert r["copy_gb_s"] > 0 and r["read_pass_gb_s"] > 0
        assert r["read_vs_copy"] == pytest.approx(r["read_gb_s"] / r["copy_gb_s"])
    for m in data["memory"]:
        assert m["nbytes_over_ideal"] < 1.02 and m["rss_growth"] < 1.1 * m["nbytes"]
        # 2 of 8 KV heads full, the others sinks 4 + window 1024: below the dense cache once the
        # context passes the window
        assert m["nbytes"] < (0.7 if m["context"] <= 2048 else 0.4) * m["dense"]


def test_cpu_targets_quick(tmp_path):
    _run("bench/cpu_targets.py", "--quick", "--compare-tiles", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "cpu_targets_quick.json").read_text())
    assert data["kind"] in ("amx", "avx2", "avx512", "avx2-variant-on-avx512")
    assert not data["judged"] and {t["verdict"] for t in data["targets"]} == {"not judged"}
    # fp32 and bf16: forward and forward+backward at S = 256, forward at 512
    assert len(data["attention"]) == 6 and all(r["ratio"] > 0 for r in data["attention"])
    assert len(data["decode"]) == 2 * 2 * 3  # dtypes x contexts x head mixes
    for t in data["targets"]:
        assert t["worst_row"] in data["measured"]
    md = (tmp_path / "cpu_targets_quick.md").read_text()
    assert "| target (issue 17) |" in md and "| of read pass |" in md and "of the same rounds' read pass" in md
    # the bf16 rows with float32 tiles through BLAS instead of brgemm, where this CPU has brgemm
    import headops
    import torch
    if headops._C.cpu_uses_packed_operands(torch.bfloat16, 128):
        assert [(r["pass"], r["S"]) for r in data["bf16_float32_tiles"]] == [("forward", 256), ("fwd+bwd", 256)]
        assert all(r["ratio"] > 0 for r in data["bf16_float32_tiles"])
    else:
        assert data["bf16_float32_tiles"] == []


def test_cpu_targets_judge_the_worst_row():
    _timing()  # puts the repository on sys.path
    from bench import cpu_targets

    ceiling = cpu_targets.Target("ratio", 0.9, True, ["a", "b"])
    assert ceiling.worst({"a": 0.8, "b": 0.95}) == 0.95 and not ceiling.met({"a": 0.8, "b": 0.95})
    assert ceiling.met({"a": 0.8, "b": 0.9})
    floor = cpu_targets.Target("bandwidth", 0.6, False, ["a", "b"])
    assert floor.worst({"a": 0.59, "b": 0.9}) == 0.59 and not floor.met({"a": 0.59, "b": 0.9})
    assert floor.met({"a": 0.6, "b": 0.9})
    # judged from the flags and the ATen variant given, not from the machine the test runs on (before, an
    # AVX2-only machine's own variant made the AMX flags read as "the AVX2 variant on an AVX-512 CPU")
    assert cpu_targets.machine_kind(["avx2", "avx512f", "amx_bf16"], "AVX512") == "amx"
    assert cpu_targets.machine_kind(["avx2", "avx512f", "amx_bf16"], "AVX2") == "avx2-variant-on-avx512"
    assert cpu_targets.machine_kind(["avx2", "avx512f"], "AVX512") == "avx512"
    assert cpu_targets.machine_kind(["avx2"], "AVX2") == "avx2"
    # the decode rows against the read pass: the worst row named, the copy's range beside it
    rows = [{"dtype": "float32", "context": 32768, "mix": "all full", "read_vs_read_pass": 0.8, "copy_gb_s": 25.0},
            {"dtype": "bfloat16", "context": 131072, "mix": "25% full", "read_vs_read_pass": 0.55, "copy_gb_s": 35.0}]
    line = cpu_targets.read_pass_line(rows)
    assert ">= 55% of the same rounds' read pass" in line and "bf16 131072 25% full" in line and "25.0-35.0" in line
    keys = cpu_targets.attention_keys(2048, 4096)
    avx2 = cpu_targets.targets_for("avx2", keys, ["decode row"], 2048, 4096)
    # the AVX2-only machine: every forward and forward+backward row at 2048, both dtypes
    assert sorted(avx2[0].keys) == sorted(keys[(d, p, 2048)] for d in ("float32", "bfloat16")
                                          for p in ("forward", "fwd+bwd"))
    assert [t.bound for t in avx2] == [1.0, 0.60]
    assert [t.bound for t in cpu_targets.targets_for("amx", keys, ["decode row"], 2048, 4096)] == [0.9, 0.9, 0.8, 1.02,
                                                                                                   0.70]


def test_probe_quick(tmp_path):
    _run("bench/probe.py", "--quick", "--repeats", "2", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "probe.json").read_text())
    assert {r["dtype"] for r in data["kernel"]} == {"float32", "bfloat16"}
    assert all(r["probes_ratio"] > 0 and r["key_mass_ratio"] > 0 for r in data["kernel"])
    for r in data["smollm2_shapes"]:
        assert r["check"]["ok"], r["check"]


def test_packed_quick(tmp_path):
    """bench/packed.py: every candidate's output checked against the SDPA loop, each pass timed."""
    _run("bench/packed.py", "--quick", "--no-flex", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "packed.json").read_text())
    assert sum(data["lengths"]) == 512
    assert {(r["dtype"], r["kind"]) for r in data["results"]} == {
        (d, k) for d in ("float32", "bfloat16") for k in ("forward", "fwd+bwd")}
    assert all(r["ms"]["headops"]["median_ms"] > 0 for r in data["results"])


def test_ratio_vs_sdpa_prints_every_row():
    stdout = _run("bench/ratio_vs_sdpa.py", "--s", "64", "--heads", "2", "--repeats", "1")
    rows = [line.split() for line in stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("float32", "forward"), ("float32", "fwd+bwd"), ("bfloat16", "forward"),
                                            ("bfloat16", "fwd+bwd")]
    assert all(float(r[-1]) > 0 for r in rows)


# ----------------------------------------------------------------------------------------------
# issue 17: a demo that finishes anywhere -- the time box, live rows, results untracked by default


def _timing():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import timing
    return timing


def _run(script, *args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_thinned_runs_and_spread_rounds():
    timing = _timing()
    assert timing.thinned_runs(1.0, 5, 10.0) == 5  # all fit
    assert timing.thinned_runs(3.0, 5, 10.0) == 3
    assert timing.thinned_runs(11.0, 5, 10.0) == 0  # not even one: the warm-up is the sample
    assert timing.thinned_runs(100.0, 5, None) == timing.thinned_runs(100.0, 5, 0) == 5  # no limit
    assert timing.spread_rounds(1, 5) == {2}
    assert timing.spread_rounds(2, 5) == {1, 3}
    assert timing.spread_rounds(3, 5) == {0, 2, 4}
    assert timing.spread_rounds(5, 5) == set(range(5))


def test_interleaved_thinned_and_warmup_only():
    timing = _timing()
    calls = {"a": 0, "b": 0, "c": 0}

    def counter(name):
        def call():
            calls[name] += 1
        return call

    stats = timing.interleaved({n: counter(n) for n in calls}, 5, runs={"b": 2, "c": 0}, warmups={"c": 1.5})
    assert calls == {"a": 5, "b": 2, "c": 0}
    assert stats["a"].n == 5 and not stats["a"].warmup_only
    assert stats["b"].n == 2
    assert stats["c"].n == 1 and stats["c"].warmup_only and stats["c"].median_ms == 1500.0
    assert timing.runs_label(stats["a"].as_dict(), 5) == ""
    assert timing.runs_label(stats["b"].as_dict(), 5) == "2 runs"
    assert timing.runs_label(stats["c"].as_dict(), 5) == "1 run"
    with pytest.raises(ValueError, match="warm-up"):
        timing.interleaved({"c": counter("c")}, 3, runs={"c": 0})


def test_time_box_skips_later_rows_after_an_over_budget_call():
    timing = _timing()
    box = timing.TimeBox(10.0, 5)
    key = ("eager_mask", "bfloat16", 4096)
    assert box.skip_reason(key) is None
    assert box.runs(key, 1.0, "dense bf16 S=4096") == 5 and box.entry(5, "bfloat16") is None
    assert box.skip_reason(key) is None
    assert box.runs(key, 4.0, "dense bf16 S=4096") == 2 and box.skip_reason(key) is None
    assert box.runs(key, 62.0, "dense bf16 S=4096") == 0
    assert "62 s a call on the dense bf16 S=4096 row" in box.skip_reason(key)
    assert box.skip_reason(("eager_mask", "float32", 4096)) is None  # other dtypes unaffected
    assert box.entry(0, "bfloat16")["runs"] == 0
    unlimited = timing.TimeBox(0, 5)
    assert unlimited.runs(key, 1e6, "x") == 5 and unlimited.skip_reason(key) is None
    # the explanation comes from the CPU flags; the decision never does
    assert timing.matrix_unit_note("bfloat16", ["avx2"]).startswith("no bf16 matrix unit")
    assert timing.matrix_unit_note("bfloat16", ["avx2", "amx_bf16"]) == ""
    assert timing.matrix_unit_note("float32", []) == ""


def test_live_table_prints_each_row_when_given():
    import io

    timing = _timing()
    out = io.StringIO()
    table = timing.LiveTable(["scenario", "ms"], [10, 0], file=out)
    table.row(["dense", "1.0"])
    first = out.getvalue().splitlines()
    assert len(first) == 3 and first[0].startswith("scenario") and first[2].split() == ["dense", "1.0"]
    table.row(["gated 50%", "12.5"])
    assert len(out.getvalue().splitlines()) == 4  # the header is printed once


def test_results_go_to_an_untracked_dir_unless_recorded():
    import argparse

    timing = _timing()
    p = argparse.ArgumentParser()
    timing.add_output_args(p)
    assert timing.output_dir(p.parse_args([])) == str(ROOT / "bench" / "results" / "local")
    assert timing.output_dir(p.parse_args(["--record"])) == str(ROOT / "bench" / "results")
    assert timing.output_dir(p.parse_args(["--record", "--out-dir", "/tmp/x"])) == "/tmp/x"
    if (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "bench/results/local/attention_cpu_default.json"],
                                 cwd=ROOT)
        assert ignored.returncode == 0, "bench/results/local/ must be ignored by git"


def test_make_demo_writes_no_tracked_results_and_bench_record_does():
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make not installed")

    def dry(target):
        proc = subprocess.run(["make", "-n", "-o", "build", target], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stdout.splitlines() if line.startswith(".venv/bin/python bench/")]

    demo = dry("demo")
    assert {line.split()[1] for line in demo} == {"bench/attention_cpu.py", "bench/attention_cpu_train.py",
                                                  "bench/kvcache.py"}
    assert not any("--record" in line or "--out-dir" in line for line in demo)
    record = dry("bench-record")
    assert len(record) == 3 and all(line.rstrip().endswith("--record") for line in record)


def test_attention_cpu_time_box(tmp_path):
    """A budget no baseline fits: eager ref and eager-mask get their warm-up call as the only
    sample on the first row and are skipped on the next; headops and SDPA keep every call; each
    row's table line is printed."""
    stdout = _run("bench/attention_cpu.py", "--quick", "--no-flex", "--repeats", "2", "--dtypes", "float32",
                  "--scenarios", "dense,gated", "--baseline-budget", "1e-9", "--out-dir", str(tmp_path))
    rows = json.loads((tmp_path / "attention_cpu_quick-custom.json").read_text())["rows"]
    dense, gated = rows
    for r in rows:
        assert r["check"]["ok"], r["check"]
        for name in ("headops", "sdpa"):
            assert r[name]["n"] == 2 and not r[name]["warmup_only"]
    for name in ("eager_ref", "eager_mask"):
        assert dense[name]["status"] == "ok" and dense[name]["n"] == 1 and dense[name]["warmup_only"]
        assert dense[name]["median_ms"] == dense[name]["warmup_ms"]
        assert dense[name]["time_box"]["runs"] == 0
        assert gated[name]["status"] == "skipped" and gated[name]["reason"].startswith("time box")
    assert dense["ratios"]["eager_mask_over_headops"] > 0
    lines = stdout.splitlines()
    assert any(line.startswith("dense") and "(1 run)" in line for line in lines), stdout
    assert any(line.startswith("gated 50%") and "skipped (time box)" in line for line in lines), stdout
    assert "time box" in stdout
    md = (tmp_path / "attention_cpu_quick-custom.md").read_text()
    assert "(1 run)" in md and "skipped (time box)" in md


def test_attention_cpu_train_time_box(tmp_path):
    stdout = _run("bench/attention_cpu_train.py", "--quick", "--repeats", "2", "--memory-s", "0",
                  "--rows", "dense:float32:256,stream:float32:256", "--baseline-budget", "1e-9",
                  "--out-dir", str(tmp_path))
    dense, stream = json.loads((tmp_path / "attention_cpu_train_quick.json").read_text())["rows"]
    for r in (dense, stream):
        assert r["check"]["ok"], r["check"]
        assert r["headops"]["n"] == 2 and r["sdpa"]["n"] == 2
    for name in ("eager_ref", "eager_mask"):
        assert dense[name]["n"] == 1 and dense[name]["warmup_only"]
        assert stream[name]["status"] == "skipped" and stream[name]["reason"].startswith("time box")
    assert any(line.startswith("dense") and "(1 run)" in line for line in stdout.splitlines()), stdout
    assert "skipped (time box)" in (tmp_path / "attention_cpu_train_quick.md").read_text()


def test_attention_cpu_train_max_s_leaves_rows_out():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "bench/attention_cpu_train.py", "--quick", "--max-s", "128"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no row of the quick preset left" in proc.stderr, proc.stderr


def test_learnt_sums_cost_quick():
    stdout = _run("bench/learnt_sums_cost.py", "--s", "128", "--repeats", "2")
    rows = [line.split() for line in stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["sink_logit", "softmax_scale", "key_bias", "alpha"]
    for r in rows:
        assert all(float(x) > 0 for x in r[1:4]) and r[4].endswith("x") and r[5].endswith("x")


def test_value_head_dim_quick(tmp_path):
    """bench/value_head_dim.py: every candidate's output checked against SDPA, each pass timed."""
    _run("bench/value_head_dim.py", "--quick", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "value_head_dim.json").read_text())
    assert (data["dim"], data["value_dim"]) == (192, 128)
    assert {(r["dtype"], r["kind"]) for r in data["results"]} == {
        (d, k) for d in ("float32", "bfloat16") for k in ("forward", "fwd+bwd")}
    assert all(r["ms"][n]["median_ms"] > 0 for r in data["results"] for n in ("headops", "SDPA", "SDPA padded"))
