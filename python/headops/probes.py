"""Probes: per-head attention statistics from the fused kernel, without S x S memory
(docs/DESIGN.md section 5).

    probe = headops.Probe(spans=[[0, 1]], distances=[[1, 2]], topk=1, entropy=True)
    out, stats = headops.attention(q, k, v, probe=probe)
    stats.span_mass      # [B, Hq, Sq, 1]: each row's mass on the first token
    stats.topk_index     # [B, Hq, Sq, 1]: the key each row attends to most

The statistics ride along the forward's pass over the keys (key_mass: one more pass with the
lse). ``headops.reference.probe`` computes the same from materialised probabilities.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ._args import HeadArgs, is_int

MAX_TOPK = 8
_STATISTICS = ("span_mass", "distance_mass", "sink_mass", "entropy", "topk_index", "topk_prob", "key_mass")
MAX_PATTERN_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Probe:
    """What to measure, per (batch row, query head, query row):

    spans: absolute key positions ``[start, end)``, ``[n, 2]`` (every batch row) or ``[B, n, 2]``:
        each row's attention mass on each span (e.g. the first token, a needle).
    distances: ranges ``[d0, d1)`` of query-relative distance ``pos_i - j``, ``[n, 2]``: the
        mass on those keys (1: the previous token; the period R of a repeated sequence: echo;
        R - 1: induction).
    sink_mass: the sink logit's own mass (0 without a sink logit).
    topk: the k (<= 8) most attended keys, positions and probabilities, ties to the lower position.
    entropy: each row's attention entropy (nats).
    key_mass_rows: ``(r0, r1)``: per key, the mass the query rows r0..r1-1 give it (H2O / SnapKV
        scores), ``[B, Hq, Sk]``.
    compensation_mass: the mass of a compensated streaming head's compensation key (RazorAttention,
        through a ``HeadSparseCache``): the key that stands for the tokens the head evicted, which
        has no position (no span, distance, top-k or key mass counts it). 0 elsewhere.
    pattern_rows: query rows of the call (ints, up to 64; negative ones count from the last, -1:
        each call's last query, a generated token's) whose whole attention distribution over the
        keys is returned, ``pattern`` ``[B, Hq, n, Sk]``: a few rows of the pattern (a ViT's CLS
        row, the answer token's row of a retrieval head) without S x S memory.
    """
    spans: object = None
    distances: object = None
    sink_mass: bool = False
    topk: int = 0
    entropy: bool = False
    key_mass_rows: tuple | None = None
    compensation_mass: bool = False
    pattern_rows: object = None


@dataclasses.dataclass
class ProbeResult:
    """The statistics asked for (None for the others), float32 (indices int64). A row that sees
    no key, and every row of a head gated off exactly (not computed), reports masses 0, indices
    -1 and entropy 0."""
    span_mass: torch.Tensor | None = None      # [B, Hq, Sq, n_spans]
    distance_mass: torch.Tensor | None = None  # [B, Hq, Sq, n_distances]
    sink_mass: torch.Tensor | None = None      # [B, Hq, Sq]
    entropy: torch.Tensor | None = None        # [B, Hq, Sq]
    topk_index: torch.Tensor | None = None     # [B, Hq, Sq, k] key positions, -1 where fewer keys
    topk_prob: torch.Tensor | None = None      # [B, Hq, Sq, k]
    key_mass: torch.Tensor | None = None       # [B, Hq, Sk]
    compensation_mass: torch.Tensor | None = None  # [B, Hq, Sq]
    # [B, Hq, n, Sk]: the probabilities of the pattern_rows over every key (the sink logit's and a
    # compensation key's shares are sink_mass and compensation_mass: a row sums to 1 less those)
    pattern: torch.Tensor | None = None


def _pairs(caller, value, name, *, batch=None):
    """An int64 CPU tensor [n, 2] (or [B, n, 2] where `batch` is given) from a tensor or nested lists."""
    if isinstance(value, torch.Tensor):
        t = value
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{caller}: probe.{name} must hold integers, got dtype {t.dtype}")
    else:
        try:
            t = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"{caller}: probe.{name} must be pairs of ints, got {value!r}") from None
        if t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise TypeError(f"{caller}: probe.{name} must be pairs of ints, got {value!r}")
    t = t.to(device="cpu", dtype=torch.int64)
    forms = "[n, 2]" + ("" if batch is None else f" or [B, n, 2] = [{batch}, n, 2]")
    ok = (t.dim() == 2 and t.shape[1] == 2) or (
        batch is not None and t.dim() == 3 and t.shape[2] == 2 and t.shape[0] in (1, batch))
    if not ok:
        raise ValueError(f"{caller}: probe.{name} must be {forms} pairs, got shape {tuple(t.shape)}")
    return t.contiguous()


def refuse_unmeasurable(caller, alpha) -> None:
    """What no probe can measure: a call with alpha."""
    if alpha is not None:
        raise ValueError(f"{caller}: probe cannot be combined with alpha: a mixture of two softmaxes has no single "
                         "attention pattern to measure")


def kernel_probes(device: torch.device) -> bool:
    """Whether the fused probe op computes the statistics on `device` (the CPU kernel). Elsewhere
    they come from the fused forward's lse, a block of query rows at a time (_probe_rows)."""
    return device.type == "cpu"


def check_probe(caller, probe, *, B, Sq, Sk):
    """The op's probe arguments from a Probe, checked (ValueError/TypeError naming probe.<field>)."""
    if not isinstance(probe, Probe):
        raise TypeError(f"{caller}: probe must be a headops.Probe, got {type(probe).__name__}")
    checking = not torch.compiler.is_compiling()
    spans = distances = None
    if probe.spans is not None:
        spans = _pairs(caller, probe.spans, "spans", batch=B)
        if checking and spans.numel():
            start, end = spans[..., 0], spans[..., 1]
            if not bool(((start >= 0) & (start <= end) & (end <= Sk)).all()):
                raise ValueError(f"{caller}: probe.spans must be [start, end) with 0 <= start <= end <= Sk = {Sk}, "
                                 f"got {spans.tolist()}")
    if probe.distances is not None:
        distances = _pairs(caller, probe.distances, "distances")
        if checking and distances.numel() and not bool(((distances[:, 0] >= 0) &
                                                        (distances[:, 0] <= distances[:, 1])).all()):
            raise ValueError(f"{caller}: probe.distances must be [d0, d1) with 0 <= d0 <= d1 (a query-relative "
                             f"distance pos_i - j is never negative here), got {distances.tolist()}")
    for name in ("sink_mass", "entropy", "compensation_mass"):
        if not isinstance(getattr(probe, name), bool):
            raise TypeError(f"{caller}: probe.{name} must be a bool, got {getattr(probe, name)!r}")
    if not is_int(probe.topk) or not 0 <= probe.topk <= MAX_TOPK:
        raise ValueError(f"{caller}: probe.topk must be an int in [0, {MAX_TOPK}], got {probe.topk!r}")
    rows = probe.key_mass_rows
    if rows is not None:
        if (not isinstance(rows, (tuple, list)) or len(rows) != 2 or not all(is_int(r) for r in rows)
                or not 0 <= rows[0] <= rows[1] <= Sq):
            raise ValueError(f"{caller}: probe.key_mass_rows must be (r0, r1) with 0 <= r0 <= r1 <= Sq = {Sq}, "
                             f"got {rows!r}")
        rows = [int(rows[0]), int(rows[1])]
    return dict(spans=spans, distances=distances, sink_mass=probe.sink_mass, topk=int(probe.topk),
                entropy=probe.entropy, key_mass_rows=rows, compensation_mass=probe.compensation_mass,
                pattern_rows=_pattern_rows(caller, probe.pattern_rows, Sq))


def _pattern_rows(caller, rows, Sq: int):
    """probe.pattern_rows as query rows in [0, Sq) (negative ones from the last), or None."""
    if rows is None:
        return None
    given = rows
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist() if rows.dim() == 1 and not rows.is_floating_point() else None
    if (not isinstance(rows, (list, tuple)) or not 1 <= len(rows) <= MAX_PATTERN_ROWS
            or not all(is_int(r) and -Sq <= r < Sq for r in rows)):
        raise ValueError(f"{caller}: probe.pattern_rows must be 1 to {MAX_PATTERN_ROWS} query rows of the call, ints "
                         f"in [-Sq, Sq) with Sq = {Sq} (negative ones from the last), got {given!r}")
    return [int(r) % Sq for r in rows]


def op_request(probe: dict) -> dict:
    """The probe op's arguments of a checked request: all but compensation_mass, which no
    attention call has a key for (the cache adds it, _cache_probe), and pattern_rows, recomputed
    from the call's lse (_probe_rows.pattern)."""
    return {n: x for n, x in probe.items() if n not in ("compensation_mass", "pattern_rows")}


def run_probe(q, k, v, args: HeadArgs, probe: dict, *, causal: bool, heads_first: bool):
    """The probe op on checked inputs: (out, lse, ProbeResult). Where no probe kernel runs, out and
    lse are the fused forward's (differentiable as it is) and the statistics are recomputed from
    that lse by row blocks."""
    from . import _probe_rows

    wants_compensation = probe.get("compensation_mass", False)
    pattern_rows = probe.get("pattern_rows")
    probe = op_request(probe)
    if not kernel_probes(q.device):
        from .attention import run_fused

        out, lse = run_fused(q, k, v, args, causal=causal, heads_first=heads_first)
        found = _probe_rows.statistics(q, k, lse, args, probe, causal=causal, heads_first=heads_first)
    else:
        kernel = dict(zip(HeadArgs._fields, args.kernel_args(q.dtype)))
        del kernel["alpha"]  # (refused with a probe before this point)
        q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse, *stats = torch.ops.headops.attention_probe(q=q, k=k, v=v, causal=causal, heads_first=heads_first,
                                                             **kernel, **probe)
        asked = (probe["spans"] is not None, probe["distances"] is not None, probe["sink_mass"], probe["entropy"],
                 probe["topk"] > 0, probe["topk"] > 0, probe["key_mass_rows"] is not None)
        found = {n: t if wanted else None for n, t, wanted in zip(_STATISTICS, stats, asked)}
    return out, lse, ProbeResult(**found, compensation_mass=_no_compensation_key(lse, wants_compensation),
                                 pattern=_probe_rows.pattern(q, k, lse, args, pattern_rows, causal=causal,
                                                             heads_first=heads_first))


def run_probe_packed(q, k, v, args: HeadArgs, probe: dict, sequence_ids, *, causal: bool, heads_first: bool):
    """The statistics of sequences packed into rows (``sequence_ids`` ``[B, S]``, as
    _args.sequence_ids_arg gives them) as a ProbeResult over the whole rows: each sequence probed
    alone, as the op attends it (its positions, sinks, window and key_bias counted from its first
    token), reported at the row's positions (top-k indices, spans, key mass and pattern keys; a
    query row's statistics are its own sequence's). One probe call per sequence: a research path."""
    from ._cache_probe import in_padded_positions, row_request, stack_rows

    S = q.shape[2] if heads_first else q.shape[1]
    rows = []
    for b, ids in enumerate(sequence_ids.tolist()):
        starts = [0] + [i for i in range(1, S) if ids[i] != ids[i - 1]] + [S]
        pieces = []
        for s0, s1 in zip(starts[:-1], starts[1:]):
            n = s1 - s0

            def cut(t):
                return t[b:b + 1, :, s0:s1] if heads_first else t[b:b + 1, s0:s1]

            _, _, stats = run_probe(cut(q), cut(k), cut(v), args.row(b, n), row_request(probe, b, n, n, s0, s0),
                                    causal=causal, heads_first=heads_first)
            pieces.append(stack_rows([in_padded_positions(stats, s0, s0, probe.get("pattern_rows"), n)], S, S))
        rows.append(_merge_pieces(pieces))
    return stack_rows(rows, S, S)


def _merge_pieces(pieces: list) -> ProbeResult:
    """One row's ProbeResult from its sequences' (each at the row's positions, 0 / -1 outside its
    own query rows and keys): the statistics add up, the top-k indices are each row's one piece's."""
    fields = {}
    for f in dataclasses.fields(ProbeResult):
        parts = [getattr(p, f.name) for p in pieces]
        if parts[0] is None:
            continue
        merged = parts[0]
        for t in parts[1:]:
            merged = torch.maximum(merged, t) if f.name == "topk_index" else merged + t
        fields[f.name] = merged
    return ProbeResult(**fields)


def _no_compensation_key(lse, asked: bool):
    """compensation_mass of a plain call, which has no compensation key: 0 per row ([B, Hq, Sq],
    lse's shape), None when not asked."""
    return torch.zeros(lse.shape, dtype=torch.float32, device=lse.device) if asked else None


class Recording:
    """What ``headops.probe(model, ...)`` recorded: ``recording[layer]`` is the list of that
    layer's ProbeResults, one per attention call (a forward; a prefill, then one per generated
    token), in call order; with ``reduce``, what reduce(layer, result) returned for each."""

    def __init__(self, num_layers: int, request: Probe, reduce=None):
        self.probe = request
        self.reduce = reduce
        self.layers = [[] for _ in range(num_layers)]

    def __getitem__(self, layer: int) -> list:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def record(self, layer: int, result: ProbeResult) -> None:
        self.layers[layer].append(result if self.reduce is None else self.reduce(layer, result))


@contextlib.contextmanager
def probe(model, request: Probe | None = None, *, reduce=None, **fields):
    """Records probe statistics at every layer of a patched model (``headops.patch``)::

        with headops.probe(model, spans=[[0, 1]], topk=1, entropy=True) as rec:
            model(ids)                       # or model.generate(ids, ...)
        rec[3][0].topk_index                 # layer 3, first call: [B, Hq, S, 1]

    Give a ``Probe`` or its fields. Spans are absolute key positions, as the keys of each call
    are (a generation step's keys are every position so far, from the model's own cache).
    Nothing is recorded outside the block. Generating through a ``HeadSparseCache``, a decode
    step reports over the keys each KV head keeps, at their original positions.

    ``reduce(layer, result)``: what to keep of each call's ProbeResult, as soon as it is made (a
    sweep over long prompts keeps, say, one number per head of each pattern row rather than the
    rows themselves); the recording then holds what it returns.
    """
    from .patching import attention_modules_of_patched

    if request is not None and fields:
        raise TypeError("headops.probe: give a headops.Probe or its fields, not both")
    request = request if request is not None else Probe(**fields)
    if not isinstance(request, Probe):
        raise TypeError(f"headops.probe: request must be a headops.Probe, got {type(request).__name__}")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"headops.probe: reduce must be None or a function (layer, ProbeResult), got "
                        f"{type(reduce).__name__}")
    modules = attention_modules_of_patched(model, "headops.probe")
    if any(hasattr(m, "_headops_recording") for m in modules):
        raise RuntimeError("headops.probe: this model is being probed already (probes do not nest)")
    recording = Recording(len(modules), request, reduce)
    for m in modules:
        m._headops_recording = recording
    try:
        yield recording
    finally:
        for m in modules:
            del m._headops_recording
