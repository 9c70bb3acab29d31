"""Per-head scores, from query heads to KV heads and to sets of heads.

Every discovery method (headops.discover) scores each (layer, query head); a KV cache decides
per KV head (docs/DESIGN.md section 2), so the scores of the query heads that share a KV head
are pooled (max: the group is kept for its most demanding head; mean). ``HeadSpec.from_scores``
and the comparisons between methods use these rules.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["POOLINGS", "pool_kv_heads", "top_heads", "jaccard", "overlaps", "rank_correlation"]

POOLINGS = ("max", "mean")


def pool_kv_heads(scores: torch.Tensor, num_kv_heads, how: str = "max"):
    """[L, Hkv] from per-query-head scores [L, Hq]: the max or mean over each KV head's group of
    Hq / Hkv consecutive query heads (query head h reads KV head h // (Hq / Hkv)). Where the layers
    differ in KV heads (num_kv_heads a tuple of one per layer, as a HeadSpec's for Gemma 4), a list
    of each layer's [Hkv]."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"headops.pool_kv_heads: scores must be a [layers, query heads] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    per_layer = tuple(num_kv_heads) if isinstance(num_kv_heads, (tuple, list)) else None
    counts = per_layer if per_layer is not None else (num_kv_heads,)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 or scores.shape[1] % n for n in counts) or (
            per_layer is not None and len(per_layer) != scores.shape[0]):
        raise ValueError(f"headops.pool_kv_heads: num_kv_heads must be an int >= 1 dividing the {scores.shape[1]} "
                         f"query heads (or a tuple of one per layer, {scores.shape[0]}), got {num_kv_heads!r}")
    if how not in POOLINGS:
        raise ValueError(f"headops.pool_kv_heads: how must be one of {', '.join(POOLINGS)}, got {how!r}")

    def pooled(rows, n):
        groups = rows.reshape(rows.shape[0], n, rows.shape[1] // n)
        return groups.amax(dim=2) if how == "max" else groups.mean(dim=2)

    if per_layer is None:
        return pooled(scores, num_kv_heads)
    return [pooled(scores[layer:layer + 1], n)[0] for layer, n in enumerate(per_layer)]


def top_heads(scores, count: int) -> list:
    """The `count` highest-scoring (layer, head) pairs of [L, H] scores (KV heads or query heads),
    or of a list of each layer's [H] (layers of other KV head counts: pool_kv_heads' list),
    highest first; equal scores in (layer, head) order, so the choice is deterministic."""
    rows = list(scores) if isinstance(scores, (list, tuple)) else None
    if rows is not None:
        if not rows or not all(isinstance(r, torch.Tensor) and r.dim() == 1 for r in rows):
            raise ValueError("headops.top_heads: scores must be a [layers, heads] tensor or a list of each layer's "
                             "[heads] tensor")
        heads = [(layer, h) for layer, r in enumerate(rows) for h in range(r.shape[0])]
        return [heads[i] for _, i in top_heads(torch.cat([r.double() for r in rows])[None], count)]
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError("headops.top_heads: scores must be a [layers, heads] tensor or a list of each layer's "
                         "[heads] tensor")
    if bool(torch.isnan(scores).any()):
        raise ValueError("headops.top_heads: scores must not hold NaN")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= scores.numel():
        raise ValueError(f"headops.top_heads: count must be an int in [0, {scores.numel()}], got {count!r}")
    order = torch.sort(-scores.flatten().double(), stable=True).indices[:count]
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


def jaccard(a, b) -> float:
    """|a & b| / |a | b| of two collections of heads (1.0 for two empty ones)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def overlaps(scores: dict, num_kv_heads, fraction: float) -> tuple:
    """How methods' top heads agree: ``({level: {(a, b): Jaccard}}, {level: {method: top heads}})``
    for level "KV heads" (each scored by the max over its query heads: what a cache keeps) and
    "query heads", the top `fraction` of each (rounded, at least 1) compared pair by pair.
    scores: {method: [L, Hq] scores}, all of one shape; num_kv_heads as pool_kv_heads takes it."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"headops.head_scores.overlaps: fraction must be in (0, 1], got {fraction!r}")
    shapes = {tuple(v.shape) for v in scores.values()}
    if len(shapes) != 1:
        raise ValueError(f"headops.head_scores.overlaps: the score tables differ in shape: {sorted(shapes)}")
    tops = {"KV heads": {}, "query heads": {}}
    for method, values in scores.items():
        kv = pool_kv_heads(values, num_kv_heads, "max")
        total = sum(row.numel() for row in kv)
        tops["KV heads"][method] = top_heads(kv, max(1, round(fraction * total)))
        tops["query heads"][method] = top_heads(values, max(1, round(fraction * values.numel())))
    return {level: {(a, b): jaccard(chosen[a], chosen[b]) for a, b in itertools.combinations(chosen, 2)}
            for level, chosen in tops.items()}, tops


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.sort(x, stable=True).indices
    ranks = torch.empty_like(x)
    values = x[order].tolist()
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2  # tied values share their mean rank
        i = j + 1
    return ranks


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score tables of one shape (every head a sample; tied
    scores take their average rank): 1 where both order the heads alike, NaN where either gives
    every head the same score."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or a.numel() < 2:
        raise ValueError("headops.head_scores.rank_correlation: a and b must be tensors of one shape with at least "
                         f"2 scores, got {tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")
    ra, rb = (_average_ranks(t.flatten().double()) for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")
