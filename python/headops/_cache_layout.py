"""What a ``HeadSparseCache`` keeps per layer and head, from a ``HeadSpec`` or from the
per-head keyword arguments of its constructor: one ``CacheLayout``, checked."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _distributed
from ._args import check_attention_shape, check_compensation, check_values, fail, is_int
from ._kv_storage import KINDS
from ._model_attention import (capped_window, check_spec_in_sliding_layers, head_sparse_cache_refusal, kv_sources,
                               sliding_windows)
from .spec import HeadSpec

CALLER = "headops.HeadSparseCache"


class Unset:
    """A keyword argument left out (where None is a value the argument refuses)."""

    def __repr__(self):
        return "(left out)"


UNSET = Unset()


class CacheLayout(NamedTuple):
    """The attention shape and, per layer, the kinds and budgets of the KV heads and the windows
    and sinks of the query heads (lists of ints; window < 0 unlimited); the spec's cache options
    (a dict, unchecked: HeadSparseCache merges its keywords into them and checks the result)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int | tuple  # (one per layer where the model's layers differ: Gemma 4)
    head_dim: int | tuple
    kinds: list
    windows: list
    sinks: list
    budgets: list
    options: dict
    compensation: list  # [L][Hkv] None, "weighted" or "unweighted"
    model_windows: list  # [L]: the model's own window in its sliding-window layers, None elsewhere
    kv_sources: dict  # {layer: the layer whose keys and values it reads} (Gemma 3n, Gemma 4's small models)


def from_spec(model_or_config, spec, **per_head) -> CacheLayout:
    """The layout of ``HeadSparseCache(model_or_config, spec)`` (`per_head`: the keyword-form
    arguments, which must be left out: the spec holds them)."""
    if not isinstance(spec, HeadSpec):
        raise TypeError(f"{CALLER}: spec must be a headops.HeadSpec, got {type(spec).__name__}")
    given = [name for name, value in per_head.items() if value is not (UNSET if name in ("kinds", "compensation")
                                                                       else None)]
    if given:
        raise TypeError(f"{CALLER}: {', '.join(given)} come from the spec; give either a spec or them")
    spec.validate(model_or_config)
    refused = None if model_or_config is None else head_sparse_cache_refusal(model_or_config)
    if refused:
        raise NotImplementedError(refused)
    sliding = sliding_windows(model_or_config, spec.num_layers)
    check_spec_in_sliding_layers(lambda name, expected, got: fail(CALLER, name, expected, got), spec, sliding,
                                 cache=True)
    spec = _distributed.local_spec(model_or_config, spec, CALLER)  # a tensor-parallel rank keeps its own heads
    kinds, windows = [list(r) for r in spec.cache_kind], spec.window.clone()
    # the model's sliding-window layers: each head's window within the model's, every KV head streaming
    # (it keeps what that window sees; budget heads and alpha were refused there)
    for layer, window in enumerate(sliding):
        if window is not None:
            windows[layer] = capped_window(windows[layer], window)
            kinds[layer] = ["streaming"] * spec.kv_heads(layer)
    layout = CacheLayout(spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, kinds, windows.tolist(),
                         spec.sinks.tolist(), [list(r) for r in spec.cache_budget], dict(spec.cache_options),
                         [list(r) for r in spec.cache_compensation], list(sliding), kv_sources(model_or_config))
    _check_shared_rows(layout)
    return layout


def _check_shared_rows(layout: CacheLayout) -> None:
    """A layer that reads another layer's keys and values has no storage of its own: it reads its
    source's, so the spec must keep there what the source keeps (its constructors make it so)."""
    for layer, source in layout.kv_sources.items():
        rows = (("cache_kind", layout.kinds), ("window", layout.windows), ("sinks", layout.sinks),
                ("cache_budget", layout.budgets), ("cache_compensation", layout.compensation))
        differ = {name: (per_layer[layer], per_layer[source]) for name, per_layer in rows
                  if per_layer[layer] != per_layer[source]}
        if differ:
            raise fail(CALLER, "the spec",
                       f"the same in layer {layer} as in layer {source} ({', '.join(differ)}): layer {layer} reads "
                       f"layer {source}'s keys and values (the model's num_kv_shared_layers), stored once, as that "
                       "layer keeps them (HeadSpec's constructors, given the model, make the rows so)",
                       "; ".join(f"{name} {mine} and {theirs}" for name, (mine, theirs) in differ.items()))


def from_keywords(*, num_layers, num_heads, num_kv_heads, head_dim, kinds, window, sinks, budget,
                  compensation) -> CacheLayout:
    check_attention_shape(CALLER, num_layers, num_heads, num_kv_heads, head_dim)
    L, Hq, Hkv = num_layers, num_heads, num_kv_heads
    layout = CacheLayout(L, Hq, Hkv, head_dim, _per_layer_kinds("full" if kinds is UNSET else kinds, L, Hkv),
                         _per_layer_heads(window, "window", L, Hq, -1), _per_layer_heads(sinks, "sinks", L, Hq, 0),
                         _per_layer_budgets(budget, L, Hkv), {},
                         _per_layer_compensation(None if compensation is UNSET else compensation, L, Hkv),
                         [None] * L, {})
    check_values(CALLER, window=torch.tensor(layout.windows), sinks=torch.tensor(layout.sinks))
    return layout


def as_list(value):
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
        return is_int(x) and -2**63 <= x < 2**63

    if value is None:
        return [[default] * H for _ in range(L)]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if ok(value):
        return [[int(value)] * H for _ in range(L)]
    rows = as_list(value)
    if rows is not None and len(rows) == H and all(ok(x) for x in rows):
        return [[int(x) for x in rows] for _ in range(L)]
    rows = None if rows is None else [as_list(r) for r in rows]
    if rows is not None and len(rows) == L and all(r is not None and len(r) == H and all(ok(x) for x in r)
                                                   for r in rows):
        return [[int(x) for x in r] for r in rows]
    raise fail(CALLER, name, f"an int, [Hq] = [{H}] or [L, Hq] = [{L}, {H}] integers", value)


def _per_layer_kinds(kinds, L, Hkv):
    if isinstance(kinds, str):
        rows = [[kinds] * Hkv for _ in range(L)]
    else:
        rows = as_list(kinds)
        if rows is not None and len(rows) == Hkv and all(isinstance(x, str) for x in rows):
            rows = [list(rows) for _ in range(L)]
        elif not (rows is not None and len(rows) == L and
                  all(as_list(r) is not None and len(as_list(r)) == Hkv for r in rows)):
            raise fail(CALLER, "kinds", f"'full', 'streaming', 'budget', [Hkv] = [{Hkv}] or [L, Hkv] = [{L}, {Hkv}] "
                                        "of them", kinds)
        rows = [list(r) for r in rows]
    for r in rows:
        for k in r:
            if k not in KINDS:
                raise fail(CALLER, "kinds", "'full', 'streaming' or 'budget' for every KV head", repr(k))
    return rows


def _per_layer_budgets(budget, L, Hkv):
    """[L][Hkv] of ints or None from None, an int, an [Hkv] or an [L, Hkv] list."""
    def ok(x):
        return x is None or is_int(x)

    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    if ok(budget):
        return [[budget] * Hkv for _ in range(L)]
    rows = as_list(budget)
    if rows is not None and len(rows) == Hkv and all(ok(x) for x in rows):
        return [list(rows) for _ in range(L)]
    rows = None if rows is None else [as_list(r) for r in rows]
    if rows is not None and len(rows) == L and all(r is not None and len(r) == Hkv and all(ok(x) for x in r)
                                                   for r in rows):
        return [list(r) for r in rows]
    raise fail(CALLER, "budget", f"an int, [Hkv] = [{Hkv}] or [L, Hkv] = [{L}, {Hkv}] ints (None for other kinds)",
               budget)


def _per_layer_compensation(value, L, Hkv):
    """[L][Hkv] of None / "weighted" / "unweighted" from one of them, an [Hkv] or an [L, Hkv] list."""
    def ok(x):
        return x is None or isinstance(x, str)

    if ok(value):
        rows = [[value] * Hkv for _ in range(L)]
    else:
        rows = as_list(value)
        if rows is not None and len(rows) == Hkv and all(ok(x) for x in rows):
            rows = [list(rows) for _ in range(L)]
        else:
            rows = None if rows is None else [as_list(r) for r in rows]
            if not (rows is not None and len(rows) == L and
                    all(r is not None and len(r) == Hkv and all(ok(x) for x in r) for r in rows)):
                raise fail(CALLER, "compensation", f"None, 'weighted', 'unweighted', [Hkv] = [{Hkv}] or [L, Hkv] = "
                                                   f"[{L}, {Hkv}] of them", value)
    for r in rows:
        for x in r:
            check_compensation(CALLER, x)
    return [list(r) for r in rows]
