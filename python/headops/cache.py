"""``headops.HeadSparseCache``: a KV cache that keeps, per layer and KV head, only what that
head can ever attend to (docs/DESIGN.md section 2).

Per layer there are two packed storages (csrc/kvcache/kv_layout.h):
  full       a list of segments ``[B, Hf, n, D]`` holding consecutive positions of the full
             KV heads; a prefill or a long append adds a segment of exactly what it needs
             (rounded to 64 tokens), decode steps add segments of max(64, capacity / 32)
             tokens: the storage grows without ever copying what it holds;
  streaming  ``[B, slots, D]``: each streaming KV head owns ``sinks + ring`` slots, allocated
             once: its first ``sinks`` tokens and a ring over the most recent ones.
A streaming KV head keeps the largest window and sinks of the query heads it serves (the
ring also holds ``max_step - 1`` more tokens, so that a step of several new tokens still
finds every key its first query sees). Kept tokens keep their original positions: windows,
sinks and ``key_bias`` index them by position.

  budget     ``[B, slots, D]`` with an explicit position per slot: each budget KV head keeps
             a fixed number of tokens (its sinks, the ``budget_recent`` latest, and the rest
             by attention mass: chosen SnapKV-style at prefill, evicted least-attended first
             during decode).
"""

from __future__ import annotations

import math
import numbers

import torch

from ._args import HeadShapes, head_args
from .attention import attention as _attention

__all__ = ["HeadSparseCache"]

_CALLER = "headops.HeadSparseCache.attention"  # the messages of the per-head arguments of its calls

_KINDS = ("full", "streaming", "budget")
_GROWTH_ALIGN = 64


def _fail(name, expected, got):
    return ValueError(f"headops.HeadSparseCache: {name} must be {expected}, got {got}")


def _as_list(value):
    """A list of a sequence (list, tuple, range, array...); None for a string, a mapping or a non-sequence."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        return None
    try:
        return list(value)
    except TypeError:  # e.g. a 0-dim array
        return None


def _per_layer_heads(value, name, L, H, default):
    """A [L][H] list of ints from None, an int, an [H] sequence/tensor or an [L][H] one."""
    def ok(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and -2**63 <= x < 2**63

    if value is None:
        return [[default] * H for _ in range(L)]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if ok(value):
        return [[int(value)] * H for _ in range(L)]
    rows = _as_list(value)
    if rows is not None and len(rows) == H and all(ok(x) for x in rows):
        return [[int(x) for x in rows] for _ in range(L)]
    rows = None if rows is None else [_as_list(r) for r in rows]
    if rows is not None and len(rows) == L and all(r is not None and len(r) == H and all(ok(x) for x in r)
                                                   for r in rows):
        return [[int(x) for x in r] for r in rows]
    raise _fail(name, f"an int, [Hq] = [{H}] or [L, Hq] = [{L}, {H}] integers", value)


def _per_layer_kinds(kinds, L, Hkv):
    if isinstance(kinds, str):
        rows = [[kinds] * Hkv for _ in range(L)]
    else:
        rows = _as_list(kinds)
        if rows is not None and len(rows) == Hkv and all(isinstance(x, str) for x in rows):
            rows = [list(rows) for _ in range(L)]
        elif not (rows is not None and len(rows) == L and
                  all(_as_list(r) is not None and len(_as_list(r)) == Hkv for r in rows)):
            raise _fail("kinds", f"'full', 'streaming', 'budget', [Hkv] = [{Hkv}] or [L, Hkv] = [{L}, {Hkv}] of them",
                        kinds)
        rows = [list(r) for r in rows]
    for r in rows:
        for k in r:
            if k not in _KINDS:
                raise _fail("kinds", "'full', 'streaming' or 'budget' for every KV head", repr(k))
    return rows


def _per_layer_budgets(budget, L, Hkv):
    """[L][Hkv] of ints or None from None, an int, an [Hkv] or an [L, Hkv] list."""
    def ok(x):
        return x is None or (isinstance(x, numbers.Integral) and not isinstance(x, bool))
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    if ok(budget):
        return [[budget] * Hkv for _ in range(L)]
    rows = _as_list(budget)
    if rows is not None and len(rows) == Hkv and all(ok(x) for x in rows):
        return [list(rows) for _ in range(L)]
    rows = None if rows is None else [_as_list(r) for r in rows]
    if rows is not None and len(rows) == L and all(r is not None and len(r) == Hkv and all(ok(x) for x in r)
                                                   for r in rows):
        return [list(r) for r in rows]
    raise _fail("budget", f"an int, [Hkv] = [{Hkv}] or [L, Hkv] = [{L}, {Hkv}] ints (None for other kinds)", budget)


class _Layer:
    """Storage and layout tables of one layer."""

    def __init__(self, kinds, windows, sinks, group, B, D, dtype, device, max_step, budgets, recent):
        Hkv = len(kinds)
        self.kv_kind = torch.tensor([_KINDS.index(k) for k in kinds], dtype=torch.int64)
        index, full, ring_offset, ring_sinks, ring_size, budget_rows = [], 0, [], [], [], []
        for h, kind in enumerate(kinds):
            if kind == "full":
                index.append(full)
                full += 1
                continue
            served = range(h * group, (h + 1) * group)
            w = [windows[q] for q in served]
            if kind == "budget":
                if any(x >= 0 for x in w):
                    raise ValueError(f"headops.HeadSparseCache: KV head {h} is a budget head but query head(s) "
                                     f"{[q for q in served if windows[q] >= 0]} have a window: a budget head's "
                                     "query heads see every kept token (window must be < 0)")
                kept_sinks = max(sinks[q] for q in served)
                n = budgets[h]
                if n is None or n < kept_sinks + recent + 1:
                    raise _fail("budget", f"set for budget KV head {h} and > its sinks ({kept_sinks}) + "
                                          f"budget_recent ({recent})", n)
                budget_rows.append([0, n, kept_sinks, recent])  # offsets filled in below
                index.append(len(budget_rows) - 1)
                continue
            if any(x < 1 for x in w):
                raise ValueError(f"headops.HeadSparseCache: KV head {h} is streaming but query head(s) "
                                 f"{[q for q in served if windows[q] < 1]} have window < 1 (unlimited or 0): a "
                                 "streaming head keeps sinks + a window of recent tokens, window must be >= 1")
            index.append(len(ring_offset))
            ring_offset.append(sum(s + r for s, r in zip(ring_sinks, ring_size)))
            ring_sinks.append(max(sinks[q] for q in served))
            ring_size.append(max(w) + max_step - 1)
        offset = sum(ring_sinks) + sum(ring_size)
        for row in budget_rows:  # budget heads' slots follow the streaming heads' in the same storage
            row[0] = offset
            offset += row[1]
        if offset * B * D >= 2**62:  # (past what int64 sizes, or any memory, can hold)
            raise _fail("window, sinks, budget and max_step", "small enough to allocate the streaming and budget "
                        "heads' storage", f"{offset} slots of [{B}, {D}] {dtype} per layer")
        self.budget_table = torch.tensor(budget_rows, dtype=torch.int64).reshape(-1, 4) if budget_rows else None
        self.kv_index = torch.tensor(index, dtype=torch.int64)
        self.ring_offset = torch.tensor(ring_offset, dtype=torch.int64)
        self.ring_sinks = torch.tensor(ring_sinks, dtype=torch.int64)
        self.ring_size = torch.tensor(ring_size, dtype=torch.int64)
        slots = offset
        try:
            self.ring_k = torch.zeros(B, slots, D, dtype=dtype, device=device)
            self.ring_v = torch.zeros(B, slots, D, dtype=dtype, device=device)
        except (RuntimeError, MemoryError):
            raise _fail("window, sinks, budget and max_step", "small enough to allocate the streaming and budget "
                        "heads' storage", f"{slots} slots of [{B}, {D}] {dtype} per layer") from None
        self.full_heads = full
        self.full_k, self.full_v = [], []  # segments [B, Hf, n, D]
        self._shape = (B, full, D, dtype, device)
        self.lengths = torch.zeros(B, dtype=torch.int64)
        self.windows = torch.tensor(windows, dtype=torch.int64)
        self.sinks = torch.tensor(sinks, dtype=torch.int64)
        self.Hkv = Hkv
        # budget heads: each slot's position (-1 empty) and accumulated attention mass
        self.slot_pos = torch.full((B, slots), -1, dtype=torch.int64) if budget_rows else None
        self.slot_mass = torch.zeros(B, slots, dtype=torch.float32) if budget_rows else None

    def capacity(self) -> int:
        return sum(seg.shape[2] for seg in self.full_k)

    def reserve(self, tokens: int) -> None:
        """Makes the full storage hold at least `tokens` tokens per row (adds one segment)."""
        cap = self.capacity()
        if tokens <= cap or self.full_heads == 0:
            return
        n = max(tokens - cap, 64, cap // 32)
        n = -(-n // _GROWTH_ALIGN) * _GROWTH_ALIGN
        B, Hf, D, dtype, device = self._shape
        self.full_k.append(torch.empty(B, Hf, n, D, dtype=dtype, device=device))
        self.full_v.append(torch.empty(B, Hf, n, D, dtype=dtype, device=device))

    def budget_args(self, rows=slice(None)):
        if self.budget_table is None:
            return None, None, None
        return self.budget_table, self.slot_pos[rows], self.slot_mass[rows]

    def append(self, k, v, rows=slice(None), write_budget=True):
        torch.ops.headops.kv_append(k, v, [seg[rows] for seg in self.full_k], [seg[rows] for seg in self.full_v],
                                    self.ring_k[rows], self.ring_v[rows], self.lengths[rows], self.kv_kind,
                                    self.kv_index, self.ring_offset, self.ring_sinks, self.ring_size,
                                    *self.budget_args(rows), write_budget)

    def kept_positions(self, b, h):
        """Sorted original positions KV head h of row b holds (budget heads: the kept set)."""
        L = int(self.lengths[b])
        kind = int(self.kv_kind[h])
        i = int(self.kv_index[h])
        if kind == 0:
            return torch.arange(L)
        if kind == 1:
            s, r = int(self.ring_sinks[i]), int(self.ring_size[i])
            return torch.cat([torch.arange(min(s, L)), torch.arange(min(max(s, L - r), L), L)])
        off, n = int(self.budget_table[i, 0]), int(self.budget_table[i, 1])
        pos = self.slot_pos[b, off:off + n]
        return pos[pos >= 0].sort().values

    def write_budget_selection(self, b, i, positions, k_rows, v_rows, mass):
        """Budget head i of row b keeps exactly `positions` (with their K, V rows and mass)."""
        off, n = int(self.budget_table[i, 0]), int(self.budget_table[i, 1])
        m = positions.numel()
        self.slot_pos[b, off:off + n] = -1
        self.slot_mass[b, off:off + n] = 0
        self.slot_pos[b, off:off + m] = positions
        self.slot_mass[b, off:off + m] = mass.to(torch.float32)
        self.ring_k[b, off:off + m] = k_rows
        self.ring_v[b, off:off + m] = v_rows

    def kept_tokens(self) -> int:
        """Tokens a minimal storage would hold for this layer (all rows and KV heads)."""
        total = 0
        for L in self.lengths.tolist():
            for h in range(self.Hkv):
                if self.kv_kind[h] == 0:
                    total += L
                elif self.kv_kind[h] == 1:
                    s = int(self.kv_index[h])
                    total += min(L, int(self.ring_sinks[s]) + int(self.ring_size[s]))
                else:
                    total += min(L, int(self.budget_table[int(self.kv_index[h]), 1]))
        return total

    def nbytes(self) -> int:
        tables = (self.kv_kind, self.kv_index, self.ring_offset, self.ring_sinks, self.ring_size, self.lengths)
        storages = self.full_k + self.full_v + [self.ring_k, self.ring_v]
        if self.budget_table is not None:
            storages += [self.budget_table, self.slot_pos, self.slot_mass]
        return sum(t.numel() * t.element_size() for t in storages + list(tables))


try:  # the cache is a transformers.Cache when transformers is installed (model.generate accepts it)
    from transformers.cache_utils import Cache as _CacheBase, CacheLayerMixin as _LayerBase
except ImportError:  # pragma: no cover - transformers is optional
    _CacheBase, _LayerBase = object, object


class _TransformersLayer(_LayerBase):
    """transformers' view of one layer: sequence length and mask sizes; the storage is _Layer's."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer: "_Layer"):
        if _LayerBase is not object:
            super().__init__()
        self._layer = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return int(self._layer.lengths.max())

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        raise NotImplementedError("headops.HeadSparseCache cannot be reset; make a new one")


class HeadSparseCache(_CacheBase):
    """A KV cache whose storage follows each head's visibility (DESIGN section 2).

    Args (keyword-only):
        num_layers, num_heads (query heads), num_kv_heads, head_dim: the model's attention shape.
        kinds: per KV head ``"full"``, ``"streaming"`` or ``"budget"``: one string, an ``[Hkv]``
            list or an ``[L, Hkv]`` list.
        window, sinks: the query heads' windows and sinks (int, ``[Hq]`` or ``[L, Hq]``; window
            < 0 = unlimited). They are applied at every attention call, and a streaming KV head
            keeps the largest of its query heads'.
        batch_size, dtype, device: of the cached keys and values.
        max_step: the most new tokens one decode call may bring (sizes the rings).
        split_keys: keys per work item when a long full head is split across threads.
        max_length: the most tokens a batch row may hold (None: no limit). A call that would go
            past it raises a ValueError before it changes anything; full heads never grow past it.

    ``cache.attention(layer, q, k, v, ...)`` is the layer's attention: the first call
    (prefill) runs ``headops.attention`` over the prompt and stores what each head keeps;
    later calls append the new tokens and run the decode kernel over every head's storage
    in one call. Other per-head arguments (gate, softmax_scale, alpha, key_bias, sink_logit,
    out_scale, out_bias) are those of ``headops.attention``; key_bias indexes original
    positions.
    """

    def __init__(self, model=None, spec=None, *, num_layers=None, num_heads=None, num_kv_heads=None, head_dim=None,
                 kinds="full", window=None, sinks=None, budget=None, budget_recent=8, batch_size=1, dtype=None,
                 device="cpu", max_step=8, split_keys=1024, max_length=None):
        if model is not None or spec is not None:
            # HeadSparseCache(model, spec): the shape and kinds from the spec, the dtype from the model
            from .spec import HeadSpec

            if not isinstance(spec, HeadSpec):
                raise TypeError("headops.HeadSparseCache(model, spec): spec must be a headops.HeadSpec, got "
                                f"{type(spec).__name__}")
            spec.validate(model)
            num_layers, num_heads, num_kv_heads, head_dim = (spec.num_layers, spec.num_heads, spec.num_kv_heads,
                                                             spec.head_dim)
            kinds, window, sinks, budget = spec.cache_kind, spec.window, spec.sinks, spec.cache_budget
            if dtype is None and model is not None and hasattr(model, "parameters"):  # (a config has none)
                dtype = next(iter(model.parameters()), torch.empty(())).dtype
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                                 torch.float16):
            raise TypeError(f"headops.HeadSparseCache: dtype must be torch.float32, float64, bfloat16 or float16, "
                            f"got {dtype!r}")
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("batch_size", batch_size), ("max_step", max_step),
                            ("split_keys", split_keys)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise _fail(name, "an int >= 1", value)
        if num_heads % num_kv_heads:
            raise _fail("num_heads", f"a multiple of num_kv_heads ({num_kv_heads})", num_heads)
        if max_length is not None and (not isinstance(max_length, numbers.Integral) or isinstance(max_length, bool)
                                       or max_length < 1):
            raise _fail("max_length", "None or an int >= 1", max_length)
        self.max_length = None if max_length is None else int(max_length)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise _fail("device", "a torch.device or a device string", repr(device)) from None
        if device.type != "cpu":
            raise ValueError(f"headops.HeadSparseCache: device {device} is not supported yet (CPU only in this build)")
        L, Hq, Hkv = num_layers, num_heads, num_kv_heads
        kinds = _per_layer_kinds(kinds, L, Hkv)
        if not isinstance(budget_recent, numbers.Integral) or isinstance(budget_recent, bool) or budget_recent < 0:
            raise _fail("budget_recent", "an int >= 0", budget_recent)
        budgets = _per_layer_budgets(budget, L, Hkv)
        windows = _per_layer_heads(window, "window", L, Hq, -1)
        sinks_ = _per_layer_heads(sinks, "sinks", L, Hq, 0)
        for row in windows:
            if any(w == 0 for w in row):
                raise _fail("window", ">= 1 or < 0 (unlimited) for every query head", row)
        for row in sinks_:
            if any(s < 0 for s in row):
                raise _fail("sinks", ">= 0 for every query head", row)
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = L, Hq, Hkv, head_dim
        self._batch_size, self.dtype, self.device = batch_size, dtype, torch.device(device)
        self.max_step, self.split_keys = max_step, split_keys
        self.kinds = kinds
        group = Hq // Hkv
        self.budget_recent = budget_recent
        self._layers = [_Layer(kinds[i], windows[i], sinks_[i], group, batch_size, head_dim, dtype, self.device,
                               max_step, budgets[i], budget_recent) for i in range(L)]
        if _CacheBase is not object:
            super().__init__(layers=[_TransformersLayer(layer) for layer in self._layers])

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # ------------------------------------------------------------------ transformers.Cache API

    def update(self, key_states, value_states, layer_idx, *args, kwargs=None, **extra):
        """transformers.Cache.update, called by a model's attention module before its attention
        function. Returns the new states unchanged: the attention function registered by
        headops (model integration) gets this cache in its kwargs ("headops_cache") and runs
        ``cache.attention(layer_idx, q, k, v)``, which stores what each head keeps."""
        if isinstance(kwargs, dict):
            kwargs["headops_cache"] = self
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self._layers[layer_idx].lengths.max())

    # ------------------------------------------------------------------------------------ state

    def seq_lengths(self, layer: int = 0) -> torch.Tensor:
        """Tokens held per batch row (original positions 0 .. length - 1) in `layer`."""
        self._check_layer(layer)
        return self._layers[layer].lengths.clone()

    def nbytes(self) -> int:
        """Bytes the cache really holds (storages, capacity included, and layout tables)."""
        return sum(layer.nbytes() for layer in self._layers)

    def ideal_nbytes(self) -> int:
        """Bytes of exactly the tokens each head keeps (K and V)."""
        per_token = 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return sum(layer.kept_tokens() for layer in self._layers) * per_token

    def dense_nbytes(self) -> int:
        """Bytes a dense cache ([B, Hkv, S, D] keys and values per layer) would hold."""
        per_token = 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return sum(int(layer.lengths.max()) * self._batch_size * self.num_kv_heads for layer in self._layers) * per_token

    # -------------------------------------------------------------------------------- attention

    def _check_room(self, st, new_tokens: int):
        """A step that would take a row past max_length is refused before anything changes."""
        held = int(st.lengths.max())
        if self.max_length is not None and held + new_tokens > self.max_length:
            raise ValueError(f"headops.HeadSparseCache: max_length = {self.max_length} tokens per row would be "
                             f"exceeded ({held} held + {new_tokens} new); make the cache with a larger max_length")

    def _check_layer(self, layer):
        if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise _fail("layer", f"an int in [0, {self.num_layers})", repr(layer))

    def _check_tensors(self, named):
        """Dense 4-D tensors on the cache's device (before anything reads their strides)."""
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"headops.HeadSparseCache: {name} must be a 4-D tensor, got {type(t).__name__}")
            if t.is_nested or t.layout != torch.strided:
                raise TypeError(f"headops.HeadSparseCache: {name} must be a dense (strided) tensor, got "
                                f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")
            if t.dim() != 4:
                raise _fail(name, "a 4-D tensor", tuple(t.shape))
            if t.device != self.device:
                raise _fail(name, f"on the cache's device {self.device}", t.device)

    def _check_step(self, layer, q, k, v, layout):
        self._check_layer(layer)
        self._check_tensors((("q", q), ("k", k), ("v", v)))
        if layout not in ("bshd", "bhsd"):
            raise _fail("layout", "'bshd' or 'bhsd'", repr(layout))
        if layout == "bhsd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        B, Sq, Hq, D = q.shape
        if (B, Hq, D) != (self._batch_size, self.num_heads, self.head_dim):
            raise _fail("q", f"[B, S, Hq, D] with B={self._batch_size}, Hq={self.num_heads}, D={self.head_dim}",
                        tuple(q.shape))
        if k.shape != v.shape or tuple(k.shape[::2]) != (B, self.num_kv_heads) or k.shape[3] != D:
            raise _fail("k", f"[B, S, Hkv, D] with Hkv={self.num_kv_heads}, the shape of v", tuple(k.shape))
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype != self.dtype:
                raise _fail(name, f"of the cache's dtype {self.dtype}", t.dtype)
        return q, k, v

    def attention(self, layer, q, k, v, *, layout="bshd", causal=True, lengths=None, **head_args):
        """Attention of `layer` for the new tokens q, k, v (see the class docstring).

        ``lengths`` (first call only): valid tokens per batch row when the prompts of a batch
        differ in length (right padding); the output rows past a row's length are 0.
        """
        q, k, v = self._check_step(layer, q, k, v, layout)
        if "window" in head_args or "sinks" in head_args:
            raise ValueError("headops.HeadSparseCache.attention: window and sinks are the cache's (set them at "
                             "construction); pass the other per-head arguments here")
        unknown = sorted(set(head_args) - set(_HEAD_ARGS))
        if unknown:
            raise TypeError(f"headops.HeadSparseCache.attention: unexpected argument(s) {', '.join(unknown)} (the "
                            f"per-head arguments are {', '.join(_HEAD_ARGS)})")
        st = self._layers[layer]
        spec = dict(window=st.windows, sinks=st.sinks, causal=causal, **head_args)
        if int(st.lengths.max()) == 0:
            out = self._prefill(st, q, k, v, lengths, spec)
        else:
            if lengths is not None:
                raise ValueError("headops.HeadSparseCache.attention: lengths is for the first call (prefill) only")
            out = self._decode(st, q, k, v, spec)
        return out.transpose(1, 2) if layout == "bhsd" else out

    def append(self, layer, k, v, *, layout="bshd"):
        """Stores new tokens of `layer` without computing attention (e.g. a prompt whose
        attention was computed elsewhere); each KV head keeps what it would keep."""
        if layout not in ("bshd", "bhsd"):
            raise _fail("layout", "'bshd' or 'bhsd'", repr(layout))
        self._check_layer(layer)
        self._check_tensors((("k", k), ("v", v)))
        if layout == "bhsd":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != self.dtype:
                raise _fail(name, f"a 4-D {self.dtype} tensor", t if not isinstance(t, torch.Tensor) else
                            f"{t.dtype} {tuple(t.shape)}")
        if k.shape != v.shape or tuple(k.shape) != (self._batch_size, k.shape[1], self.num_kv_heads, self.head_dim):
            raise _fail("k", f"[B, S, Hkv, D] = [{self._batch_size}, S, {self.num_kv_heads}, {self.head_dim}] like v",
                        tuple(k.shape))
        st = self._layers[layer]
        self._check_room(st, k.shape[1])
        st.reserve(int(st.lengths.max()) + k.shape[1])
        st.append(k, v)
        st.lengths += k.shape[1]

    def _prefill(self, st, q, k, v, lengths, spec):
        B, S = k.shape[0], k.shape[1]
        _decode_args(q, st, spec, S, check_only=True)  # every argument checked (whole batch) before any change
        if lengths is None:
            self._check_room(st, S)
            out = _attention(q, k, v, **spec)
            st.reserve(S)
            st.append(k, v, write_budget=False)
            st.lengths += S
            for b in range(B):
                self._select_budget(st, b, q[b], k[b], v[b], spec, S)
            return out
        lengths = _lengths(lengths)
        if lengths.numel() != B or bool((lengths < 1).any()) or bool((lengths > S).any()):
            raise _fail("lengths", f"{B} values in [1, {S}]", lengths.tolist())
        if q.shape[1] != S:
            raise ValueError("headops.HeadSparseCache.attention: with lengths, q must cover the whole prompt")
        self._check_room(st, int(lengths.max()))
        out = torch.zeros_like(q)
        for b, n in enumerate(lengths.tolist()):  # every row's attention, then the cache changes
            row_spec = {name: value if name == "causal" else _row(name, value, b, n, S) for name, value in spec.items()}
            out[b:b + 1, :n] = _attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], **row_spec)
        st.reserve(int(lengths.max()))
        for b, n in enumerate(lengths.tolist()):
            st.append(k[b:b + 1, :n], v[b:b + 1, :n], rows=slice(b, b + 1), write_budget=False)
            st.lengths[b] += n
            self._select_budget(st, b, q[b, :n], k[b, :n], v[b, :n], spec, S)
        return out

    def _select_budget(self, st, b, q, k, v, spec, S):
        """SnapKV at prefill: each budget KV head of row b keeps its sinks, the budget_recent
        last tokens and, of the rest, those the last queries (the observation window) attend to
        most, summed over the query heads of its group."""
        if st.budget_table is None:
            return
        n, Hq, D = q.shape[0], self.num_heads, self.head_dim
        group = Hq // self.num_kv_heads
        obs = min(n, max(self.budget_recent, 1))
        mass_all = _observation_mass(q[n - obs:], k, spec, b, n, S, group)  # [Hkv, n]
        for h in range(self.num_kv_heads):
            if int(st.kv_kind[h]) != 2:
                continue
            i = int(st.kv_index[h])
            _, size, sinks, recent = (int(x) for x in st.budget_table[i])
            mass = mass_all[h]
            if n <= size:
                keep = torch.arange(n)
            else:
                always = torch.cat([torch.arange(min(sinks, n)), torch.arange(max(sinks, n - recent), n)])
                middle = torch.arange(min(sinks, n), max(sinks, n - recent))
                chosen = middle[mass[middle].topk(size - always.numel()).indices]
                keep = torch.cat([always, chosen]).sort().values
            st.write_budget_selection(b, i, keep, k[keep, h], v[keep, h], mass[keep])

    def _decode(self, st, q, k, v, spec):
        Sq = k.shape[1]
        self._check_room(st, Sq)
        if q.shape[1] != Sq:
            raise _fail("q", f"as many new tokens as k ({Sq})", q.shape[1])
        if Sq > self.max_step and bool((st.kv_kind != 0).any()):
            raise _fail("k", f"at most max_step = {self.max_step} new tokens per decode call (it sizes the rings)",
                        f"{Sq} tokens")
        args = _decode_args(q, st, spec, int(st.lengths.max()) + Sq)  # validated before the cache changes
        st.reserve(int(st.lengths.max()) + Sq)
        st.append(k, v)
        st.lengths += Sq
        return torch.ops.headops.decode_attention(q, st.full_k, st.full_v, st.ring_k, st.ring_v, st.lengths,
                                                  st.kv_kind, st.kv_index, st.ring_offset, st.ring_sinks,
                                                  st.ring_size, *args, self.split_keys, *st.budget_args())


_HEAD_ARGS = ("gate", "softmax_scale", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias")


def _lengths(lengths):
    """Integers per batch row: an int sequence or an integer tensor (no floats, bools or strings)."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"headops.HeadSparseCache: lengths must be integers, got a {lengths.dtype} tensor")
        return lengths.to(torch.int64).reshape(-1)
    values = _as_list(lengths)
    values = [lengths] if values is None else values
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in values):
        raise TypeError(f"headops.HeadSparseCache: lengths must be integers (one per batch row), got {lengths!r}")
    if not all(-2**63 <= x < 2**63 for x in values):
        raise _fail("lengths", "int64 values", values)
    return torch.tensor(values, dtype=torch.int64)


_PER_HEAD = ("softmax_scale", "window", "sinks", "alpha", "sink_logit", "gate")  # [Hq] or [B, Hq]


def _head_values(value, b, Hq, default):
    """Float [Hq] values of batch row b of a per-head argument (scalar, [Hq] or [B, Hq])."""
    if value is None:
        return torch.full((Hq,), float(default), dtype=torch.float64)
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        return t.expand(Hq)
    return t[b if t.shape[0] > 1 else 0] if t.dim() == 2 else t


def _observation_mass(q_obs, k, spec, b, n, S, group):
    """[Hkv, n]: attention probability of every prompt key, summed over the last queries
    (q_obs, [obs, Hq, D]) and the query heads of each KV head's group (gated-off heads excluded)."""
    obs, Hq, D = q_obs.shape
    scale = _head_values(spec.get("softmax_scale"), b, Hq, 1.0 / math.sqrt(D))
    gate = _head_values(spec.get("gate"), b, Hq, 1.0)
    sink = spec.get("sink_logit")
    kk = k.double().repeat_interleave(group, dim=1)  # [n, Hq, D]
    logits = torch.einsum("ihd,jhd->hij", q_obs.double(), kk) * scale.view(Hq, 1, 1)
    kb = spec.get("key_bias")
    if kb is not None:
        kb = torch.as_tensor(kb, dtype=torch.float64)
        kb = kb[..., :n] if kb.dim() and kb.shape[-1] == S else kb  # (a 0-dim bias applies to every key)
        full = kb.expand(*([1] * (3 - kb.dim())), *kb.shape).expand(-1, Hq, n)
        logits = logits + full[b if full.shape[0] > 1 else 0].view(Hq, 1, n)
    pos = torch.arange(n - obs, n).view(1, obs, 1)
    logits = logits.masked_fill(torch.arange(n).view(1, 1, n) > pos, float("-inf"))
    if sink is not None:
        s = _head_values(sink, b, Hq, 0.0).view(Hq, 1, 1).expand(Hq, obs, 1)
        probs = torch.softmax(torch.cat([logits, s], dim=-1), dim=-1)[..., :n]
    else:
        probs = torch.softmax(logits, dim=-1)
    probs = probs * (gate != 0).double().view(Hq, 1, 1)
    return probs.sum(dim=1).view(-1, group, n).sum(dim=1)


def _row(name, value, b, keys, S):
    """Row b of a per-head argument (its batch axis sliced where it has one); key_bias also
    keeps only its first `keys` positions."""
    if not isinstance(value, torch.Tensor):
        return value
    batched = (value.dim() == 2) if name in _PER_HEAD else (value.dim() == 3)
    if batched and value.shape[0] > 1:
        value = value[b:b + 1]
    if name == "key_bias" and value.dim() >= 1 and value.shape[-1] == S:
        value = value[..., :keys]
    return value


def _check_alpha(alpha, st, group):
    """alpha > 0 needs every key (the full branch): only query heads of full KV heads have them."""
    if alpha is None:
        return
    streaming_heads = (st.kv_kind != 0).repeat_interleave(group)  # streaming and budget heads
    a = alpha.reshape(-1, alpha.shape[-1]) if alpha.dim() else alpha.expand(1, streaming_heads.numel())
    if bool(((a > 0) & streaming_heads.to(a.device)).any()):
        heads = [h for h in range(streaming_heads.numel()) if bool(streaming_heads[h]) and bool((a[:, h] > 0).any())]
        raise ValueError(f"{_CALLER}: alpha must be 0 on query heads served by a streaming or budget "
                         f"KV head (they keep only part of the keys, not the full branch); query heads {heads} have "
                         f"alpha > 0")


def _decode_args(q, st, spec, Sk, check_only=False):
    """The per-head arguments of decode_attention, checked by the rules of headops.attention's
    (check_only: only the checks, nothing converted)."""
    if not isinstance(spec["causal"], bool):
        raise TypeError(f"{_CALLER}: causal must be a bool, got {type(spec['causal']).__name__}")
    B, Sq, Hq, D = q.shape
    per_head = {name: value for name, value in spec.items() if name != "causal"}
    args = head_args(_CALLER, HeadShapes(B=B, Hq=Hq, Sk=Sk, D=D), q.device, **per_head)
    _check_alpha(args.alpha, st, Hq // st.Hkv)
    if check_only:
        return None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (spec["causal"], *args.kernel_args(acc))
