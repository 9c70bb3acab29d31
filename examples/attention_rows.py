#!/usr/bin/env python
"""Where the heads look when SmolLM2 reads a passkey question: a few rows of the attention
pattern, without the pattern.

    .venv/bin/python examples/attention_rows.py [--tiny] [--length 1024]

One forward over a passkey prompt under ``headops.probe(model, spans=[passkey], pattern_rows=[-1])``:
every layer's mass on the passkey's tokens from the last query row (the token before the
answer), and that row's whole distribution over the prompt (``pattern_rows``: ``[B, Hq, 1, S]``
a layer, where ``output_attentions=True`` would hold ``[B, Hq, S, S]``). Prints the heads that
put the most mass on the passkey, with the tokens each attends to most, and what the rows cost
against the eager patterns.
"""

import argparse

import _common  # noqa: F401  (the package path)
import torch

import headops
from headops import tasks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--length", type=int, default=1024, help="prompt tokens")
    p.add_argument("--top", type=int, default=5, help="heads to show")
    args = p.parse_args(argv)
    model, tok = _common.causal_lm(args.tiny)
    if tok is None:
        from headops.testing import CharTokenizer

        tok = CharTokenizer()
    sample = tasks.make_sample(tok, "passkey", args.length, 0.5, 0)
    span = sample.answer_spans()[0]
    ids = sample.ids[None]
    spec = headops.HeadSpec.dense(model)
    headops.patch(model, spec)
    with torch.no_grad(), headops.probe(model, spans=[list(span)], pattern_rows=[-1]) as rec:
        model(ids)
    S = ids.shape[1]
    mass = torch.stack([rec[layer][0].span_mass[0, :, -1, 0] for layer in range(spec.num_layers)])  # [L, Hq]
    rows = [rec[layer][0].pattern[0, :, 0] for layer in range(spec.num_layers)]  # each [Hq, S]
    print(f"prompt of {S} tokens, passkey {sample.answers[0]!r} at tokens {span[0]}..{span[1] - 1}")
    print(f"the heads whose last row puts the most mass on the passkey (of {spec.num_layers} x {spec.num_heads}):")
    for flat in mass.flatten().argsort(descending=True)[:args.top].tolist():
        layer, head = divmod(flat, spec.num_heads)
        row = rows[layer][head]
        top = row.topk(4).indices.tolist()
        shown = ", ".join(f"{tok.decode(ids[0, j:j + 1])!r}@{j} {row[j]:.2f}" for j in top)
        print(f"  layer {layer:2d} head {head}: passkey mass {mass[layer, head]:.2f}; most attended: {shown}")
    rows_bytes = sum(r.numel() for r in rows) * 4
    eager_bytes = spec.num_layers * spec.num_heads * S * S * 4
    print(f"last rows recorded: {rows_bytes / 2**20:.2f} MiB; output_attentions would hold "
          f"{eager_bytes / 2**20:.0f} MiB of float32 patterns")
    headops.unpatch(model)


if __name__ == "__main__":
    main()
