"""Probe statistics where no fused kernel computes them (CUDA tensors): from the lse the fused
forward returned, a block of query rows at a time (DESIGN section 5: "one more pass that uses
the saved lse").

Each block's logits ``[B, Hq, rows, Sk]`` are recomputed by one matrix product per KV head
group in the accumulation dtype (float32; float64 for float64 inputs), masked by each head's
visibility, and turned into probabilities ``p = exp(s - lse)``. A block holds at most
``BLOCK_ELEMENTS`` logits (by device type), so memory is O(rows · Sk), never Sq × Sk, and
nothing is read back to the host. The work is a second attention pass in PyTorch ops (plus k
arg-max passes for top-k): a research path at the device's matrix speed, not a fused kernel.
"""

from __future__ import annotations

import torch

from ._args import HeadArgs

# logits in one block (a block's temporaries are a few times that): 16M on a GPU (64 MiB in
# float32; fewer, larger launches), 2M elsewhere
BLOCK_ELEMENTS = {"cuda": 1 << 24}
OTHER_DEVICES_BLOCK_ELEMENTS = 1 << 21


def rows_per_block(B: int, Hq: int, Sk: int, device: torch.device) -> int:
    """Query rows in a block: all of one row's logits at least."""
    return max(1, BLOCK_ELEMENTS.get(device.type, OTHER_DEVICES_BLOCK_ELEMENTS) // max(1, B * Hq * Sk))


def _to_device(t, device, dtype):
    """`t` as `dtype` on `device`, detached (the statistics carry no gradient), without a sync: a
    host tensor (the planning arguments, the probe's spans) goes through pinned memory,
    asynchronously."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu" and device.type == "cuda":
        return t.to(dtype).contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


class _Heads:
    """The per-head arguments of a call as ``[B, Hq]`` tensors on the statistics' device."""

    def __init__(self, args: HeadArgs, B: int, Hq: int, device, acc):
        def to(t, dtype):
            return None if t is None else _to_device(t, device, dtype).expand(B, Hq)

        self.scale = (to(args.softmax_scale, acc) if args.softmax_scale is not None
                      else torch.full((B, Hq), args.default_scale, dtype=acc, device=device))
        self.window = to(args.window, torch.int64)
        self.sinks = to(args.sinks, torch.int64)
        self.sink_logit = to(args.sink_logit, acc)
        self.key_bias = _to_device(args.key_bias, device, acc)
        # a head gated off exactly is not computed (DESIGN section 5), even when its gate wants a gradient
        self.computed = None if args.gate is None else to(args.gate, acc) != 0


def _visible(heads: _Heads, positions, Sk: int, causal: bool):
    """Bool ``[B, Hq, rows, Sk]``: key j is visible to the query at position pos (DESIGN section 1)."""
    key = torch.arange(Sk, device=positions.device)
    diff = positions[:, None] - key[None, :]  # pos_i - j
    visible = (diff >= 0) if causal else torch.ones_like(diff, dtype=torch.bool)
    visible = visible[None, None]
    if heads.window is not None:
        w = heads.window[:, :, None, None]
        distance = (diff if causal else diff.abs())[None, None]
        in_reach = (w < 0) | (distance < w)
        if heads.sinks is not None:
            in_reach = in_reach | (key[None, None, None, :] < heads.sinks[:, :, None, None])
        visible = visible & in_reach
    return visible


def _probabilities(q, keys, lse, heads: _Heads, rows, Sq: int, acc, causal: bool):
    """(masked logits, probabilities), both ``[B, Hq, n, Sk]``, of the query rows `rows` (an index
    tensor of n rows of q, ``[B, Hq, Sq, D]``) over `keys` ``[B, Hkv, Sk, D]`` (accumulation
    dtype): one product per KV head (its query heads' rows stacked: GQA reads each key once),
    each head's scale, key_bias and visibility, p = exp(s - lse) with the forward's lse of those
    rows; a row that saw nothing has no probabilities."""
    B, Hq, _, D = q.shape
    Hkv, Sk = keys.shape[1], keys.shape[2]
    n = rows.numel()
    stacked = q[:, :, rows].detach().to(acc).reshape(B, Hkv, (Hq // Hkv) * n, D)
    logits = torch.matmul(stacked, keys.transpose(-1, -2)).view(B, Hq, n, Sk)
    logits.mul_(heads.scale[:, :, None, None])
    if heads.key_bias is not None:
        logits.add_(heads.key_bias[:, :, None, :])
    positions = rows + (Sk - Sq)  # bottom-right aligned
    masked = logits.masked_fill_(~_visible(heads, positions, Sk, causal), float("-inf"))
    row_lse = lse[:, :, rows, None]
    seen = row_lse != float("-inf")
    p = torch.sub(masked, row_lse).exp_().masked_fill_(~(seen & ~torch.isneginf(masked)), 0.0)
    return masked, p


def pattern(q, k, lse, args: HeadArgs, rows, *, causal: bool, heads_first: bool):
    """``[B, Hq, n, Sk]`` float32: the probabilities of the query rows `rows` (ints in [0, Sq))
    over every key, from the call's lse (probe.pattern_rows); 0 in a head gated off exactly and
    in a row that saw nothing. None without rows."""
    if rows is None:
        return None
    if not heads_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, Hq, Sq, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = _Heads(args, B, Hq, q.device, acc)
    index = torch.tensor(rows, dtype=torch.int64, device=q.device)
    _, p = _probabilities(q, k.detach().to(acc), lse.detach().to(acc), heads, index, Sq, acc, causal)
    if heads.computed is not None:
        p = torch.where(heads.computed[:, :, None, None], p, 0.0)
    return p.to(torch.float32)


def statistics(q, k, lse, args: HeadArgs, request: dict, *, causal: bool, heads_first: bool) -> dict:
    """The statistics `request` asks for (``check_probe``'s dict), by name, None for the others.

    `lse` ``[B, Hq, Sq]`` is the fused forward's over the same call (-inf where a row sees
    nothing or a head was skipped). Masses are float32, top-k indices int64 (-1: no key)."""
    if not heads_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    device = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = _Heads(args, B, Hq, device, acc)
    lse = lse.detach().to(acc)
    keys = k.detach().to(acc)
    key = torch.arange(Sk, device=device)

    spans, distances, topk = request["spans"], request["distances"], request["topk"]
    span_mask = None
    if spans is not None:
        spans = _to_device(spans, device, torch.int64)
        if spans.dim() == 2:
            spans = spans[None]
        # [B or 1, 1, Sk, n]: key j in span s
        span_mask = ((key[None, :, None] >= spans[:, None, :, 0]) &
                     (key[None, :, None] < spans[:, None, :, 1])).to(acc)[:, None]
    if distances is not None:
        distances = _to_device(distances, device, torch.int64)
    found = {
        "span_mass": None if spans is None else lse.new_zeros(B, Hq, Sq, spans.shape[1]),
        "distance_mass": None if distances is None else lse.new_zeros(B, Hq, Sq, distances.shape[0]),
        "sink_mass": lse.new_zeros(B, Hq, Sq) if request["sink_mass"] else None,
        "entropy": lse.new_zeros(B, Hq, Sq) if request["entropy"] else None,
        "topk_index": torch.full((B, Hq, Sq, topk), -1, dtype=torch.int64, device=device) if topk else None,
        "topk_prob": lse.new_zeros(B, Hq, Sq, topk) if topk else None,
        "key_mass": None if request["key_mass_rows"] is None else lse.new_zeros(B, Hq, Sk),
    }
    mass_rows = request["key_mass_rows"]

    step = rows_per_block(B, Hq, Sk, device)
    for r0 in range(0, Sq, step):
        r1 = min(Sq, r0 + step)
        masked, p = _probabilities(q, keys, lse, heads, torch.arange(r0, r1, device=device), Sq, acc, causal)
        positions = torch.arange(r0, r1, device=device) + (Sk - Sq)
        row_lse = lse[:, :, r0:r1, None]
        seen = row_lse != float("-inf")
        p_sink = None
        if heads.sink_logit is not None and (request["sink_mass"] or request["entropy"]):
            sink = heads.sink_logit[:, :, None]
            # a +inf sink logit takes the whole row (its lse is +inf too): 1, not exp(inf - inf)
            whole = torch.isposinf(sink) & torch.isposinf(row_lse[..., 0])
            p_sink = torch.where(seen[..., 0], torch.where(whole, 1.0, torch.exp(sink - row_lse[..., 0])),
                                 torch.zeros_like(row_lse[..., 0]))
        if span_mask is not None:
            found["span_mass"][:, :, r0:r1] = torch.matmul(p, span_mask)
        if distances is not None:
            diff = positions[:, None] - key[None, :]
            inside = (diff[None] >= distances[:, 0, None, None]) & (diff[None] < distances[:, 1, None, None])
            found["distance_mass"][:, :, r0:r1] = torch.einsum("bhik,nik->bhin", p, inside.to(acc))
        if request["sink_mass"] and p_sink is not None:
            found["sink_mass"][:, :, r0:r1] = p_sink
        if request["entropy"]:
            # 0 log 0 = 0; a NaN probability (a NaN logit the row sees) stays NaN, as in lse
            terms = -torch.special.xlogy(p, p).sum(-1)
            if p_sink is not None:
                terms -= torch.special.xlogy(p_sink, p_sink)
            found["entropy"][:, :, r0:r1] = terms
        if topk:
            # rank by logit, NaN first; argmax takes the first of equal values: ties to the lower position
            rank = torch.nan_to_num(masked, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
            for t in range(min(topk, Sk)):
                best = rank.argmax(-1, keepdim=True)
                real = (torch.gather(rank, -1, best) != float("-inf"))[..., 0]  # (-inf: not a candidate)
                found["topk_index"][:, :, r0:r1, t] = torch.where(real, best[..., 0], -1)
                found["topk_prob"][:, :, r0:r1, t] = torch.where(real, torch.gather(p, -1, best)[..., 0], 0.0)
                rank.scatter_(-1, best, float("-inf"))
        if mass_rows is not None:
            lo, hi = max(mass_rows[0], r0), min(mass_rows[1], r1)
            if lo < hi:
                found["key_mass"] += p[:, :, lo - r0:hi - r0].sum(2)

    for name, t in found.items():
        if t is None:
            continue
        if heads.computed is not None:
            off = heads.computed.view(B, Hq, *([1] * (t.dim() - 2)))
            t = torch.where(off, t, -1 if name == "topk_index" else 0.0)
        found[name] = t if name == "topk_index" else t.to(torch.float32)
    return found
