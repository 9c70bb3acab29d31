#!/usr/bin/env python
"""Tensor parallelism: SmolLM2 sharded over processes by transformers, patched with one whole-model spec.

    .venv/bin/torchrun --nproc-per-node 3 examples/tensor_parallel.py [--new-tokens 24]
    .venv/bin/torchrun --nproc-per-node 2 examples/tensor_parallel.py --tiny

transformers shards the model itself (``DistributedConfig(tp_size=N)``): each rank holds a
contiguous block of heads — SmolLM2 over 3 ranks: 3 of the 9 query heads and 1 of the 3 KV heads
of every layer. The spec is written for the whole model (in layer l, KV head l mod 3 streams with
4 sinks and a window of 64, the others stay full); headops.patch gives each rank its slice, and
the head-sparse cache of each rank stores only its KV head. Every rank generates the same tokens;
rank 0 prints them and the whole model's cache, gathered from every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from _common import stdlib_text  # also puts python/ on the path

import headops


def load(tiny: bool, world: int):
    """(model sharded over `world` ranks, prompt ids [1, n], decode(ids) -> str)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(tp_size=world)
    if tiny:
        from headops.testing import CharTokenizer, tiny_llama

        tok = CharTokenizer()
        with tempfile.TemporaryDirectory() as folder:  # every rank saves the same seeded weights, then loads its shard
            tiny_llama()[0].save_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=config).eval()
        return model, torch.tensor([[tok.bos_token_id] + tok.encode(stdlib_text()[:48])]), tok.decode
    from headops.models import load_smollm2

    model, tok = load_smollm2(distributed_config=config)
    return model, tok(stdlib_text()[:1200], return_tensors="pt").input_ids, tok.decode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (4 query / 2 KV heads)")
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world < 2:
        raise SystemExit("run it under torchrun: .venv/bin/torchrun --nproc-per-node 3 examples/tensor_parallel.py")
    model, ids, decode = load(args.tiny, world)
    dense = headops.HeadSpec.dense(model)
    spec = headops.HeadSpec.streaming(model, {layer: [layer % dense.num_kv_heads] for layer in range(dense.num_layers)},
                                      window=64, sinks=4)
    headops.patch(model, spec)
    mine = model.model.layers[0].self_attn._headops_spec
    cache = headops.HeadSparseCache(model, spec)
    new = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, cache=cache,
                         pad_token_id=model.generation_config.eos_token_id)[0, ids.shape[1]:]
    view = cache.whole_model_view()  # every rank takes part; rank 0 gets it
    print(f"rank {rank}: {mine.num_heads} of {dense.num_heads} query heads and {mine.num_kv_heads} of "
          f"{dense.num_kv_heads} KV heads per layer; its cache holds {cache.nbytes() / 2**20:.2f} MiB", flush=True)
    if rank == 0:
        print(f"prompt: {ids.shape[1]} tokens; generated: {decode(new)!r}")
        print(f"whole model's cache: {view.nbytes / 2**20:.2f} MiB held over {world} ranks "
              f"({', '.join(f'{b / 2**20:.2f}' for b in view.rank_nbytes)}), {view.ideal_nbytes / 2**20:.2f} MiB of "
              f"kept tokens, dense cache {view.dense_nbytes / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
