"""Probe statistics of a ``HeadSparseCache``'s attention calls (docs/probes.md, "Through a
HeadSparseCache").

A prefill's statistics are the probe op's over the prompt. A decode step's are measured over
the keys each KV head **keeps**, at their original positions: per batch row, the kept keys are
laid out at their positions in a row of the row's length, the others masked by a key_bias of
-inf, and the probe op runs over that row with the cache's windows and sinks. Top-k indices,
spans and distances are therefore original positions, and the statistics are those of the
attention the decode kernel computed. A compensated streaming head's compensation key, which
has no position, is added to each row's softmax afterwards (_add_compensation). This costs a
dense attention call per row and layer, and
a temporary copy of the row's kept keys at full length (O(S·D), never S×S): it is a research
path, the decode kernel itself carries no probes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._args import HeadArgs
from .probes import ProbeResult, refuse_unmeasurable, run_probe

_PADDING = {"topk_index": -1}  # what a statistic reads where a row has no query or key


def refuse(caller, args: HeadArgs, st) -> None:
    """What the cache cannot probe (before anything changes)."""
    refuse_unmeasurable(caller, args.alpha)


def row_request(request: dict, b: int, keys: int, queries: int, key_pad: int = 0, query_pad: int = 0) -> dict:
    """Row b's probe arguments: its spans clamped to its `keys` keys, the key-mass rows to its
    `queries` query rows; a left-padded row's (the cache holds it without its `key_pad` padding
    keys, and its first `query_pad` query rows are padding) moved from the caller's positions to
    the row's own."""
    row = dict(request)
    spans, rows, pattern = request["spans"], request["key_mass_rows"], request.get("pattern_rows")
    if spans is not None:
        spans = spans[b if spans.shape[0] > 1 else 0] if spans.dim() == 3 else spans
        row["spans"] = (spans - key_pad).clamp(0, keys)
    if rows is not None:
        row["key_mass_rows"] = [min(max(r - query_pad, 0), queries) for r in rows]
    if pattern is not None:  # (a padding query's row is zeroed afterwards: in_padded_positions)
        row["pattern_rows"] = [min(max(r - query_pad, 0), queries - 1) for r in pattern]
    return row


def in_padded_positions(stats: ProbeResult, key_pad: int, query_pad: int, pattern_rows=None,
                         queries: int | None = None) -> ProbeResult:
    """A left-padded row's statistics (batch of one) at the caller's positions: its query rows after
    `query_pad` rows of padding (which report masses 0, indices -1), its keys after `key_pad`; the
    pattern of the caller's `pattern_rows` that are padding (outside the row's `queries` query
    rows) is 0."""
    if stats.pattern is not None:
        valid = torch.tensor([query_pad <= r < query_pad + queries for r in pattern_rows], device=stats.pattern.device)
        stats = dataclasses.replace(stats, pattern=torch.where(valid[:, None], stats.pattern, 0.0))
    if key_pad == 0 and query_pad == 0:
        return stats
    fields = {}
    for f in dataclasses.fields(ProbeResult):
        t = getattr(stats, f.name)
        if t is None:
            continue
        if f.name == "topk_index":
            t = torch.where(t >= 0, t + key_pad, t)
        if f.name == "pattern":  # (its rows are the pattern_rows; its keys move)
            fields[f.name] = torch.cat([t.new_zeros((*t.shape[:3], key_pad)), t], 3)
            continue
        pad = key_pad if f.name == "key_mass" else query_pad
        if pad:
            before = t.new_full((t.shape[0], t.shape[1], pad, *t.shape[3:]), _PADDING.get(f.name, 0))
            t = torch.cat([before, t], 2)
        fields[f.name] = t
    return ProbeResult(**fields)


def _padded(name: str, t: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
    """A row's statistic [1, Hq, n, ...] padded to Sq query rows (Sk keys for key_mass; the
    pattern's keys, its last axis, to Sk)."""
    if name == "pattern":
        return torch.cat([t, t.new_zeros((*t.shape[:3], Sk - t.shape[3]))], 3) if t.shape[3] < Sk else t
    length = Sk if name == "key_mass" else Sq
    missing = length - t.shape[2]
    if missing == 0:
        return t
    pad = t.new_full((t.shape[0], t.shape[1], missing, *t.shape[3:]), _PADDING.get(name, 0))
    return torch.cat([t, pad], 2)


def stack_rows(results: list, Sq: int, Sk: int) -> ProbeResult:
    """One ProbeResult [B, ...] from batch-of-one results whose rows hold fewer queries or keys."""
    fields = {}
    for f in dataclasses.fields(ProbeResult):
        parts = [getattr(r, f.name) for r in results]
        if parts[0] is not None:
            fields[f.name] = torch.cat([_padded(f.name, t, Sq, Sk) for t in parts], 0)
    return ProbeResult(**fields)


def prefill(q, k, v, args: HeadArgs, request: dict, lengths, causal: bool, pads=None):
    """(out, ProbeResult) of a prefill over the prompt (bshd; `lengths`: valid tokens per row or
    None). `pads`: per row, the left padding the caller's tensors had before each row's tokens were
    moved to the front (the statistics are reported at the caller's positions)."""
    if lengths is None:
        out, _, stats = run_probe(q, k, v, args, request, causal=causal, heads_first=False)
        return out, stats
    out = torch.zeros_like(q)
    results = []
    for b, n in enumerate(lengths):
        p = pads[b] if pads else 0
        out[b:b + 1, :n], _, stats = run_probe(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], args.row(b, n),
                                               row_request(request, b, n, n, p, p), causal=causal,
                                               heads_first=False)
        results.append(in_padded_positions(stats, p, p, request.get("pattern_rows"), n))
    return out, stack_rows(results, q.shape[1], k.shape[1])


def decode(st, q, args: HeadArgs, request: dict, causal: bool) -> ProbeResult:
    """The statistics of a decode step whose tokens `st` holds already (q: [B, Sq, Hq, D])."""
    B, Sq, Hq, D = q.shape
    group = Hq // st.Hkv
    bias_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # (the kernels' accumulation)
    results = []
    for b in range(B):
        keys = st.held[b]
        k = q.new_zeros(1, keys, st.Hkv, D)
        v = q.new_zeros(1, keys, st.Hkv, D)
        kept = torch.full((1, Hq, keys), float("-inf"), dtype=bias_dtype, device=q.device)
        for h in range(st.Hkv):
            positions, kk, vv = st.kept_kv(b, h)
            k[0, positions, h] = kk
            v[0, positions, h] = vv
            kept[0, h * group:(h + 1) * group, positions] = 0.0
        row = args.row(b, keys)
        row = row._replace(key_bias=kept if row.key_bias is None else row.key_bias.to(bias_dtype) + kept)
        asked = row_request(request, b, keys, Sq, st.pads[b])
        _, lse, stats = run_probe(q[b:b + 1], k, v, row, asked, causal=causal, heads_first=False)
        compensation = _compensation_logits(st, b, q[b:b + 1], row, group)
        if compensation is not None:
            _add_compensation(stats, lse, compensation, asked,
                              lambda r: run_probe(q[b:b + 1], k, v, row, r, causal=causal, heads_first=False)[2])
        results.append(in_padded_positions(stats, st.pads[b], 0, request.get("pattern_rows"), Sq))
    return stack_rows(results, Sq, max(n + p for n, p in zip(st.held, st.pads)))


def _compensation_logits(st, b, q, args: HeadArgs, group: int):
    """[1, Hq, Sq] float64: the logit of each query row's compensation key (DESIGN section 6,
    csrc/kvcache/kv_layout.h compensation_logit: scale * q . k_mean, + log n when weighted), -inf
    for heads without one (not compensated, nothing evicted yet, or gated off exactly); None
    when no head of row b has one."""
    if st.comp_table is None:
        return None
    _, Sq, Hq, _ = q.shape
    logits = torch.full((1, Hq, Sq), float("-inf"), dtype=torch.float64, device=q.device)
    for kvh, form in enumerate(st.compensation):
        if form is None:
            continue
        k_mean, _, n = st.compensation_of(b, kvh)
        if n == 0:
            continue
        for h in range(kvh * group, (kvh + 1) * group):
            if args.gate is not None and float(args.gate[0, h]) == 0.0:
                continue  # not computed: its statistics stay 0
            scale = args.default_scale if args.softmax_scale is None else float(args.softmax_scale[0, h])
            logits[0, h] = scale * (q[0, :, h].double() @ k_mean.to(q.device))
            if form == "weighted":
                logits[0, h] += math.log(n)
    return None if bool(torch.isneginf(logits).all()) else logits


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(x), torch.zeros_like(x))


def _add_compensation(stats: ProbeResult, lse, compensation, request: dict, probe_with) -> None:
    """Row statistics over the kept keys (`stats`, their `lse` [1, Hq, Sq]) made those of a softmax
    that also holds each row's compensation key (logits `compensation` [1, Hq, Sq]): every key's
    probability scales by r = exp(lse - lse'), lse' = logaddexp(lse, c); the key's own, 1 - r, is
    the compensation mass and enters the entropy (-sum p log p over keys, sink and it). Key mass
    sums over query rows, each with its own r: with several rows it is measured a row at a time
    (`probe_with(request)`)."""
    kept_lse = lse.double()
    total = torch.logaddexp(kept_lse, compensation)
    has = ~torch.isneginf(compensation)
    r = torch.where(has, torch.exp(kept_lse - total), torch.ones_like(total))
    p_comp = torch.where(has, torch.exp(compensation - total), torch.zeros_like(total))
    for name in ("span_mass", "distance_mass", "topk_prob"):
        t = getattr(stats, name)
        if t is not None:
            setattr(stats, name, (t.double() * r[..., None]).to(t.dtype))
    if stats.pattern is not None:
        rows = r[:, :, request["pattern_rows"], None]
        stats.pattern = (stats.pattern.double() * rows).to(stats.pattern.dtype)
    if stats.sink_mass is not None:
        stats.sink_mass = (stats.sink_mass.double() * r).to(stats.sink_mass.dtype)
    if stats.entropy is not None:
        stats.entropy = (r * stats.entropy.double() - _xlogx(r) - _xlogx(p_comp)).to(stats.entropy.dtype)
    if stats.compensation_mass is not None:
        stats.compensation_mass = p_comp.to(stats.compensation_mass.dtype)
    if stats.key_mass is not None:
        r0, r1 = request["key_mass_rows"]
        if r1 - r0 == 1:
            stats.key_mass = (stats.key_mass.double() * r[:, :, r0, None]).to(stats.key_mass.dtype)
        else:
            only_key_mass = dict(request, spans=None, distances=None, sink_mass=False, topk=0, entropy=False,
                                 compensation_mass=False)
            mass = torch.zeros(stats.key_mass.shape, dtype=torch.float64, device=stats.key_mass.device)
            for i in range(r0, r1):
                one_row = probe_with(dict(only_key_mass, key_mass_rows=[i, i + 1])).key_mass
                mass += one_row.double() * r[:, :, i, None]
            stats.key_mass = mass.to(stats.key_mass.dtype)
