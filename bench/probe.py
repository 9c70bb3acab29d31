"""Cost of probe statistics (docs/DESIGN.md section 5) against the plain fused forward, and against
eager attention computing the same statistics from the materialised pattern.

    python bench/probe.py                    # kernel rows (S = 4096) and SmolLM2's shapes (S = 2048, 4096)
    python bench/probe.py --quick            # small sizes (CI smoke test)
    python bench/probe.py --model            # also SmolLM2's whole forward: probes at every layer (and with
                                             # every layer's last-row pattern, probe.pattern_rows=[-1]) vs
                                             # output_attentions=True (time and peak RSS, separate processes)
    python bench/probe.py --device cuda      # the same rows on a GPU, where probes take the row-block
                                             # path (docs/probes.md): probe.cuda.md / .json

Rows (median of --repeats interleaved calls, ratios in the same run):
- kernel: B=1, H=16, D=128, causal, fp32 and bf16: the forward alone; with span + distance
  masses, top-1 and entropy; with the per-key mass of every row (one more pass);
- SmolLM2's attention shapes (9 query / 3 KV heads, D = 64) at S = 2048 and 4096: the probed
  forward against eager attention (softmax(QK^T) materialised) computing the same statistics.
Writes <out-dir>/probe.md and .json (default: bench/results/local/, untracked; probe.cuda.* on a
GPU, every timed call followed by a synchronize).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import headops  # noqa: E402
from bench.timing import interleaved, machine_info, markdown_table, now_iso  # noqa: E402

CHEAP = dict(spans=[[0, 1], [100, 120]], distances=[[1, 2], [0, 1]], topk=1, entropy=True)
DEVICE = torch.device("cpu")


def synced(fn):
    """`fn`, waiting for the GPU's work before it returns (what a wall-clock timer must see)."""
    if DEVICE.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(DEVICE))


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def probe_for(S: int, cheap: bool = True, key_mass: bool = False) -> headops.Probe:
    fields = dict(CHEAP) if cheap else {}
    fields["spans"] = [[0, 1], [S // 3, S // 3 + 20]]
    if key_mass:
        fields["key_mass_rows"] = (0, S)
    return headops.Probe(**fields)


def eager_statistics(q, k, v, spans, distances):
    """What a user without probes does: materialise the pattern ([B, H, S, S]) and reduce it."""
    B, S, Hq, D = q.shape
    group = Hq // k.shape[2]
    qh, kh, vh = q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = scores.softmax(-1)
    out = p @ vh
    span_mass = torch.stack([p[..., a:b].sum(-1) for a, b in spans], -1)
    diff = torch.arange(S, device=q.device)[:, None] - torch.arange(S, device=q.device)[None, :]
    dist = torch.stack([(p * ((diff >= a) & (diff < b))).sum(-1) for a, b in distances], -1)
    top = p.max(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return out, span_mass, dist, top, entropy


def kernel_rows(S, dtypes, repeats):
    rows = []
    for dtype in dtypes:
        q, k, v = (randn(1, S, 16, 128, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            stats = interleaved({
                "forward": synced(lambda: headops.attention(q, k, v)),
                "probes": synced(lambda: headops.attention(q, k, v, probe=probe_for(S))),
                "key_mass": synced(lambda: headops.attention(q, k, v,
                                                             probe=probe_for(S, cheap=False, key_mass=True))),
            }, repeats)
        base = stats["forward"].median_ms
        rows.append(dict(shape=f"B=1 H=16 S={S} D=128 causal", dtype=str(dtype).replace("torch.", ""),
                         forward_ms=base, probes_ms=stats["probes"].median_ms,
                         probes_ratio=stats["probes"].median_ms / base, key_mass_ms=stats["key_mass"].median_ms,
                         key_mass_ratio=stats["key_mass"].median_ms / base,
                         raw={n: s.as_dict() for n, s in stats.items()}))
    return rows


def smollm2_rows(sizes, repeats):
    rows = []
    for S in sizes:
        q = randn(1, S, 9, 64)
        k, v = randn(1, S, 3, 64), randn(1, S, 3, 64)
        probe = probe_for(S)
        spans = [tuple(x) for x in probe.spans]
        with torch.no_grad():
            stats = interleaved({
                "headops_probes": synced(lambda: headops.attention(q, k, v, probe=probe)),
                "eager_pattern": synced(lambda: eager_statistics(q, k, v, spans, probe.distances)),
            }, repeats)
        # the two compute the same statistics: check it (span and distance masses, top-1, entropy)
        _, got = headops.attention(q, k, v, probe=probe)
        _, span_mass, dist, top, entropy = eager_statistics(q, k, v, spans, probe.distances)
        check = dict(span=float((got.span_mass - span_mass).abs().max()),
                     distance=float((got.distance_mass - dist).abs().max()),
                     entropy=float((got.entropy - entropy).abs().max()),
                     top1_agree=float((got.topk_index[..., 0] == top.indices).float().mean()))
        check["ok"] = max(check["span"], check["distance"], check["entropy"]) < 1e-3 and check["top1_agree"] > 0.99
        rows.append(dict(shape=f"B=1 Hq=9 Hkv=3 S={S} D=64 causal (SmolLM2)", dtype="float32", check=check,
                         probes_ms=stats["headops_probes"].median_ms, eager_ms=stats["eager_pattern"].median_ms,
                         speedup=stats["eager_pattern"].median_ms / stats["headops_probes"].median_ms,
                         raw={n: s.as_dict() for n, s in stats.items()}))
    return rows


MODEL_RUN = r"""
import sys, time, torch
sys.path.insert(0, {python!r})
sys.path.insert(0, {bench!r})
from kvpress_worker import proc_status, settle_and_reset_peak
import headops
from headops.models import load_smollm2
from headops.corpus import stdlib_text
mode, S = sys.argv[1], int(sys.argv[2])
model, tok = load_smollm2()
ids = tok(stdlib_text(), return_tensors="pt").input_ids[:, :S]
torch.manual_seed(0)
if mode != "eager":
    headops.patch(model, headops.HeadSpec.dense(model))
loaded = settle_and_reset_peak()  # the forward's peak from here: the model's loading (GGUF) is not counted
with torch.no_grad():
    if mode == "eager":
        model.set_attn_implementation("eager")
        start = time.perf_counter()
        out = model(ids, output_attentions=True)
        stats = [(a[..., 0].clone(), a.max(-1).indices, -(a * a.clamp_min(1e-30).log()).sum(-1)) for a in out.attentions]
    else:
        start = time.perf_counter()
        rows = dict(pattern_rows=[-1]) if mode == "pattern" else dict()
        with headops.probe(model, spans=[[0, 1]], topk=1, entropy=True, **rows) as rec:
            model(ids)
    seconds = time.perf_counter() - start
print(seconds, proc_status("VmHWM"), loaded)
"""


def model_rows(sizes):
    rows = []
    for S in sizes:
        got = {}
        for mode in ("headops", "pattern", "eager"):
            done = subprocess.run([sys.executable, "-c", MODEL_RUN.format(python=os.path.join(ROOT, "python"),
                                                                          bench=os.path.join(ROOT, "bench")),
                                   mode, str(S)], capture_output=True, text=True)
            if done.returncode != 0:
                got[mode] = None
                print(f"SmolLM2 {mode} S={S} failed: {done.stderr[-500:]}", file=sys.stderr)
                continue
            seconds, peak, loaded = done.stdout.split()[-3:]
            got[mode] = (float(seconds), int(peak), int(loaded))
        if got["headops"] and got["eager"]:
            (hs, hp, hl), (es, ep, el) = got["headops"], got["eager"]
            # peak: the process's peak RSS during the forward (reset once the model was loaded);
            # rise: that peak over the RSS before the forward (what the forward itself allocated)
            ps, pp, pl = got["pattern"] or (float("nan"), 0, 0)
            rows.append(dict(S=S, headops_s=hs, pattern_s=ps, pattern_rise_mib=(pp - pl) / 2**20,
                             eager_s=es, headops_peak_mib=hp / 2**20, eager_peak_mib=ep / 2**20,
                             headops_rise_mib=(hp - hl) / 2**20, eager_rise_mib=(ep - el) / 2**20,
                             memory_ratio=ep / hp, rise_ratio=(ep - el) / max(hp - hl, 1), time_ratio=es / hs))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S=512 kernel rows, S=512 SmolLM2 shapes (smoke test)")
    p.add_argument("--model", action="store_true", help="also SmolLM2's whole forward (S = 2048, 4096)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results", "local"))
    p.add_argument("--device", default="cpu", help="cpu (the probe kernel) or cuda (the row-block path)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.model and DEVICE.type != "cpu":
        p.error("--model times SmolLM2 on the CPU only")
    S = 512 if args.quick else 4096
    sizes = [512] if args.quick else [2048, 4096]
    result = dict(machine=machine_info(), when=now_iso(), command=" ".join(sys.argv), device=str(DEVICE),
                  device_name=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
                  kernel=kernel_rows(S, [torch.float32, torch.bfloat16], args.repeats),
                  smollm2_shapes=smollm2_rows(sizes, args.repeats))
    if args.model:
        result["smollm2_model"] = model_rows(sizes)
    lines = ["kernel: probes (span + distance masses, top-1, entropy) and the per-key mass against the forward",
             markdown_table(["shape", "dtype", "forward ms", "probes ms", "x forward", "key mass ms", "x forward"],
                            [[r["shape"], r["dtype"], f"{r['forward_ms']:.1f}", f"{r['probes_ms']:.1f}",
                              f"{r['probes_ratio']:.2f}", f"{r['key_mass_ms']:.1f}", f"{r['key_mass_ratio']:.2f}"]
                             for r in result["kernel"]]),
             "", "one attention call with probes vs eager attention computing the same statistics",
             markdown_table(["shape", "headops ms", "eager ms", "speed-up"],
                            [[r["shape"], f"{r['probes_ms']:.1f}", f"{r['eager_ms']:.1f}", f"{r['speedup']:.1f}x"]
                             for r in result["smollm2_shapes"]])]
    if args.model:
        lines += ["", "SmolLM2-135M whole forward: probes at every layer (and with each layer's last-row pattern) vs "
                      "output_attentions=True (eager)",
                  markdown_table(["S", "headops s", "+ last-row pattern s", "+ pattern rise MiB", "eager s",
                                  "time ratio", "headops peak MiB", "eager peak MiB",
                                  "peak ratio", "headops rise MiB", "eager rise MiB", "rise ratio"],
                                 [[r["S"], f"{r['headops_s']:.2f}", f"{r['pattern_s']:.2f}",
                                   f"{r['pattern_rise_mib']:.0f}", f"{r['eager_s']:.2f}", f"{r['time_ratio']:.2f}x",
                                   f"{r['headops_peak_mib']:.0f}", f"{r['eager_peak_mib']:.0f}",
                                   f"{r['memory_ratio']:.1f}x", f"{r['headops_rise_mib']:.0f}",
                                   f"{r['eager_rise_mib']:.0f}", f"{r['rise_ratio']:.1f}x"]
                                  for r in result["smollm2_model"]])]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    name = "probe" if DEVICE.type == "cpu" else f"probe.{DEVICE.type}"
    with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out_dir, f"{name}.md"), "w") as f:
        f.write(f"{result['command']}\n{result['machine']}\ndevice: {result['device_name']}\n\n{text}\n")


if __name__ == "__main__":
    main()
