"""One kvpress method over the prompts bench/compare_kvpress.py wrote, in kvpress's own environment
(.venv-kvpress: kvpress 0.5.5, transformers < 5.3). It never imports headops: it reads token ids
and writes answers, kept tokens, cache bytes, time and memory as JSON; bench/compare_kvpress.py scores them.

Per prompt, exactly what kvpress's pipeline does (KVPressTextGenerationPipeline._forward): the
context is prefilled into a DynamicCache inside the press's context manager (the press's forward
hooks compress each layer's cache after its prefill), then the pipeline's own ``generate_answer``
reads the question and decodes greedily from that cache. The question ids are the same tokens
headops answers from (the pipeline's chat-template split is bypassed so both sides see one prompt).

Memory: ru_maxrss of this process (fresh per method), and the peak resident set during the answer
alone (VmHWM reset through /proc/self/clear_refs after malloc_trim, before generate_answer)."""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import json
import os
import resource
import sys
import time


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def settle_and_reset_peak() -> int:
    """Free what can be freed, give the heap's free pages back, reset VmHWM; the RSS after."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    return proc_status("VmRSS")


def make_press(method: dict, context_length: int):
    from kvpress import AdaKVPress, DuoAttentionPress, SnapKVPress, StreamingLLMPress

    kind = method["kind"]
    if kind == "dense":
        return None
    keep = method.get("keep")  # tokens per KV head kept from the context
    # compression_ratio such that kvpress's int(k_len * (1 - ratio)) is exactly `keep`
    ratio = (context_length - keep - 0.5) / context_length if keep is not None else None
    if kind == "streaming_llm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=method["sinks"])
    if kind == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=method["window_size"],
                           kernel_size=method["kernel_size"])
    if kind == "adakv":
        return AdaKVPress(SnapKVPress(compression_ratio=ratio, window_size=method["window_size"],
                                      kernel_size=method["kernel_size"]), alpha_safeguard=method["alpha"])
    if kind == "duo":
        return DuoAttentionPress(head_compression_ratio=method["streaming_heads"] / method["kv_heads"])
    raise ValueError(f"unknown kvpress method kind {kind!r}")


def offline_duo_pattern(model, method: dict) -> None:
    """DuoAttentionPress.load_attention_pattern downloads (sink_size, recent_size, head scores)
    from the DuoAttention GitHub repository for six named checkpoints and memoises it in a
    cachetools LRUCache keyed by model.config.name_or_path. Filling that memo with our own
    pattern makes the press use it without any network access (the press's own code then picks
    the streaming heads: the lowest-scoring round(ratio x L x Hkv) KV heads)."""
    import numpy as np
    from kvpress.presses import duo_attention_press

    scores = np.asarray(method["head_scores"], dtype=float)  # [L, Hkv]
    duo_attention_press.cache[model.config.name_or_path] = (method["sinks"], method["window"], scores)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local transformers model directory")
    p.add_argument("--prompts", required=True, help="the JSON bench/compare_kvpress.py wrote")
    p.add_argument("--method", required=True, help="JSON of one method (bench/compare_kvpress.py)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import kvpress  # noqa: F401  (patches transformers' attention functions for head-wise masks)
    import transformers
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    method = json.loads(args.method)
    with open(args.prompts) as f:
        prompts = json.load(f)["prompts"]
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    load_seconds = time.perf_counter() - started
    rss_loaded = proc_status("VmRSS")
    if method["kind"] == "duo":
        offline_duo_pattern(model, method)

    # forward calls during the answer: the first reads the question (and yields the first token),
    # each later one decodes one token
    stamps = []
    hook = model.register_forward_hook(lambda *a: stamps.append(time.perf_counter()))
    L = model.config.num_hidden_layers
    rows = []
    for prompt in prompts:
        ids = torch.tensor(prompt["ids"])[None]
        start = prompt["question_start"]
        context, question = ids[:, :start], ids[:, start:]
        press = make_press(method, start)
        cache = DynamicCache()
        stamps.clear()
        with torch.no_grad():
            if press is None:
                model.model(input_ids=context, past_key_values=cache)
            else:
                with press(model):
                    model.model(input_ids=context, past_key_values=cache)
        kept = [int(cache.layers[i].keys.shape[2]) for i in range(L)]
        cache_bytes = sum(cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in range(L))
        Hkv = cache.layers[0].keys.shape[1]
        # head-wise presses keep every token and mask some (module.masked_key_indices, read by
        # kvpress's attention patch during decoding): the tokens attention can still see
        masked = 0
        for layer in model.model.layers:
            idx = getattr(layer.self_attn, "masked_key_indices", None)
            if idx is not None:
                masked += int(idx[0].numel())
        visible = sum(kept) * Hkv - masked
        streaming_mask = None
        if method["kind"] == "duo":
            streaming_mask = press.streaming_mask.int().tolist()
        rss_before = settle_and_reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            answer = pipe.generate_answer(question_ids=question, cache=cache, context_length=start,
                                          max_new_tokens=prompt["max_new_tokens"])
        t1 = time.perf_counter()
        peak = proc_status("VmHWM")
        held_after = sum(cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in range(L))
        tokens = len(stamps)
        rows.append(dict(key=prompt["key"], answer=answer, tokens=tokens, answer_seconds=t1 - t0,
                         decode_seconds=(stamps[-1] - stamps[0]) if tokens > 1 else 0.0,
                         decode_tokens=max(tokens - 1, 0), context_tokens=start,
                         kept_tokens_per_layer=kept, visible_token_heads=visible, total_token_heads=start * Hkv * L,
                         cache_bytes_compressed=cache_bytes, cache_bytes_after_answer=held_after,
                         rss_before_answer=rss_before, peak_rss_answer=peak, streaming_mask=streaming_mask))
        for layer in model.model.layers:  # the next prompt's prefill resets it anyway
            layer.self_attn.masked_key_indices = None
        del cache
        print(f"kvpress {method['name']}: {prompt['key']} -> {answer!r}", file=sys.stderr, flush=True)
    hook.remove()
    result = dict(library="kvpress", version=importlib.metadata.version("kvpress"),
                  transformers=transformers.__version__, torch=torch.__version__, method=method["name"],
                  threads=args.threads, load_seconds=load_seconds, rss_after_load=rss_loaded,
                  peak_rss_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rows=rows,
                  weights_checksum=_checksum(model))
    with open(args.out, "w") as f:
        json.dump(result, f)


def _checksum(model) -> str:
    """A cheap fingerprint of the weights (sum and sum of squares per tensor, hashed), compared
    with headops' side by bench/compare_kvpress.py: both ran the same numbers."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().double()
        h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.10e}:{(t * t).sum().item():.10e}".encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    main()
