"""Past one machine (docs/distributed.md): SmolLM2 under tensor parallelism and a Shapley sweep
split over processes, on this machine.

    python bench/distributed.py                  # both parts (several minutes: SmolLM2 loads per process)
    python bench/distributed.py --part tp        # SmolLM2 forward, TP 1 vs 3 processes
    python bench/distributed.py --part shapley   # python -m headops shapley, 1 vs 2 processes

tp: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads) patched with the dense spec, one
forward of [1, --tokens] timed --repeats times (median) after a warm-up: one process at 1 and at
2 threads, then ``torchrun --nproc-per-node 3`` (1 thread per rank: 3 query heads and 1 KV head of
every layer per rank). Per process: the parameter bytes it holds; the anonymous memory that
loading and running the model added (Pss_Anon after the forwards minus before loading: its own
tensors, not the shared libraries); its file-backed resident set (pages of the mapped safetensors
file and libraries, shared between processes); its peak resident set (VmHWM). The model is read from the folder headops.models converts
the GGUF into once per machine (safetensors), so each rank reads only its shard. The TP logits are
checked against the single process's.

shapley: ``python -m headops shapley --model smollm2`` at 1 process (1 and 2 threads) and under
``torchrun --nproc-per-node 2`` (1 thread per rank); wall time of the whole command and of the
sweep itself (the time the command prints), and whether the CSV equals the 1-thread one byte for byte.

Writes <out-dir>/distributed.md and .json (default: bench/results/local/, untracked).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

from bench.timing import load_average, machine_info, markdown_table, now_iso  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # (--standalone: a free port)


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "python"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _proc_kib(path: str, field: str) -> int:
    """A "Field:   N kB" line of /proc/self/status or /proc/self/smaps_rollup (-1 where missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _status_kib(field: str) -> int:
    return _proc_kib("/proc/self/status", field)


def _anonymous_kib() -> int:
    """This process's own anonymous memory (proportional set size of its anonymous pages): the
    tensors it allocated, not the shared libraries or the page cache of a mapped file."""
    return _proc_kib("/proc/self/smaps_rollup", "Pss_Anon:")


# ------------------------------------------------------------------------------ one process of the tp part

def tp_worker(args) -> None:
    """One process (one rank under torchrun): load, patch, time the forward, report as JSON."""
    import torch

    import headops
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    extra = {}
    if world > 1:
        from transformers.distributed import DistributedConfig

        extra["distributed_config"] = DistributedConfig(tp_size=world)
    anonymous_base = _anonymous_kib()  # torch, transformers and headops imported, no model yet
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.folder, **extra).eval()
    load_seconds = time.perf_counter() - started
    headops.patch(model, headops.HeadSpec.dense(model))
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    local_bytes = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        local_bytes += local.numel() * local.element_size()
    times = []
    with torch.no_grad():
        logits = model(ids).logits  # warm
        if rank == 0:
            torch.save(logits, os.path.join(args.results, f"tp{world}_t{args.threads}_logits.pt"))
        for _ in range(args.repeats):
            if world > 1:
                torch.distributed.barrier()  # every rank starts each forward together
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    times.sort()
    del logits
    gc.collect()
    file_backed = _status_kib("RssFile:")
    anonymous = _anonymous_kib() - anonymous_base
    result = {"world": world, "rank": rank, "threads": args.threads, "load_s": load_seconds,
              "forward_ms_median": 1e3 * times[len(times) // 2], "forward_ms_min": 1e3 * times[0],
              "param_mib": local_bytes / 2**20, "anonymous_added_mib": anonymous / 1024,
              "file_backed_rss_mib": file_backed / 1024, "peak_rss_mib": _status_kib("VmHWM:") / 1024,
              "heads": model.model.layers[0].self_attn._headops_spec.num_heads,
              "kv_heads": model.model.layers[0].self_attn._headops_spec.num_kv_heads}
    with open(os.path.join(args.results, f"tp{world}_t{args.threads}_rank{rank}.json"), "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------ the driver

def converted_folder() -> str:
    """SmolLM2 as a transformers folder: headops.models' converted copy (made once per machine)."""
    from headops.models import smollm2_converted

    folder = smollm2_converted()
    if folder is None:
        raise SystemExit("bench/distributed.py: the tensor-parallel runs load SmolLM2 from its converted folder; "
                         "the model cache is off (HEADOPS_MODEL_CACHE): point it at a writable folder")
    return folder


def run_tp(args, results: str) -> dict:
    import torch

    folder = converted_folder()
    runs = [(1, 1), (1, 2), (3, 1)]
    rows = []
    for world, threads in runs:
        worker = [os.path.abspath(__file__), "--worker", "--folder", folder, "--results", results, "--tokens",
                  str(args.tokens), "--repeats", str(args.repeats), "--threads", str(threads)]
        command = ([sys.executable] if world == 1 else TORCHRUN + ["--nproc-per-node", str(world)]) + worker
        print(f"tp {world} process(es), {threads} thread(s) each ...", flush=True)
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=_env(threads), check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        ranks = [json.load(open(os.path.join(results, f"tp{world}_t{threads}_rank{r}.json"))) for r in range(world)]
        rows.append({"processes": world, "threads": threads, "wall_s": wall, "ranks": ranks})
    reference = torch.load(os.path.join(results, "tp1_t1_logits.pt"))
    tp3 = torch.load(os.path.join(results, "tp3_t1_logits.pt"))
    return {"tokens": args.tokens, "repeats": args.repeats, "runs": rows,
            "tp3_logits_max_abs_diff": float((tp3 - reference).abs().max())}


def run_shapley(args, results: str) -> dict:
    common = ["-m", "headops", "shapley", "--model", "smollm2", "--tokens", str(args.shapley_tokens),
              "--permutations", str(args.permutations), "--no-plot", "--quiet"]
    rows = []
    for processes, threads in [(1, 1), (1, 2), (2, 1)]:
        out = os.path.join(results, f"shapley_p{processes}_t{threads}")
        launcher = [sys.executable] if processes == 1 else TORCHRUN + ["--nproc-per-node", str(processes)]
        command = launcher + common + ["--out", out]
        print(f"shapley, {processes} process(es), {threads} thread(s) each ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=_env(threads), check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        sweep = re.search(r"coalitions in ([0-9.]+) s", proc.stdout)
        rows.append({"processes": processes, "threads": threads, "wall_s": wall,
                     "sweep_s": float(sweep.group(1)) if sweep else None, "csv": out + ".csv"})
    reference = open(rows[0]["csv"]).read()
    for r in rows:
        r["csv_equals_one_thread"] = open(r["csv"]).read() == reference
    return {"tokens": args.shapley_tokens, "permutations": args.permutations, "runs": rows}


def report(data: dict) -> str:
    lines = [f"# Past one machine: {data['date']}", "",
             f"{data['machine']['cpu_model']}, {data['machine']['cpus_usable']} usable cores, torch "
             f"{data['machine']['torch']}; load average at start {data['machine']['load_average_at_start']}, "
             f"at end {data['load_average_at_end']}.", ""]
    if "tp" in data:
        tp = data["tp"]
        lines += [f"## SmolLM2 forward, [1, {tp['tokens']}] tokens, dense spec (median of {tp['repeats']})", ""]
        rows = []
        for run in tp["runs"]:
            for r in run["ranks"]:
                rows.append([f"TP {run['processes']}, {run['threads']} thread(s)", r["rank"],
                             f"{r['heads']} / {r['kv_heads']}", f"{r['forward_ms_median']:.0f}",
                             f"{r['param_mib']:.0f}", f"{r['anonymous_added_mib']:.0f}",
                             f"{r['file_backed_rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}"])
        lines += [markdown_table(["run", "rank", "query / KV heads per layer", "forward ms", "parameters MiB",
                                  "anonymous memory added MiB", "file-backed RSS MiB", "peak RSS MiB"], rows), "",
                  f"TP 3 logits vs one process: max |diff| = {tp['tp3_logits_max_abs_diff']:.2e}", ""]
    if "shapley" in data:
        sh = data["shapley"]
        lines += [f"## python -m headops shapley --model smollm2 --tokens {sh['tokens']} --permutations "
                  f"{sh['permutations']}", ""]
        rows = [[r["processes"], r["threads"], f"{r['wall_s']:.0f}", f"{r['sweep_s']:.1f}",
                 "yes" if r["csv_equals_one_thread"] else "no"] for r in sh["runs"]]
        lines += [markdown_table(["processes", "threads each", "command wall s", "sweep s",
                                  "CSV = 1 process, 1 thread"], rows), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["tp", "shapley", "all"], default="all")
    p.add_argument("--tokens", type=int, default=128, help="tp: tokens of the timed forward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapley-tokens", type=int, default=16)
    p.add_argument("--permutations", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results", "local"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        tp_worker(args)
        return 0
    results = os.path.join(args.out_dir, "distributed")
    os.makedirs(results, exist_ok=True)
    data = {"date": now_iso(), "command": " ".join(sys.argv), "machine": machine_info()}
    if args.part in ("tp", "all"):
        data["tp"] = run_tp(args, results)
    if args.part in ("shapley", "all"):
        data["shapley"] = run_shapley(args, results)
    data["load_average_at_end"] = load_average()
    text = report(data)
    with open(os.path.join(args.out_dir, "distributed.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(args.out_dir, "distributed.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
