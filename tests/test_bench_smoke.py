"""Smoke test of the CPU attention benchmark: the quick preset runs, checks pass, results are written."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_cpu_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "bench/attention_cpu.py", "--quick", "--no-flex", "--repeats", "2",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "bench/attention_cpu_train.py", "--quick", "--repeats", "2", "--memory-s", "2048",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "attention_cpu_train_quick.json").read_text())
    assert "headops/SDPA" in (tmp_path / "attention_cpu_train_quick.md").read_text()
    assert {r["scenario"] for r in data["rows"]} == {"dense", "stream", "importance"}
    for r in data["rows"]:
        assert r["check"]["ok"], r["check"]
        for name in ("headops", "sdpa", "eager_ref", "eager_mask"):
            assert r[name]["n"] == 2 and r[name]["median_ms"] > 0
    memory = data["memory"]
    assert memory["finite"] and memory["S"] == 2048
    # O(S * D): a handful of q-sized tensors, far below one S x S matrix per head
    assert 0 < memory["growth_bytes"] < 16 * memory["heads"] * memory["S"] * 128 * 4


def test_kvcache_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "bench/kvcache.py", "--quick", "--repeats", "2", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "kvcache_quick.json").read_text())
    assert len(data["rows"]) == 2 * 2 * 3  # dtypes x contexts x head mixes
    for r in data["rows"]:
        assert r["check"]["ok"], r["check"]
        assert r["headops_ms_per_step"] > 0 and r["sdpa_ms_per_step"] > 0
    for m in data["memory"]:
        assert m["nbytes_over_ideal"] < 1.02 and m["rss_growth"] < 1.1 * m["nbytes"]
        # 2 of 8 KV heads full, the others sinks 4 + window 1024: below the dense cache once the
        # context passes the window
        assert m["nbytes"] < (0.7 if m["context"] <= 2048 else 0.4) * m["dense"]


def test_probe_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "bench/probe.py", "--quick", "--repeats", "2", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads((tmp_path / "probe.json").read_text())
    assert {r["dtype"] for r in data["kernel"]} == {"float32", "bfloat16"}
    assert all(r["probes_ratio"] > 0 and r["key_mass_ratio"] > 0 for r in data["kernel"])
    for r in data["smollm2_shapes"]:
        assert r["check"]["ok"], r["check"]
