"""Per-mask time of evaluating many head masks as one batch (per-batch gates [M, L, Hq]) against
one mask at a time, for SmolLM2-135M and all-MiniLM-L6-v2, by tokens per mask.

    .venv/bin/python bench/batched_masks.py [--tokens 8 16 32 64 256] [--masks 11] [--repeats 5]

Both paths compute the same thing (tests/test_research.py checks that they agree): M masks,
each gating a different random fraction (0 .. 100 %) of the heads, over one text of T tokens.
"one at a time" is the loop a user writes today (set the mask, run the model, M times);
"batched" is one forward of M rows. Timed calls are interleaved, median of --repeats.
Writes bench/results/batched_masks.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import timing  # noqa: E402

import headops  # noqa: E402
from headops import research  # noqa: E402
from headops.corpus import stdlib_text  # noqa: E402
from headops.models import load_minilm, load_smollm2  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def random_masks(L, H, M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gates = torch.ones(M, L, H)
    for row in range(M):
        off = torch.randperm(L * H, generator=gen)[:round(row / max(M - 1, 1) * L * H)]
        gates[row].view(-1)[off] = 0.0
    return gates


def measure(model, batch, metric_fn, M, repeats):
    base = headops.HeadSpec.dense(model)
    gates = random_masks(base.num_layers, base.num_heads, M)
    batched_spec = base.copy()
    batched_spec.gate = gates
    one_specs = []
    for row in range(M):
        spec = base.copy()
        spec.gate = gates[row]
        one_specs.append(spec)
    tiled = research._tile(batch, M)

    def batched():
        headops.set_spec(model, batched_spec)
        return metric_fn(model, tiled)

    def one_at_a_time():
        values = []
        for spec in one_specs:
            headops.set_spec(model, spec)
            values.append(metric_fn(model, batch))
        return torch.cat(values)

    headops.patch(model, base)
    try:
        with torch.no_grad():
            a, b = batched(), one_at_a_time()
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a, b)
            stats = timing.interleaved({"batched": batched, "one at a time": one_at_a_time}, repeats)
    finally:
        headops.unpatch(model)
    return stats["batched"].median_ms / M, stats["one at a time"].median_ms / M


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32, 64, 256])
    p.add_argument("--masks", type=int, default=11)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    args = p.parse_args()
    info = timing.machine_info()
    print(f"{info['cpu_model']}, {info['torch_threads']} threads, torch {info['torch']}; {args.masks} masks")
    text = stdlib_text()
    rows, raw = [], []
    for name in args.models:
        if name == "smollm2":
            model, tok = load_smollm2()
            all_ids = tok(text, return_tensors="pt").input_ids
            make = lambda T: all_ids[:, :T]  # noqa: E731
            metric = research.per_row_causal_lm_loss
        else:
            model, tok = load_minilm()
            flat = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]

            def make(T):
                ids = torch.cat([torch.tensor([tok.cls_token_id]), flat[:T - 2], torch.tensor([tok.sep_token_id])])[None]
                return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

            metric = research.sentence_embedding
        for T in args.tokens:
            batched, single = measure(model, make(T), metric, args.masks, args.repeats)
            rows.append([name, T, f"{single:.1f}", f"{batched:.1f}", f"{single / batched:.2f}x"])
            raw.append({"model": name, "tokens": T, "one_at_a_time_ms_per_mask": single,
                        "batched_ms_per_mask": batched})
            print(timing.text_table(["model", "tokens", "one at a time ms/mask", "batched ms/mask", "speed-up"],
                                    rows[-1:]), flush=True)
    header = ["model", "tokens per mask", "one at a time, ms per mask", "batched, ms per mask", "speed-up"]
    table = timing.markdown_table(header, rows)
    print("\n" + table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "batched_masks.md"), "w") as f:
        f.write(f"# Batched masks vs one at a time ({timing.now_iso()})\n\n{info['cpu_model']}, "
                f"{info['torch_threads']} threads, torch {info['torch']}, {args.masks} masks, median of "
                f"{args.repeats} interleaved runs. Command: `.venv/bin/python bench/batched_masks.py`\n\n{table}\n")
    with open(os.path.join(RESULTS, "batched_masks.json"), "w") as f:
        json.dump({"machine": info, "masks": args.masks, "repeats": args.repeats, "rows": raw}, f, indent=1)


if __name__ == "__main__":
    main()
