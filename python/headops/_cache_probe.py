"""Probe statistics of a ``HeadSparseCache``'s attention calls (docs/probes.md, "Through a
HeadSparseCache").

A prefill's statistics are the probe op's over the prompt. A decode step's are measured over
the keys each KV head **keeps**, at their original positions: per batch row, the kept keys are
laid out at their positions in a row of the row's length, the others masked by a key_bias of
-inf, and the probe op runs over that row with the cache's windows and sinks. Top-k indices,
spans and distances are therefore original positions, and the statistics are those of the
attention the decode kernel computed. This costs a dense attention call per row and layer, and
a temporary copy of the row's kept keys at full length (O(S·D), never S×S): it is a research
path, the decode kernel itself carries no probes.
"""

from __future__ import annotations

import dataclasses

import torch

from ._args import HeadArgs
from .probes import ProbeResult, refuse_unmeasurable, run_probe

_PADDING = {"topk_index": -1}  # what a statistic reads where a row has no query or key


def refuse(caller, args: HeadArgs, st) -> None:
    """What the cache cannot probe (before anything changes)."""
    refuse_unmeasurable(caller, args.alpha)
    if st.comp_table is not None:
        raise NotImplementedError(f"{caller}: probes over compensated streaming heads (RazorAttention's compensation "
                                  "token) are not measured yet: make the cache without compensation to probe it")


def _row_request(request: dict, b: int, keys: int, queries: int) -> dict:
    """Row b's probe arguments: its spans clamped to its `keys` keys, the key-mass rows to its
    `queries` query rows."""
    row = dict(request)
    spans, rows = request["spans"], request["key_mass_rows"]
    if spans is not None:
        row["spans"] = (spans[b if spans.shape[0] > 1 else 0] if spans.dim() == 3 else spans).clamp(max=keys)
    if rows is not None:
        row["key_mass_rows"] = [min(r, queries) for r in rows]
    return row


def _padded(name: str, t: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
    """A row's statistic [1, Hq, n, ...] padded to Sq query rows (Sk keys for key_mass)."""
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


def prefill(q, k, v, args: HeadArgs, request: dict, lengths, causal: bool):
    """(out, ProbeResult) of a prefill over the prompt (bshd; `lengths`: valid tokens per row or None)."""
    if lengths is None:
        out, _, stats = run_probe(q, k, v, args, request, causal=causal, heads_first=False)
        return out, stats
    out = torch.zeros_like(q)
    results = []
    for b, n in enumerate(lengths):
        out[b:b + 1, :n], _, stats = run_probe(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], args.row(b, n),
                                               _row_request(request, b, n, n), causal=causal, heads_first=False)
        results.append(stats)
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
        _, _, stats = run_probe(q[b:b + 1], k, v, row, _row_request(request, b, keys, Sq), causal=causal,
                                heads_first=False)
        results.append(stats)
    return stack_rows(results, Sq, max(st.held))
