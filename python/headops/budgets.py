"""Budget heads at prefill (docs/DESIGN.md section 6): how a prompt's tokens are scored
(SnapKV), how a layer's budget heads get their sizes (static budgets: uniform or HeadKV's; AdaKV
per prompt) and which tokens each keeps. ``HeadSparseCache`` runs these at prefill; they are
plain functions on tensors so that each rule has one home and tests can transcribe them.

    scores = snapkv_scores(q_obs, k, v, args, group)       # [Hkv, n]: the window's attention
    counts = adakv_counts(scores, budget=64, alpha=0.2, floors=[...])
    kept = top_positions(scores[h], counts[h])             # sorted positions
    budgets = headkv_budgets(head_scores, budget=64, beta=1.2)   # [L, H] static budgets
    per_layer = pyramid_budgets(num_layers=30, budget=64, beta=20)  # [L]: PyramidKV's

Order, everywhere: higher score first; equal scores in (head, position) order (the lower head
first, then the lower position), so every choice is deterministic.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._args import HeadArgs, fail, is_int

__all__ = ["snapkv_scores", "top_positions", "adakv_counts", "headkv_budgets", "pyramid_budgets", "choose"]


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of a 1-D tensor, highest score first, equal scores lower index first."""
    return torch.sort(-scores.double(), stable=True).indices


def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best positions of one head's scores ([n]), sorted."""
    return _order(scores)[:count].sort().values


def adakv_counts(scores: torch.Tensor, budget: int, alpha: float, floors) -> list:
    """AdaKV (Feng et al.; kvpress's AdaKVPress): how many tokens each of a layer's H budget heads
    keeps from a prompt of n tokens, given their scores ``[H, n]``.

    With n <= budget every head keeps all n. Otherwise each head h is first guaranteed its
    ``max(int(alpha * budget), floors[h])`` best tokens (at most budget; the floor is what the
    head must keep to evict during decode: its sinks + budget_recent + 1), then the
    ``H * budget`` best scores of the whole layer (the guaranteed ones first) decide the counts,
    which sum to ``H * budget``.
    """
    H, n = scores.shape
    if n <= budget:
        return [n] * H
    s = scores.double().clone()
    for h in range(H):
        safe = min(budget, max(int(alpha * budget), int(floors[h])))
        s[h, _order(s[h])[:safe]] = math.inf
    chosen = _order(s.reshape(-1))[:H * budget]
    return torch.bincount(chosen // n, minlength=H).tolist()


def headkv_budgets(scores: torch.Tensor, budget: int, beta: float, floor: int = 0) -> torch.Tensor:
    """HeadKV (Fu et al., "Not All Heads Matter"): static per-head budgets ``[L, H]`` from
    per-head importance scores ``[L, H]`` (e.g. retrieval scores): each head gets
    ``budget - budget // beta`` tokens plus its share, proportional to its score, of a pool of
    ``(budget // beta) * L * H`` tokens, rounded (half to even). beta >= 1: beta = 1 shares the
    whole budget by score, a large beta gives every head nearly `budget`.

    `floor` (<= budget): the fewest tokens a head may get (what a budget head needs beyond the
    latest tokens it always keeps). Where a head's share would leave it below, it gets the floor
    and the others share what remains of ``L * H * budget`` by their scores, so the total stays;
    with ``budget - budget // beta >= floor`` nothing changes."""
    caller = "headops.budgets.headkv_budgets"
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise fail(caller, "scores", "a floating-point [L, H] tensor",
                   tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__)
    s = scores.double()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or float(s.sum()) <= 0:
        raise fail(caller, "scores", "finite, >= 0 and not all 0", s.tolist())
    if not is_int(budget) or budget < 1:
        raise fail(caller, "budget", "an int >= 1", repr(budget))
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 1.0 <= float(beta) < math.inf:
        raise fail(caller, "beta", "a finite number >= 1", repr(beta))
    if not is_int(floor) or not 0 <= floor <= budget:
        raise fail(caller, "floor", f"an int in [0, budget = {budget}]", repr(floor))
    L, H = s.shape
    shared = budget // float(beta)
    raw = s / s.sum() * (shared * L * H) + (budget - shared)
    floored = torch.zeros_like(s, dtype=torch.bool)
    while True:  # (water-filling: each round floors at least one more head, or ends)
        low = ~floored & (raw < floor)
        if not bool(low.any()):
            break
        floored |= low
        rest = ~floored
        pool = L * H * budget - floor * int(floored.sum()) - (budget - shared) * int(rest.sum())
        weight = float(s[rest].sum())
        share = s / weight * pool if weight > 0 else torch.full_like(s, pool / max(int(rest.sum()), 1))
        raw = torch.where(floored, torch.full_like(s, float(floor)), share + (budget - shared))
    return torch.round(raw).long()


def pyramid_budgets(num_layers: int, budget: int, beta: float = 20, kept: int = 0) -> list:
    """PyramidKV (Cai et al., "Pyramidal Information Funneling"; kvpress's PyramidKVPress): each
    layer's budget: `kept` tokens every layer keeps (PyramidKV's window of latest tokens) and a
    share of the rest, ``budget - kept`` on average, falling in equal steps from the first layer's
    ``2 (budget - kept) - (budget - kept) / beta`` to the last layer's ``(budget - kept) / beta``,
    rounded (half to even): the lower layers, whose attention is spread wide, keep more, the upper
    ones less; the sum is ``num_layers * budget`` up to rounding. beta >= 1: 1 gives every layer
    `budget`, a larger beta a steeper pyramid (the paper's 20 by default)."""
    caller = "headops.budgets.pyramid_budgets"
    if not is_int(num_layers) or num_layers < 1:
        raise fail(caller, "num_layers", "an int >= 1", repr(num_layers))
    if not is_int(kept) or kept < 0:
        raise fail(caller, "kept", "an int >= 0", repr(kept))
    if not is_int(budget) or budget <= kept:
        raise fail(caller, "budget", f"an int > kept ({kept})", repr(budget))
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 1.0 <= float(beta) < math.inf:
        raise fail(caller, "beta", "a finite number >= 1", repr(beta))
    if num_layers == 1:
        return [int(budget)]
    shared = budget - kept
    last = shared / float(beta)
    first = 2 * shared - last
    step = (first - last) / (num_layers - 1)
    return [kept + int(round(first - layer * step)) for layer in range(num_layers)]


def snapkv_scores(q_obs, k, v, args: HeadArgs, group: int, *, causal: bool = True, pool_kernel=None,
                  pooling: str = "max", heads=None, scored_keys=None) -> torch.Tensor:
    """SnapKV scores of a row's prompt keys, ``[Hkv, n]`` float32: the attention probability each
    key gets from the observation window (q_obs ``[1, w, Hq, D]``, the prompt's last w queries;
    k, v ``[1, n, Hkv, D]``), summed over the window's queries (bottom-right aligned: query i
    sits at position n - w + i), each query head's mass pooled over `pool_kernel` neighbouring
    keys (None: not pooled; `pooling` "max", or "avg": the kernel's mean with zeros past the
    ends, as torch's avg_pool1d and kvpress), then summed over the query heads of each KV head.
    `args` are the row's per-head arguments (softmax_scale, key_bias, sink_logit count; window,
    sinks, alpha and the epilogue do not: a budget head's query heads see every key); a query
    head whose gate is 0 adds nothing. Only the KV heads in `heads` are scored (others get 0).
    Pooling covers the first `scored_keys` keys only (None: all n); the later ones keep their own
    mass: an observation window kept whole is not ranked, and its own large mass must not raise
    its neighbours' scores (kvpress scores only the keys before the window).

    From the probes' key mass (docs/probes.md): no [w, n] matrix per head; on a GPU, from the
    fused forward's lse by row blocks, on the device."""
    import torch.nn.functional as F

    from .probes import run_probe

    Hq, Hkv, n = q_obs.shape[2], k.shape[2], k.shape[1]
    wanted = torch.zeros(Hq, dtype=torch.float64)
    for h in (range(Hkv) if heads is None else heads):
        wanted[h * group:(h + 1) * group] = 1.0
    wanted = wanted.to(q_obs.device)
    if args.gate is not None:
        wanted = wanted * (args.gate[0].to(device=q_obs.device, dtype=torch.float64) != 0)
    wanted = wanted.view(1, Hq)
    scoring = args._replace(window=None, sinks=None, alpha=None, out_scale=None, out_bias=None, gate=wanted)
    probe = dict(spans=None, distances=None, sink_mass=False, topk=0, entropy=False,
                 key_mass_rows=[0, q_obs.shape[1]])
    _, _, stats = run_probe(q_obs, k, v, scoring, probe, causal=causal, heads_first=False)
    mass = stats.key_mass[0]  # [Hq, n]
    scored = n if scored_keys is None else max(0, min(n, int(scored_keys)))
    if pool_kernel is not None and pool_kernel > 1 and scored > 0:
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        pooled = pool(mass[None, :, :scored], pool_kernel, stride=1, padding=pool_kernel // 2)[0]
        mass = torch.cat([pooled, mass[:, scored:]], dim=1)
    return mass.view(Hkv, group, n).sum(dim=1)


def choose(scores: torch.Tensor, budgets, sinks, recent: int, *, allocation: str, alpha: float,
           kept_window: int = 0):
    """(sizes, kept) of one row's budget heads of one layer: their scores ``[H, n]``, budgets,
    sinks (per head) and budget_recent. Each head's sinks and `recent` latest tokens are always
    kept (their scores count as +inf); then its `kept_window` latest tokens (the observation
    window, as SnapKV keeps it), the latest first, before any scored token (they count as more
    than every score); the rest by score. Sizes are the slots each head holds from now on: its
    budget, or with "adakv" (uniform budgets) its AdaKV count once the prompt is longer than the
    budget; kept: each head's sorted positions (min(n, size) of them)."""
    H, n = scores.shape
    forced = scores.double().clone()
    first = max(0, n - kept_window)
    if first < n - recent:  # above every score, the later the higher
        top = float(forced.max()) if forced.numel() else 0.0
        forced[:, first:n - recent] = top + 1 + torch.arange(n - recent - first, dtype=torch.float64)
    for h in range(H):
        forced[h, :min(int(sinks[h]), n)] = math.inf
        forced[h, max(0, n - recent):] = math.inf
    if allocation == "adakv" and n > budgets[0]:
        sizes = adakv_counts(forced, budgets[0], alpha, [int(s) + recent + 1 for s in sinks])
    else:
        sizes = [int(b) for b in budgets]
    return sizes, [top_positions(forced[h], min(n, sizes[h])) for h in range(H)]
