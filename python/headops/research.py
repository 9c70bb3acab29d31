"""Head-level research on patched transformers models: importance and pruning curves.

- ``importance``: Michel et al.'s head-importance scores, |dL/dgate| at gate = 1 accumulated
  over batches, from one backward pass per batch (headops' fused backward gives the gates'
  gradient); optionally normalised per layer (L2), as in the paper.
- ``importance_finite_difference``: the slow definition (each gate moved by +-eps, the loss
  recomputed), for checking.
- ``pruning_curve``: heads masked in a given order in steps; every step's mask is one row of a
  per-batch gate ``[M, L, Hq]``, so all masks evaluate as one batch (gated heads cost nothing).
"""

from __future__ import annotations

import sys
import time

import torch

from .patching import patch, set_spec, unpatch
from .spec import HeadSpec

__all__ = ["importance", "importance_finite_difference", "pruning_curve", "causal_lm_loss"]


def per_row_causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """[B] next-token cross-entropy per row, in float32 or better (float64 models stay float64)."""
    logits = model(ids).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return loss.mean(dim=1)


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on ids [B, T] (mean over rows and positions)."""
    return per_row_causal_lm_loss(model, ids).mean()


class _Gated:
    """Patches `model` (or reuses its patch) with `spec`, restoring the previous state on exit."""

    def __init__(self, model, spec):
        self.model, self.spec = model, spec

    def __enter__(self):
        self.was_patched = hasattr(self.model, "_headops_previous")
        if self.was_patched:
            modules = [m for m in self.model.modules() if hasattr(m, "_headops_spec")]
            self.previous = modules[0]._headops_spec if modules else None
            set_spec(self.model, self.spec)
        else:
            patch(self.model, self.spec)
        return self.spec

    def __exit__(self, *exc):
        if self.was_patched:
            if self.previous is not None:
                set_spec(self.model, self.previous)
        else:
            unpatch(self.model)


def importance(model, batches, *, loss_fn=causal_lm_loss, normalize=True, spec: HeadSpec | None = None):
    """[L, Hq] head importance: sum over batches of |dL/dgate| at gate = 1 (Michel et al.).

    ``batches`` yields whatever ``loss_fn(model, batch)`` takes (ids for a causal LM; for an
    encoder pass a loss_fn, e.g. the distance to the unmasked model's embeddings)."""
    base = (spec or HeadSpec.dense(model)).copy()
    base.gate = torch.ones(base.num_layers, base.num_heads, requires_grad=True)
    total = torch.zeros(base.num_layers, base.num_heads)
    with _Gated(model, base):
        for batch in batches:
            (grad,) = torch.autograd.grad(loss_fn(model, batch), base.gate)
            total += grad.abs()
    if normalize:
        total = total / total.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return total


def importance_finite_difference(model, batch, *, loss_fn=causal_lm_loss, eps=1e-3, heads=None):
    """dL/dgate at gate = 1 by central differences, one head at a time (slow; for checking).
    Returns [L, Hq] signed derivatives (NaN for heads left out of ``heads``)."""
    base = HeadSpec.dense(model)
    L, H = base.num_layers, base.num_heads
    out = torch.full((L, H), float("nan"))
    heads = heads if heads is not None else [(layer, h) for layer in range(L) for h in range(H)]
    with _Gated(model, base), torch.no_grad():
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


def pruning_curve(model, ids, order, fractions, *, metric_fn=per_row_causal_lm_loss, repeats=3, progress=False,
                  label=""):
    """Masks the heads in `order` ([(layer, head), ...], least important first) for each fraction
    of all heads; evaluates all masks in one batch through per-batch gates.

    Returns dict(fractions, metric [M], batched_seconds_per_mask, single_seconds_per_mask,
    forward_seconds [M] (each mask alone)). metric_fn(model, ids [M, T]) -> [M]."""
    base = HeadSpec.dense(model)
    L, H = base.num_layers, base.num_heads
    gates = torch.ones(len(fractions), L, H)
    for row, fraction in enumerate(fractions):
        for layer, h in order[:int(round(fraction * L * H))]:
            gates[row, layer, h] = 0.0
    batched = base.copy()
    batched.gate = gates
    M = len(fractions)
    with _Gated(model, batched), torch.no_grad():
        metric = metric_fn(model, ids.expand(M, -1))
        start = time.perf_counter()
        for _ in range(repeats):
            metric_fn(model, ids.expand(M, -1))
        batched_seconds = (time.perf_counter() - start) / repeats / M
        forward_seconds = []
        rows = range(M)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, desc=f"timing masks ({label})" if label else "timing masks", file=sys.stderr)
        for row in rows:
            one = base.copy()
            one.gate = gates[row]
            set_spec(model, one)
            metric_fn(model, ids)  # warm
            start = time.perf_counter()
            for _ in range(repeats):
                metric_fn(model, ids)
            forward_seconds.append((time.perf_counter() - start) / repeats)
    return {"fractions": list(fractions), "metric": metric.tolist(), "batched_seconds_per_mask": batched_seconds,
            "single_seconds_per_mask": sum(forward_seconds) / M, "forward_seconds": forward_seconds,
            "gates": gates}
