"""Head-level research on patched transformers models: importance and pruning curves.

- ``importance``: Michel et al.'s head-importance scores, |dL/dgate| at gate = 1 accumulated
  over batches, from one backward pass per batch (headops' fused backward gives the gates'
  gradient); optionally normalised per layer (L2), as in the paper.
- ``importance_finite_difference``: the slow definition (each gate moved by +-eps, the loss
  recomputed), for checking.
- ``first_token_sensitivity``: dL/d log(scale) of each head's attention to its row's first token
  (ZeroTuning's initial-token scaling, HeadSpec.scale_first_token), from one backward per batch.
- ``pruning_curve``: heads masked in a given order in steps; every step's mask is one row of a
  per-batch gate ``[M, L, Hq]``, so all masks evaluate as one batch (gated heads cost nothing).
- ``shapley``: Shapley values of the heads by permutation sampling; the coalitions along each
  permutation (its prefixes) are evaluated in batches through per-batch gates.

``pruning_curve`` and ``shapley`` split their batches of masks over processes (``group``: under
torchrun by default; headops._distributed), each batch computed as one process computes it, so
the result is bitwise the single process's with the same threads per process.
"""

from __future__ import annotations

import time

import torch

from ._distributed import map_items, sweep_group
from .patching import patch, patched_spec, set_spec, unpatch
from .spec import HeadSpec

__all__ = ["importance", "importance_finite_difference", "first_token_sensitivity", "pruning_curve", "shapley",
           "causal_lm_loss", "embedding_similarity", "contrastive_embedding_loss"]


def model_device(model) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters): where the
    tensors the studies create for it live (a gate that requires grad; the scores). Gates that only
    mask heads are built on the CPU: on a GPU a HeadSpec keeps them on the host, where the forward
    reads them without a sync to skip the masked heads (HeadSpec.to, docs/cuda.md)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def per_row_causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """[B] next-token cross-entropy per row, in float32 or better (float64 models stay float64)."""
    logits = model(ids).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return loss.mean(dim=1)


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on ids [B, T] (mean over rows and positions)."""
    return per_row_causal_lm_loss(model, ids).mean()


def sentence_embedding(model, batch) -> torch.Tensor:
    """[B, E] unit-norm mean-pooled embeddings of an encoder (MiniLM's sentence embedding), with grad."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def embedding_similarity(reference: torch.Tensor):
    """metric_fn for an encoder's pruning curve: per row, the cosine similarity of its embedding
    to the unpruned model's (`reference` [N, E], rows of a mask-major batch cycle through it)."""
    def metric(model, batch):
        emb = sentence_embedding(model, batch)
        return (emb * reference.repeat(emb.shape[0] // reference.shape[0], 1).to(emb.dtype)).sum(-1)

    return metric


def contrastive_embedding_loss(model, pair, temperature=0.05):
    """A sentence-embedding task loss (in-batch negatives, as sentence-transformers trains MiniLM):
    `pair` = (first halves, second halves) of N passages; each first half must pick its own second half."""
    a, b = sentence_embedding(model, pair[0]), sentence_embedding(model, pair[1])
    logits = a @ b.T / temperature
    return torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]))


def _rows(batch) -> int:
    return (batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))).shape[0]


def _tile(batch, copies: int):
    """`copies` copies of a batch (a tensor [N, ...] or a dict of them), mask-major."""
    if isinstance(batch, torch.Tensor):
        return batch.repeat(copies, *[1] * (batch.dim() - 1))
    return {k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in batch.items()}


class with_spec:
    """``with with_spec(model, spec):`` runs the block with `model` patched with `spec` (a patched
    model gets `spec` through set_spec), and restores the previous state on exit."""

    def __init__(self, model, spec):
        self.model, self.spec = model, spec

    def __enter__(self):
        self.was_patched = hasattr(self.model, "_headops_previous")
        if self.was_patched:
            self.previous = patched_spec(self.model)
            set_spec(self.model, self.spec)
        else:
            patch(self.model, self.spec)
        return self.spec

    def __exit__(self, *exc):
        if self.was_patched:
            set_spec(self.model, self.previous)
        else:
            unpatch(self.model)


def importance(model, batches, *, loss_fn=causal_lm_loss, normalize=True, spec: HeadSpec | None = None):
    """[L, Hq] head importance: sum over batches of |dL/dgate| at gate = 1 (Michel et al.).

    ``batches`` yields whatever ``loss_fn(model, batch)`` takes (ids for a causal LM; for an
    encoder pass a loss_fn, e.g. the distance to the unmasked model's embeddings)."""
    device = model_device(model)
    base = (spec or HeadSpec.dense(model)).copy().to(device)
    # the gate whose gradient is the score lives on the model's device (its gradient is computed there)
    base.gate = torch.ones(base.num_layers, base.num_heads, device=device, requires_grad=True)
    total = torch.zeros(base.num_layers, base.num_heads, device=device)
    with with_spec(model, base):
        for batch in batches:
            (grad,) = torch.autograd.grad(loss_fn(model, batch), base.gate)
            total += grad.abs()
    if normalize:
        total = total / total.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return total


def first_token_sensitivity(model, batches, *, loss_fn=causal_lm_loss, spec: HeadSpec | None = None):
    """[L, Hq] dL/d log(scale) at scale = 1, summed over batches: how the loss moves as each head
    attends more to its row's first token (HeadSpec.scale_first_token; ZeroTuning's per-head
    effect, to first order). Negative: attending more to the first token lowers the loss. One
    backward per batch, the gradient of key_bias at key 0 (of `spec`, default dense)."""
    device = model_device(model)
    # (scale 1: the spec's own key_bias, with the key-0 column it may lack, whose gradient is the answer)
    base = (spec or HeadSpec.dense(model)).scale_first_token(1.0).to(device)
    base.key_bias.requires_grad_()
    total = torch.zeros(base.num_layers, base.num_heads, device=device)
    with with_spec(model, base):
        for batch in batches:
            (grad,) = torch.autograd.grad(loss_fn(model, batch), base.key_bias)
            total += grad[:, :, 0]
    return total


def importance_finite_difference(model, batch, *, loss_fn=causal_lm_loss, eps=1e-3, heads=None):
    """dL/dgate at gate = 1 by central differences, one head at a time (slow; for checking).
    Returns [L, Hq] signed derivatives (NaN for heads left out of ``heads``)."""
    base = HeadSpec.dense(model)
    L, H = base.num_layers, base.num_heads
    out = torch.full((L, H), float("nan"))
    heads = heads if heads is not None else [(layer, h) for layer in range(L) for h in range(H)]
    with with_spec(model, base), torch.no_grad():
        for layer, h in heads:
            values = []
            for delta in (eps, -eps):
                spec = base.copy()
                spec.gate = torch.ones(L, H, dtype=torch.float64)
                spec.gate[layer, h] += delta
                set_spec(model, spec)
                values.append(float(loss_fn(model, batch)))
            out[layer, h] = (values[0] - values[1]) / (2 * eps)
    return out


def pruning_curve(model, batch, order, fractions, *, metric_fn=per_row_causal_lm_loss, repeats=3, progress=False,
                  label="", max_batch_tokens=8192, group=None):
    """Masks the heads in `order` ([(layer, head), ...], least important first) for each fraction
    of all heads; evaluates all M masks in one batch through per-batch gates.

    ``batch``: ids [N, T] (a causal LM) or a dict of [N, T] tensors (an encoder's tokenizer
    output); ``metric_fn(model, batch with M * N rows, mask-major) -> [M * N]``, averaged over the
    N rows of each mask. The masks go through the model in chunks of at most ``max_batch_tokens``
    tokens (at least one mask each): past that a CPU forward is compute-bound and bigger batches
    only cost cache misses. Returns dict(fractions, metric [M], batched_seconds_per_mask,
    single_seconds_per_mask, forward_seconds [M] (each mask alone), gates [M, L, Hq]).

    ``group``: the processes the chunks (and the masks' timings) are split over: a
    torch.distributed process group, None (torchrun's processes when launched by torchrun, else
    this one) or False (this process alone); every rank gets the whole result. The seconds are
    each chunk's and mask's own time, wherever it ran."""
    base = HeadSpec.dense(model)
    group = sweep_group(group, model, "headops.pruning_curve")
    L, H = base.num_layers, base.num_heads
    gates = torch.ones(len(fractions), L, H)
    for row, fraction in enumerate(fractions):
        for layer, h in order[:int(round(fraction * L * H))]:
            gates[row, layer, h] = 0.0
    M, N = len(fractions), _rows(batch)
    tokens_per_mask = N * (batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))).shape[-1]
    per_chunk = max(1, max_batch_tokens // max(tokens_per_mask, 1))
    chunks = []
    for first in range(0, M, per_chunk):
        spec = base.copy()
        spec.gate = gates[first:first + per_chunk].repeat_interleave(N, dim=0)
        chunks.append((spec, _tile(batch, spec.gate.shape[0] // N)))

    def evaluate(chunk):
        spec, tiled = chunks[chunk]
        set_spec(model, spec)
        return metric_fn(model, tiled)

    def time_chunk(chunk):
        start = time.perf_counter()
        for _ in range(repeats):
            evaluate(chunk)
        return (time.perf_counter() - start) / repeats

    def time_mask(row):
        one = base.copy()
        one.gate = gates[row]
        set_spec(model, one)
        metric_fn(model, batch)  # warm
        start = time.perf_counter()
        for _ in range(repeats):
            metric_fn(model, batch)
        return (time.perf_counter() - start) / repeats

    caller, inputs = "headops.pruning_curve", (batch, gates, repeats, max_batch_tokens)
    with with_spec(model, chunks[0][0]), torch.no_grad():
        metric = torch.cat(map_items(evaluate, range(len(chunks)), group, caller=caller, inputs=inputs)).view(M, N)
        metric = metric.mean(1)
        batched_seconds = sum(map_items(time_chunk, range(len(chunks)), group, caller=caller, inputs=inputs)) / M
        forward_seconds = map_items(time_mask, range(M), group, caller=caller, inputs=inputs, progress=progress,
                                    desc=f"timing masks ({label})" if label else "timing masks")
    return {"fractions": list(fractions), "metric": metric.tolist(), "batched_seconds_per_mask": batched_seconds,
            "single_seconds_per_mask": sum(forward_seconds) / M, "forward_seconds": forward_seconds,
            "gates": gates}


def shapley(model, batch, *, permutations=8, seed=0, value_fn=None, batch_size=16, progress=False, group=None):
    """[L, Hq] Shapley values of the heads for value(coalition) = mean over the N rows of
    ``value_fn(model, batch)`` with only the coalition's heads on (default: minus the
    next-token loss of ids [N, T]; pass a dict batch and a value_fn for an encoder).

    ``permutations``: how many to sample (seeded), or an explicit list of permutations of the
    L * Hq head indices (all of them give the exact Shapley values). Each permutation's n + 1
    prefixes are evaluated in batches of ``batch_size`` coalitions (N rows each).

    ``group``: the processes the batches are split over: a torch.distributed process group,
    None (torchrun's processes when launched by torchrun, else this one) or False (this process
    alone); every rank gets the values, bitwise those of one process."""
    base = HeadSpec.dense(model)
    group = sweep_group(group, model, "headops.shapley")
    L, H = base.num_layers, base.num_heads
    n = L * H
    if isinstance(permutations, int):
        gen = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(n, generator=gen) for _ in range(permutations)]
    else:
        perms = [torch.as_tensor(p) for p in permutations]
    value_fn = value_fn or (lambda m, x: -per_row_causal_lm_loss(m, x))
    masks = []
    for perm in perms:
        gate = torch.zeros(n)
        masks.append(gate.clone())
        for head in perm.tolist():
            gate[head] = 1.0
            masks.append(gate.clone())
    masks = torch.stack(masks).view(-1, L, H)
    N = _rows(batch)

    def values_of(start):
        chunk = masks[start:start + batch_size]
        spec = base.copy()
        spec.gate = chunk.repeat_interleave(N, dim=0)
        set_spec(model, spec)
        rows = value_fn(model, _tile(batch, chunk.shape[0])).double()
        return rows.view(chunk.shape[0], N).mean(1)

    with with_spec(model, base), torch.no_grad():
        values = map_items(values_of, range(0, masks.shape[0], batch_size), group, caller="headops.shapley",
                           inputs=(batch, masks, batch_size), progress=progress, desc="coalitions (batches)")
    values = torch.cat(values).view(len(perms), n + 1)
    phi = torch.zeros(n, dtype=torch.float64, device=values.device)  # the model's device (value_fn's rows)
    for p, perm in enumerate(perms):
        phi[perm] += values[p, 1:] - values[p, :-1]
    return (phi / len(perms)).view(L, H)
