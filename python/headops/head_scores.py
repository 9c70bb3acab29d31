"""Per-head scores, from query heads to KV heads and to sets of heads.

Every discovery method (headops.discover) scores each (layer, query head); a KV cache decides
per KV head (docs/DESIGN.md section 2), so the scores of the query heads that share a KV head
are pooled (max: the group is kept for its most demanding head; mean). ``HeadSpec.from_scores``
and the comparisons between methods use these rules.
"""

from __future__ import annotations

import torch

__all__ = ["POOLINGS", "pool_kv_heads", "top_heads", "jaccard"]

POOLINGS = ("max", "mean")


def pool_kv_heads(scores: torch.Tensor, num_kv_heads: int, how: str = "max") -> torch.Tensor:
    """[L, Hkv] from per-query-head scores [L, Hq]: the max or mean over each KV head's group of
    Hq / Hkv consecutive query heads (query head h reads KV head h // (Hq / Hkv))."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"headops.pool_kv_heads: scores must be a [layers, query heads] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or \
            scores.shape[1] % num_kv_heads:
        raise ValueError(f"headops.pool_kv_heads: num_kv_heads must be an int >= 1 dividing the {scores.shape[1]} "
                         f"query heads, got {num_kv_heads!r}")
    if how not in POOLINGS:
        raise ValueError(f"headops.pool_kv_heads: how must be one of {', '.join(POOLINGS)}, got {how!r}")
    groups = scores.reshape(scores.shape[0], num_kv_heads, scores.shape[1] // num_kv_heads)
    return groups.amax(dim=2) if how == "max" else groups.mean(dim=2)


def top_heads(scores: torch.Tensor, count: int) -> list:
    """The `count` highest-scoring (layer, head) pairs of [L, H] scores (KV heads or query heads),
    highest first; equal scores in (layer, head) order, so the choice is deterministic."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError("headops.top_heads: scores must be a [layers, heads] tensor")
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
