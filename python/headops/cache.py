"""``headops.HeadSparseCache``: a KV cache that keeps, per layer and KV head, only what that
head can ever attend to (docs/DESIGN.md section 2).

Per layer there are two packed storages (csrc/kvcache/kv_layout.h):
  full       a list of segments ``[B, Hf, n, D]`` holding consecutive positions of the full
             KV heads; a prefill or a long append adds a segment of exactly what it needs
             (rounded to 64 tokens), decode steps add segments of max(64, capacity / 64)
             tokens: the storage grows without ever copying what it holds;
  streaming  ``[B, slots, D]``: each streaming KV head owns ``sinks + ring`` slots: its first
             ``sinks`` tokens and a ring over the most recent ones, which grows with the
             tokens it receives (reallocated, rounded up to 64 slots) up to its capacity.
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

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _cache_layout, _cache_probe, _distributed, budgets
from ._args import (FLOAT_DTYPES, HeadArgs, HeadShapes, check_cache_options, check_dense, describe, on_device,
                    check_float_dtype, fail, head_args, is_int, of_layer)
from ._cache_layout import UNSET
from ._kv_storage import BUDGET, LayerStorage
from .attention import run_fused
from .probes import check_probe

__all__ = ["HeadSparseCache"]

# the key tensors a cache's update handed to an attention that cannot get the cache through its
# kwargs: the layers that other layers read (Gemma's num_kv_shared_layers: those layers get the keys
# through the model, transformers' shared_kv_states), and every layer of a family whose attention
# calls update without its kwargs (GPT-NeoX, Pythia); the patched attention finds the cache by them
# (HeadSparseCache.of_keys)
_KEYS_HANDED_OUT = WeakIdKeyDictionary()
# how many live caches have handed keys out: the patched attention looks keys up only while one
# has (the lookup is not traceable, so a model compiled in one graph through transformers' own
# cache must not make it)
_caches_handing_out_keys = [0]


def _one_less_cache_handing_out_keys():
    _caches_handing_out_keys[0] -= 1


def keys_may_be_handed_out() -> bool:
    """Whether any live HeadSparseCache has handed keys out (which HeadSparseCache.of_keys may
    find)."""
    return _caches_handing_out_keys[0] > 0


CALLER = "headops.HeadSparseCache"
BUDGET_RECENT = 8  # the latest tokens a budget head keeps unless told (budget_recent)
_HEAD_ARGS = ("gate", "softmax_scale", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias")
_HEAD_ARG_NAMES = frozenset(_HEAD_ARGS)


try:  # the cache is a transformers.Cache when transformers is installed (model.generate accepts it)
    from transformers.cache_utils import Cache as _CacheBase, CacheLayerMixin as _LayerBase
except ImportError:  # pragma: no cover - transformers is optional
    _CacheBase, _LayerBase = object, object
try:  # (a Mamba mixer's states beside attention in one layer: Falcon-H1)
    from transformers.cache_utils import LinearAttentionLayer as _StatesLayer
except ImportError:  # pragma: no cover - older transformers
    _StatesLayer = None


def _whole_cache_only(call: str):
    """A layer method that refuses, naming the HeadSparseCache method that does it for every layer."""
    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"headops.HeadSparseCache does this for all its layers at once: call the cache's "
                                  f"{call}")
    return refuse


class _TransformersLayer(_LayerBase):
    """transformers' view of one layer: sequence length and mask sizes; the storage is LayerStorage's."""

    is_compileable = False
    is_sliding = False

    @property
    def is_croppable(self) -> bool:
        """Whether transformers may crop it (assisted generation): a layer without budget heads (a
        crop that cannot be exact is still refused, HeadSparseCache.crop)."""
        return BUDGET not in self._layer.kinds

    def __init__(self, layer: LayerStorage):
        if _LayerBase is not object:
            super().__init__()
        self._layer = layer
        self.is_initialized = True  # the cache sizes itself at its first call (HeadSparseCache.attention)

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self._layer.padded_length()

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # transformers' per-layer row operations: the cache does them for all its layers at once
    reset = _whole_cache_only("reset()")
    reorder_cache = _whole_cache_only("reorder_cache(beam_idx)")
    crop = _whole_cache_only("crop(tokens_to_remove)")
    batch_repeat_interleave = _whole_cache_only("batch_repeat_interleave(repeats)")
    batch_select_indices = _whole_cache_only("batch_select_indices(indices)")


if _StatesLayer is not None:
    class _MixerAndAttentionLayer(_StatesLayer, _TransformersLayer):
        """transformers' view of a layer running attention beside a Mamba mixer (layer type
        "hybrid": Falcon-H1): the mixer's convolution and recurrent states as transformers'
        LinearAttentionLayer holds them (reset, reorder_cache, crop: theirs), the attention's
        storage as _TransformersLayer's (the cache moves its rows with every other storage's)."""

        def __init__(self, layer: LayerStorage, number_of_states: int = 1):
            _TransformersLayer.__init__(self, layer)
            _StatesLayer.__init__(self, number_of_states=number_of_states)


def _transformers_layers(model_or_config, storages):
    """transformers' view of the cache, a layer per model layer, and which model layer each storage
    (spec layer) is: each softmax-attention layer's storage as a _TransformersLayer (with its Mamba
    mixer's states where the layer runs both: _MixerAndAttentionLayer) and, in a hybrid model, the
    other layers' states as transformers' DynamicCache holds them (_model_attention.state_layers).
    ([layers], {model layer: storage index} or None for a model whose every layer attends)."""
    from ._model_attention import mixer_beside_attention, state_layers

    states = {} if model_or_config is None else state_layers(model_or_config)
    if not states:
        mixers = {} if model_or_config is None else mixer_beside_attention(model_or_config)
        return [_MixerAndAttentionLayer(st, mixers[i]) if i in mixers else _TransformersLayer(st)
                for i, st in enumerate(storages)], None
    attending = [layer for layer in range(len(storages) + len(states)) if layer not in states]
    storage_of = {layer: i for i, layer in enumerate(attending)}
    layers = [states[layer] if layer in states else _TransformersLayer(storages[storage_of[layer]])
              for layer in range(len(storages) + len(states))]
    return layers, storage_of


def _linear_layer_states(name: str):
    """transformers' Cache method `name` for a hybrid model's linear-attention and Mamba layers'
    states (which a HeadSparseCache made from the model holds as transformers' own cache does)."""
    def call(self, *args, **kwargs):
        if not self._linear_layers():
            raise NotImplementedError(
                f"headops.HeadSparseCache.{name}: a hybrid model's linear-attention or Mamba layer asks for its "
                "states, which this cache does not hold: make it from the model, HeadSparseCache(model, spec)")
        return getattr(_CacheBase, name)(self, *args, **kwargs)
    call.__name__ = name
    return call


class HeadSparseCache(_CacheBase):
    """A KV cache whose storage follows each head's visibility (DESIGN section 2).

    ``HeadSparseCache(model_or_config, spec, **options)`` keeps what ``spec`` (a
    ``headops.HeadSpec``) says: its cache kinds and budgets per KV head and its windows and
    sinks per query head (the model or config, when given, is checked to be the spec's). Where
    the model's layers differ in KV heads or head dim (Gemma 4), each layer's storage has its own
    (``num_kv_heads`` and ``head_dim`` are then tuples, one per layer, as the spec's). Where a
    model's last layers read earlier layers' keys and values (``config.num_kv_shared_layers``:
    Gemma 3n, Gemma 4's small models), such a layer has no storage: it reads its source layer's
    (the spec must keep the same there, as its constructors make it), and its calls store nothing.
    Without a spec the same is given per head, keyword-only:

        num_layers, num_heads (query heads), num_kv_heads, head_dim: the model's attention shape.
        kinds: per KV head ``"full"`` (the default), ``"streaming"`` or ``"budget"``: one string,
            an ``[Hkv]`` list or an ``[L, Hkv]`` list.
        window, sinks: the query heads' windows and sinks (int, ``[Hq]`` or ``[L, Hq]``; window
            < 0 = unlimited). They are applied at every attention call, and a streaming KV head
            keeps the largest of its query heads'.
        budget: per KV head, the tokens a budget head keeps (int, ``[Hkv]`` or ``[L, Hkv]``).
        compensation: per streaming KV head, None (the default), "weighted" or "unweighted": the
            tokens it evicts are folded into one compensation key and value (their means;
            RazorAttention) that its query heads read as one more key, whose logit carries
            + log(count) when weighted (one value, ``[Hkv]`` or ``[L, Hkv]``).

    Options (keyword-only, in both forms):
        batch_size, dtype, device: of the cached keys and values. Left out, they come from the
            first call (``attention`` or ``append``), as transformers' caches do; the storages are
            allocated then. Given, the calls are checked against them; with batch_size and dtype
            both given the cache is sized at construction (on the CPU unless device is given).
        max_step: the new tokens one decode step brings at most (sizes the rings); a call with more
            runs as consecutive steps of max_step tokens (every query attends as in one call).
        split_keys: keys per work item when a long head is split across threads (CPU) or CUDA
            blocks (split-K). None (the default): 1024 on the CPU; on a GPU, chosen at each step
            from what the storages can hold and the device's SMs, at most 1024 (``_split_keys``).
        max_length: the most tokens a batch row may hold (None: no limit). A call that would go
            past it raises a ValueError before it changes anything; full heads never grow past it.
        budget_recent: the latest tokens a budget head always keeps (also the observation window
            of its prefill selection).
        append_room: slots each budget head holds beyond its budget, free after a prefill's
            selection, so the next append_room appended tokens (a question and its answer) are
            kept without evicting anything: the prompt compressed once, as SnapKV, AdaKV and HeadKV
            run (0, the default: every token appended past the budget evicts the least-attended
            one). Past the room, eviction resumes. The storage holds budget + append_room slots.
        prefill: "spec" (the default: the prompt runs each head's own window and sinks) or "full"
            (full causal attention for every head, as RazorAttention and kvpress measure, within the
            model's own window in its sliding-window layers; then each KV head keeps what its kind
            says).
        allocation, adakv_alpha, observation_window, pool_kernel: how budget heads choose at
            prefill (headops.budgets, docs/cache.md): "uniform" (the default) or "headkv" (each
            head its own budget) or "adakv" (per row and layer, the layer's budget heads share
            budget x heads slots by score, each guaranteed int(adakv_alpha x budget), 0.2 by
            default); the scores are SnapKV's: the attention of the prompt's last
            observation_window queries (None: budget_recent), max-pooled over pool_kernel keys
            (None: not pooled).
        pooling, keep_observation_window: "max" (the default) or "avg" (kvpress's SnapKVPress)
            pooling; whether a budget head also keeps the observation window's tokens at prefill
            (SnapKV and kvpress do; the latest first as far as its size allows; default False:
            its sinks and budget_recent latest only).
        With a spec, its ``cache_options`` are the defaults of these options.

    ``cache.attention(layer, q, k, v, ...)`` is the layer's attention: the first call
    (prefill) runs ``headops.attention`` over the prompt and stores what each head keeps;
    later calls append the new tokens and run the decode kernel over every head's storage
    in one call. Other per-head arguments (gate, softmax_scale, alpha, key_bias, sink_logit,
    out_scale, out_bias) are those of ``headops.attention``; key_bias indexes original
    positions. A call that is refused changes nothing.

    transformers' row operations move every per-row state with its row: ``reorder_cache``
    (beam search), ``batch_select_indices``, ``batch_repeat_interleave``; ``reset`` empties the
    rows and keeps the storages; ``crop`` drops the last tokens where that is exact.
    """

    def __init__(self, model_or_config=None, spec=None, *, num_layers=None, num_heads=None, num_kv_heads=None,
                 head_dim=None, kinds=UNSET, window=None, sinks=None, budget=None, compensation=UNSET,
                 batch_size=UNSET, dtype=None,
                 device=None, max_step=8, split_keys=None, max_length=None, budget_recent=BUDGET_RECENT, append_room=0,
                 prefill=UNSET, allocation=UNSET, adakv_alpha=UNSET, observation_window=UNSET, pool_kernel=UNSET,
                 pooling=UNSET, keep_observation_window=UNSET):
        per_head = dict(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        kinds=kinds, window=window, sinks=sinks, budget=budget, compensation=compensation)
        if model_or_config is not None or spec is not None:
            layout = _cache_layout.from_spec(model_or_config, spec, **per_head)
        else:
            layout = _cache_layout.from_keywords(**per_head)
        given = {name: value for name, value in (("prefill", prefill), ("allocation", allocation),
                                                 ("adakv_alpha", adakv_alpha),
                                                 ("observation_window", observation_window),
                                                 ("pool_kernel", pool_kernel), ("pooling", pooling),
                                                 ("keep_observation_window", keep_observation_window))
                 if value is not UNSET}
        self.options = check_cache_options(CALLER, dict(layout.options, **given))
        # the heads of this tensor-parallel rank (the layout holds only them); None for a whole model
        self._head_shard = _distributed.head_shard(model_or_config, CALLER)
        if self.options["allocation"] == "adakv":
            if self._head_shard is not None and any("budget" in kinds for kinds in layout.kinds):
                raise NotImplementedError(
                    f"{CALLER}: allocation='adakv' shares each layer's budget among all its KV heads, but this "
                    "tensor-parallel rank holds only some of them; use allocation='uniform' or 'headkv' (budgets "
                    "per head) on a tensor-parallel model")
            for i, (kinds, sizes) in enumerate(zip(layout.kinds, layout.budgets)):
                layer = {b for kind, b in zip(kinds, sizes) if kind == "budget"}
                if len(layer) > 1:
                    raise fail(CALLER, "budget", "the same for every budget KV head of a layer with allocation="
                                                 "'adakv' (AdaKV shares budget x heads tokens)",
                               f"{sorted(layer)} in layer {i}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"{CALLER}: dtype must be torch.float32, float64, bfloat16 or float16 (or None: the "
                            f"first call's), got {dtype!r}")
        if batch_size is not UNSET and (not is_int(batch_size) or batch_size < 1):
            raise fail(CALLER, "batch_size", "an int >= 1 (or left out: the first call's)", batch_size)
        if not is_int(max_step) or max_step < 1:
            raise fail(CALLER, "max_step", "an int >= 1", max_step)
        if split_keys is not None and (not is_int(split_keys) or split_keys < 1):
            raise fail(CALLER, "split_keys", "None or an int >= 1", split_keys)
        if max_length is not None and (not is_int(max_length) or max_length < 1):
            raise fail(CALLER, "max_length", "None or an int >= 1", max_length)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError):
                raise fail(CALLER, "device", "a torch.device or a device string", repr(device)) from None
            _check_device(CALLER, "device", device)
            if device.type == "cuda" and device.index is None:  # "cuda": the current device (tensors carry an index)
                device = torch.device("cuda", torch.cuda.current_device())
        if not is_int(budget_recent) or budget_recent < 0:
            raise fail(CALLER, "budget_recent", "an int >= 0", budget_recent)
        if not is_int(append_room) or append_room < 0:
            raise fail(CALLER, "append_room", "an int >= 0", append_room)
        # (KV heads and head dim: ints, or one per layer where the model's layers differ: Gemma 4)
        L, Hq, Hkv, D = layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = L, Hq, Hkv, D
        self.max_step, self.split_keys, self.budget_recent = max_step, split_keys, budget_recent
        self.max_length = None if max_length is None else int(max_length)
        self.kinds = layout.kinds
        # {layer: the layer whose storage it reads}; each layer's storage, a reading layer its source's
        self._kv_source = dict(layout.kv_sources)
        self._readers = {source: sorted(layer for layer, s in self._kv_source.items() if s == source)
                         for source in set(self._kv_source.values())}
        self._hands_out_keys = False
        # the layers whose update ran and whose attention has not reached this cache since
        self._unattended = set()
        self._layers = []
        for i in range(L):  # (a source is an earlier layer)
            self._layers.append(self._layers[self._kv_source[i]] if i in self._kv_source else LayerStorage(
                CALLER, layout.kinds[i], layout.windows[i], layout.sinks[i], Hq // of_layer(Hkv, i), of_layer(D, i),
                max_step, layout.budgets[i], budget_recent, layout.compensation[i], append_room=int(append_room),
                model_window=layout.model_windows[i]))
        self._storages = [st for i, st in enumerate(self._layers) if i not in self._kv_source]
        self._batch_size = None if batch_size is UNSET else batch_size
        self.dtype, self.device = dtype, device
        self._sized = False
        self._step_args_memo = {}  # _step_args
        if self._batch_size is not None and dtype is not None:
            self._ensure_sized(CALLER, (self._batch_size, dtype, device or torch.device("cpu")))
        self._storage_of = None  # {model layer: storage} of a hybrid model (_transformers_layers)
        if _CacheBase is not object:
            layers, self._storage_of = _transformers_layers(model_or_config, self._layers)
            super().__init__(layers=layers)

    @classmethod
    def from_prefill(cls, model_or_config, spec, prefill, **options) -> "HeadSparseCache":
        """The cache of `spec` built from a dense prefill (a ``headops.DensePrefill``, e.g. from
        ``headops.capture_prefill``): every layer filled (``fill``) with the prompt's keys and
        values, budget heads scored with its last queries and the spec's per-head arguments (the
        prefill's softmax scale where the spec has none). It is the cache a prefill="full" prompt
        call would leave (the prompt ran full attention), built without running the model again.
        `options`: the constructor's (batch size, dtype and device come from the prefill)."""
        from .prefill import build_cache

        return build_cache(cls, model_or_config, spec, prefill, **options)

    @property
    def batch_size(self) -> int:
        """The batch size: given, or the first call's; -1 before it is known (as transformers' caches)."""
        return -1 if self._batch_size is None else self._batch_size

    # ------------------------------------------------------------------ transformers.Cache API

    def update(self, key_states, value_states, layer_idx, *args, kwargs=None, **extra):
        """transformers.Cache.update, called by a model's attention module before its attention
        function. Returns the new states unchanged: the attention function registered by
        headops (model integration) gets this cache in its kwargs ("headops_cache") and runs
        ``cache.attention(layer_idx, q, k, v)``, which stores what each head keeps. An attention
        that does not get the kwargs (GPT-NeoX's module calls update without them), and the
        layers that read this layer's keys (Gemma's num_kv_shared_layers), which get the same
        tensors from the model, find the cache by those key tensors (``of_keys``).

        A layer's update after one whose attention never reached the cache (an unpatched model, or
        an attention handed other key tensors) is a RuntimeError: that attention stored nothing,
        so the cache no longer holds the layer's tokens."""
        layer = layer_idx if self._storage_of is None else self._storage_of.get(layer_idx, layer_idx)
        if layer in self._unattended:
            raise RuntimeError(
                f"{CALLER}: layer {layer}'s attention did not reach this cache after its last update, so nothing "
                "it attended to was stored: is the model patched (headops.patch(model, spec))? (A model whose "
                "attention does not get the key tensors this cache's update returned cannot use it; after a "
                "forward that was interrupted, cache.reset() starts it again.)")
        if isinstance(kwargs, dict):
            kwargs["headops_cache"] = self
        elif isinstance(key_states, torch.Tensor):
            self._hand_out(key_states)
        if layer in self._readers and isinstance(key_states, torch.Tensor):
            self._hand_out(key_states)
        if isinstance(layer, int) and 0 <= layer < self.num_layers and layer not in self._kv_source:
            self._unattended.add(layer)
        return key_states, value_states

    @torch.compiler.disable  # (eager: dynamo would guard on weakref.finalize's registry)
    def _hand_out(self, key_states) -> None:
        if not self._hands_out_keys:
            self._hands_out_keys = True
            _caches_handing_out_keys[0] += 1
            weakref.finalize(self, _one_less_cache_handing_out_keys)
        _KEYS_HANDED_OUT[key_states] = self

    def reached(self, layer) -> None:
        """Internal (the patched attention): `layer`'s attention got this cache after its update."""
        self._unattended.discard(layer)

    @staticmethod
    def of_keys(key_states):
        """The HeadSparseCache whose update returned `key_states` to an attention that cannot get
        the cache through its kwargs (see update), or None."""
        return _KEYS_HANDED_OUT.get(key_states) if isinstance(key_states, torch.Tensor) else None

    def reads_layer(self, layer: int):
        """The layer whose keys and values `layer` reads (its storage is that layer's: Gemma's
        num_kv_shared_layers), or None for a layer that stores its own."""
        self._check_layer(CALLER + ".reads_layer", layer)
        return self._kv_source.get(layer)

    def keys_of_call(self, layer: int, new_tokens: int) -> int:
        """The keys a call of `layer` with `new_tokens` new keys attends over in its longest row (what
        key_bias must cover): those held and the new ones; a layer reading another's storage, whose
        source stored them already: what that storage holds (a prompt: the new tokens)."""
        self._check_layer(CALLER + ".keys_of_call", layer)
        st = self._layers[layer]
        if layer not in self._kv_source:
            return max(st.held, default=0) + new_tokens
        return new_tokens if st.prompt_just_stored else max(st.held, default=0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The sequence length as transformers counts it: the longest row's tokens, with the left
        padding of its prompt (``padding_side="left"``; stored nowhere). In a hybrid model
        layer_idx is the model's layer (one without attention: the first attention layer's)."""
        if self._storage_of is not None:
            layer_idx = self._storage_of.get(layer_idx, 0)
        return self._layers[layer_idx].padded_length()

    # a hybrid model's linear-attention and Mamba layers: their states as transformers' cache has them
    get_conv_state = _linear_layer_states("get_conv_state")
    update_conv_state = _linear_layer_states("update_conv_state")
    get_recurrent_state = _linear_layer_states("get_recurrent_state")
    update_recurrent_state = _linear_layer_states("update_recurrent_state")
    has_previous_state = _linear_layer_states("has_previous_state")

    def _linear_layers(self) -> list:
        """A hybrid model's layers with states: those without attention and those running a Mamba
        mixer beside it (transformers' layers of their states)."""
        return [layer for _, layer in self._state_layers()]

    def _state_layers(self) -> list:
        """(model layer, transformers' layer) of the layers with states (_linear_layers); a layer
        that holds keys too (a Mamba mixer beside attention) is a _TransformersLayer."""
        return [(i, layer) for i, layer in enumerate(getattr(self, "layers", ()))
                if type(layer) is not _TransformersLayer]

    # ------------------------------------------------------------------------------------ state

    def windows(self, layer: int = 0) -> list:
        """The query heads' windows in `layer` (-1: unlimited), as the cache applies them."""
        self._check_layer(CALLER + ".windows", layer)
        return list(self._layers[layer].window_list)

    def longest_row(self, layer: int = 0) -> int:
        """Tokens the longest batch row holds in `layer` (padding not counted): a row's positions
        start at its first token, so the next call's keys are at positions below this + its new
        tokens (key_bias covers them)."""
        self._check_layer(CALLER + ".longest_row", layer)
        return max(self._layers[layer].held, default=0)

    def left_padding(self, layer: int = 0) -> list:
        """Per batch row, the left padding its prompt had in `layer` (``padding_side="left"``): the
        tokens before the row's first one, which the cache does not hold (0 for every row
        otherwise, and before the first call)."""
        self._check_layer(CALLER + ".left_padding", layer)
        return list(self._layers[layer].pads)

    def seq_lengths(self, layer: int = 0) -> torch.Tensor:
        """Tokens held per batch row (original positions 0 .. length - 1) in `layer` (empty
        before the cache is sized)."""
        self._check_layer(CALLER + ".seq_lengths", layer)
        return self._layers[layer].lengths.clone()

    def reserve(self, tokens: int) -> None:
        """Sizes every layer's storages now for rows of `tokens` tokens (full heads' segments; rings
        grown toward their windows), so that steps up to that length allocate nothing and keep
        every storage where it is. What a CUDA graph that replays a captured decode step needs: its
        launches hold the storages' addresses (docs/cuda.md has the loop). Refused (nothing
        changes) before the cache is sized, and past max_length."""
        caller = CALLER + ".reserve"
        if not is_int(tokens) or tokens < 0:
            raise fail(caller, "tokens", "an int >= 0", repr(tokens))
        if not self._sized:
            raise ValueError(f"{caller}: the cache is not sized yet (its first call sizes it, or batch_size and "
                             "dtype given to the constructor)")
        if self.max_length is not None and tokens > self.max_length:
            raise ValueError(f"{caller}: tokens = {tokens} is past max_length = {self.max_length}")
        for st in self._storages:
            st.reserve(int(tokens))

    def sync_lengths(self) -> None:
        """Reads every layer's token counts back from the device into the cache's host mirror,
        after a CUDA graph replayed captured decode steps: a replay advances the counts on the
        device, while the mirror advanced once, when the step was captured (one device-to-host copy
        a layer). Raises a RuntimeError, leaving the mirror as it was, if a replay took a row past
        what the storages held without growing (reserve() first, for every token the replays add:
        past it a full head's append writes nothing and a ring too small evicts early, so the cache
        no longer holds what its heads' kinds say) or past max_length. A graph stays valid only
        while the storages stay where they were: an eager step that grows them, or a larger
        reserve(), moves them, and the graph must be captured again."""
        counts = []
        for i, st in self._stored_layers():
            held = st.lengths.tolist() if st.held else []
            room, longest = st.room(), max(held, default=0)
            if room is not None and longest > room:
                raise RuntimeError(f"{CALLER}.sync_lengths: layer {i} was stepped to {longest} tokens a row, past "
                                   f"the {room} its storages held without growing: reserve() them before capturing "
                                   "the step (the cache no longer holds what its heads' kinds say)")
            if self.max_length is not None and longest > self.max_length:
                raise RuntimeError(f"{CALLER}.sync_lengths: layer {i} was stepped to {longest} tokens a row, past "
                                   f"max_length = {self.max_length}")
            counts.append(held)
        for (_, st), held in zip(self._stored_layers(), counts):
            if held:
                st.now_holds(held)

    # ---------------------------------------------------------------------- batch rows (transformers)

    def reset(self) -> None:
        """Drops every token: each row is empty again, as before its first call. The storages stay
        allocated, sized and where they are (nbytes() does not change; a CUDA graph captured over
        them stays valid), so the next prompt must have the same batch size, dtype and device; make
        a new cache to give the memory back."""
        for st in self._storages:
            if st.held:
                st.forget_tokens()
        for layer in self._linear_layers():
            layer.reset()
        self._unattended.clear()

    def reorder_cache(self, beam_idx) -> None:
        """Beam search (transformers' generate with num_beams > 1): row b becomes what row
        beam_idx[b] held, in every layer (a 1-D integer tensor or sequence, one entry per row, each
        in [0, batch size)). In place: the storages keep their sizes and addresses. A refused call
        changes nothing."""
        rows = self._row_index(CALLER + ".reorder_cache", "beam_idx", beam_idx, same_count=True)
        self._take_rows(rows)
        for layer in self._linear_layers():
            layer.reorder_cache(torch.tensor(rows, dtype=torch.int64))

    def batch_select_indices(self, indices) -> None:
        """Keeps the batch rows `indices` (a 1-D integer tensor or sequence, in [0, batch size); rows
        may repeat), in that order, in every layer; the storages are new, of len(indices) rows."""
        self._refuse_with_linear_states(CALLER + ".batch_select_indices")
        self._take_rows(self._row_index(CALLER + ".batch_select_indices", "indices", indices))

    def batch_repeat_interleave(self, repeats) -> None:
        """Each batch row `repeats` times in a row (rows 0, 0, 1, 1, ... for 2), in every layer, as
        torch.repeat_interleave; the storages are new, of batch size x repeats rows."""
        caller = CALLER + ".batch_repeat_interleave"
        if not is_int(repeats) or repeats < 1:
            raise fail(caller, "repeats", "an int >= 1", repr(repeats))
        self._refuse_with_linear_states(caller)
        if self._batch_size is not None:
            self._take_rows([b for b in range(self._batch_size) for _ in range(int(repeats))])

    def crop(self, tokens_to_remove) -> None:
        """transformers' crop (assisted generation, prompt lookup decoding): ``crop(-n)`` drops the
        last n tokens of every row in every layer, where every later step then computes what it
        would have had the cache never seen them (a wrapped ring's slots of the n keys before its
        oldest held the dropped tokens: kept_positions leaves them out until the next steps refill
        them; no query's window reaches them): full heads always; a streaming head while its ring still holds
        its window before them (n <= max_step, or the ring has not wrapped) and, compensated, while
        they evicted nothing. A budget head chose by their attention: refused (NotImplementedError),
        as is n past what a row holds; a refused call changes nothing. ``crop(0)`` does nothing."""
        caller = CALLER + ".crop"
        if not is_int(tokens_to_remove) or tokens_to_remove > 0:
            raise fail(caller, "tokens_to_remove", "an int <= 0 (-n drops the last n tokens, as transformers' "
                                                   "caches take it)", repr(tokens_to_remove))
        n = -int(tokens_to_remove)
        if n == 0 or not self._sized:
            return
        self._refuse_with_linear_states(caller)
        # (a layer not called yet holds nothing to drop)
        layers = [(i, st) for i, st in self._stored_layers() if any(st.held)]
        for i, st in layers:
            if min(st.held) < n:
                raise fail(caller, "tokens_to_remove", f"at most the {min(st.held)} tokens a row holds in layer {i}",
                           tokens_to_remove)
            problem = st.why_not_dropped(n)
            if problem is not None:
                raise NotImplementedError(f"{caller}: layer {i} cannot drop its last {n} tokens exactly: {problem}")
        for _, st in layers:
            st.drop_last(n)

    def _refuse_with_linear_states(self, caller) -> None:
        """What transformers' own cache cannot do to a hybrid model's recurrent states either (while
        some layer holds them: after the first call)."""
        if any(any(getattr(layer, "has_previous_state", {}).values()) for layer in self._linear_layers()):
            raise NotImplementedError(f"{caller}: a hybrid model's linear-attention and Mamba layers hold recurrent "
                                      "states, which cannot be cut back or have rows picked (nor can transformers' "
                                      "cache)")

    def _row_index(self, caller, name, index, same_count=False) -> list:
        """`index` checked as batch rows of this cache: a list of ints."""
        if isinstance(index, torch.Tensor):
            if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
                raise TypeError(f"{caller}: {name} must be a 1-D integer tensor, got {describe(index)}")
            rows = index.tolist()
        else:
            rows = _cache_layout.as_list(index)
            if rows is None or not all(is_int(b) for b in rows):
                raise TypeError(f"{caller}: {name} must be a 1-D integer tensor or a sequence of ints, got {index!r}")
            rows = [int(b) for b in rows]
        B = self._batch_size
        if B is None:  # (an empty cache whose first call will size it: nothing to reorder)
            return rows
        if not rows or not all(0 <= b < B for b in rows):
            raise fail(caller, name, f"batch rows in [0, {B})", rows)
        if same_count and len(rows) != B:
            raise fail(caller, name, f"one entry per batch row ({B})", f"{len(rows)} entries")
        return rows

    def _take_rows(self, rows: list) -> None:
        if self._batch_size is None:
            return
        if self._sized:
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            for st in self._storages:
                st.take_rows(index, rows)
        self._batch_size = len(rows)

    def nbytes(self) -> int:
        """Bytes the cache really holds (storages, capacity included, and layout tables)."""
        return sum(layer.nbytes() for layer in self._storages)

    def whole_model_view(self, dst: int = 0):
        """The whole model's cache (a ``CacheView``: bytes, and each KV head's kept positions per
        layer and batch row). On a tensor-parallel model every rank must call it: rank `dst` of
        the tensor-parallel group gets the view of all ranks' heads, the others None."""
        return _distributed.cache_view(self, self._head_shard, dst)

    def ideal_nbytes(self) -> int:
        """Bytes of exactly the tokens each head keeps (K and V), and of one token per compensated
        head and row that has evicted tokens (its compensation)."""
        return sum((layer.kept_tokens() + layer.compensation_tokens()) * self._bytes_per_token(layer)
                   for layer in self._storages)

    def compensation(self, layer: int, b: int, kv_head: int):
        """(mean key, mean value, count) of what compensated streaming KV head `kv_head` of batch
        row `b` has evicted in `layer` (float64 ``[D]``, ``[D]``, int; means 0 while count is 0)."""
        caller = CALLER + ".compensation"
        self._check_layer(caller, layer)
        st = self._layers[layer]
        if not is_int(b) or not 0 <= b < len(st.held):
            raise fail(caller, "b", f"a batch row in [0, {len(st.held)})", repr(b))
        if not is_int(kv_head) or not 0 <= kv_head < st.Hkv or st.compensation[kv_head] is None:
            raise fail(caller, "kv_head", f"a compensated streaming KV head of layer {layer}", repr(kv_head))
        return st.compensation_of(b, kv_head)

    def dense_nbytes(self) -> int:
        """Bytes a dense cache ([B, Hkv, S, D] keys and values per layer that stores its own:
        transformers' cache of the same model) would hold."""
        return sum(max(layer.held, default=0) * len(layer.held) * layer.Hkv * self._bytes_per_token(layer)
                   for layer in self._storages)

    def _stored_layers(self) -> list:
        """(layer, storage) of each layer that stores its own keys."""
        return [(i, st) for i, st in enumerate(self._layers) if i not in self._kv_source]

    def _bytes_per_token(self, st: LayerStorage) -> int:
        """K and V of one token of one KV head of a layer (0 before the dtype is known: nothing is held)."""
        return 0 if self.dtype is None else 2 * st.D * torch.empty((), dtype=self.dtype).element_size()

    # ------------------------------------------------------------------------------- sizing

    def _ensure_sized(self, caller, sizing) -> None:
        """Allocates every layer's storages for (batch size, dtype, device) unless the cache is
        sized already; all layers or none."""
        if self._sized:
            return
        try:
            for layer in self._storages:
                layer.allocate(caller, *sizing)
        except ValueError:
            for layer in self._storages:
                layer.release()
            raise
        self._batch_size, self.dtype, self.device = sizing
        self._sized = True

    def _sizing_for(self, caller, name, t):
        """(batch size, dtype, device) of the cache: what was given, the rest from the first
        call's tensor `t` (checked to be one the cache can hold)."""
        if self._sized:
            return self._batch_size, self.dtype, self.device
        if self.dtype is None:
            check_float_dtype(caller, name, t)
        if self.device is None:
            _check_device(caller, name, t.device)
        return (t.shape[0] if self._batch_size is None else self._batch_size, self.dtype or t.dtype,
                self.device or t.device)

    # -------------------------------------------------------------------------------- checks

    def _check_room(self, caller, st, new_tokens: int):
        """A step that would take a row past max_length is refused before anything changes."""
        held = max(st.held, default=0)
        if self.max_length is not None and held + new_tokens > self.max_length:
            raise ValueError(f"{caller}: max_length = {self.max_length} tokens per row would be exceeded ({held} "
                             f"held + {new_tokens} new); make the cache with a larger max_length")

    def _check_layer(self, caller, layer):
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise fail(caller, "layer", f"an int in [0, {self.num_layers})", repr(layer))

    def _check_inputs(self, caller, layer, layout, named):
        """The layer, the layout and the tensors (dense, 4-D, of the cache's batch size, dtype and
        device; the first one's when the cache is not sized yet), before anything reads their
        strides. Returns the tensors in "bshd" and the sizing they ask for."""
        self._check_layer(caller, layer)
        if layout not in ("bshd", "bhsd"):
            raise fail(caller, "layout", "'bshd' or 'bhsd'", repr(layout))
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{caller}: {name} must be a 4-D tensor, got {type(t).__name__}")
            check_dense(caller, t, name)
            if t.dim() != 4:
                raise fail(caller, name, "a 4-D tensor", tuple(t.shape))
        sizing = self._sizing_for(caller, *named[0])
        B, dtype, device = sizing
        for name, t in named:
            if t.device != device:
                raise fail(caller, name, f"on the cache's device {device}", t.device)
            if t.dtype != dtype:
                raise fail(caller, name, f"of the cache's dtype {dtype}", t.dtype)
        tensors = [t.transpose(1, 2) if layout == "bhsd" else t for _, t in named]
        return tensors, sizing

    @staticmethod
    def _check_kv(caller, k, v, B, st: LayerStorage):
        if k.shape != v.shape or tuple(k.shape[::2]) != (B, st.Hkv) or k.shape[3] != st.D:
            raise fail(caller, "k", f"[B, S, Hkv, D] = [{B}, S, {st.Hkv}, {st.D}] like v", tuple(k.shape))

    def _head_args(self, caller, st, B, device, keys, per_head) -> HeadArgs:
        """The per-head arguments of a call over `keys` keys, checked (window and sinks: the cache's)."""
        Hq, D = self.num_heads, st.D
        # gate and alpha may come from the host (a patched model's HeadSpec keeps them there on a
        # GPU): the cache's kernels read them on the device, from a copy made once per tensor
        # (on_device), as are the cache's own windows and sinks -- a repeated decode step copies
        # nothing, so it neither synchronises nor breaks CUDA-graph capture
        args = head_args(caller, HeadShapes(B=B, Hq=Hq, Sk=keys, D=D, Dv=D), device, host_planning=True, **per_head)
        _check_alpha(caller, args.alpha, st)
        return args._replace(window=on_device(st.windows, device).expand(B, Hq),
                             sinks=on_device(st.sinks, device).expand(B, Hq),
                             gate=on_device(args.gate, device), alpha=on_device(args.alpha, device))

    @staticmethod
    def _check_per_head_names(caller, causal, per_head):
        if "window" in per_head or "sinks" in per_head:
            raise ValueError(f"{caller}: window and sinks are the cache's (set them at construction); pass the other "
                             "per-head arguments here")
        if not _HEAD_ARG_NAMES.issuperset(per_head):
            unknown = sorted(set(per_head) - _HEAD_ARG_NAMES)
            raise TypeError(f"{caller}: unexpected argument(s) {', '.join(unknown)} (the per-head arguments are "
                            f"{', '.join(_HEAD_ARGS)})")
        if not isinstance(causal, bool):
            raise TypeError(f"{caller}: causal must be a bool, got {type(causal).__name__}")

    # -------------------------------------------------------------------------------- attention

    def attention(self, layer, q, k, v, *, layout="bshd", causal=True, lengths=None, padding_side="right", probe=None,
                  **per_head):
        """Attention of `layer` for the new tokens q, k, v (see the class docstring).

        ``lengths`` (first call only): valid tokens per batch row when the prompts of a batch
        differ in length: the first ones of each row (``padding_side="right"``) or the last ones
        (``"left"``, as tokenizers pad for generation); the output rows of the padding are 0. A
        row's positions start at its first valid token either way (its sinks are its own first
        tokens; key_bias indexes them), and the padding is not stored; ``get_seq_length`` counts
        the left padding in, as transformers does.
        ``probe=headops.Probe(...)`` also returns the call's probe statistics, ``(out,
        ProbeResult)``: a prefill's over the prompt, a decode step's over the keys each KV head
        keeps, at their original positions, and a compensated streaming head's compensation key as
        a positionless term (docs/probes.md; not with alpha). Rows padded on the left report at the
        caller's (padded) positions: query rows as given, key positions after the padding.
        """
        caller = CALLER + ".attention"
        (q, k, v), sizing = self._check_inputs(caller, layer, layout, (("q", q), ("k", k), ("v", v)))
        self.reached(layer)
        st = self._layers[layer]
        B, D = sizing[0], st.D
        if q.shape[0] != B or tuple(q.shape[2:]) != (self.num_heads, D):
            raise fail(caller, "q", f"[B, S, Hq, D] with B={B}, Hq={self.num_heads}, D={D}", tuple(q.shape))
        self._check_kv(caller, k, v, B, st)
        self._check_per_head_names(caller, causal, per_head)
        stats = None
        if padding_side not in ("right", "left"):
            raise fail(caller, "padding_side", "'right' or 'left'", repr(padding_side))
        if layer in self._kv_source:
            if lengths is not None or padding_side != "right":
                raise ValueError(f"{caller}: layer {layer} reads layer {self._kv_source[layer]}'s keys and values: its "
                                 "prompt's lengths and padding are that layer's call's")
            out, stats = self._attend_shared(caller, layer, q, k, v, causal, per_head, probe)
        elif max(st.held, default=0) == 0:
            out, stats = self._prefill(caller, st, q, k, v, lengths, causal, per_head, sizing, probe, padding_side)
        else:
            if lengths is not None or padding_side != "right":
                raise ValueError(f"{caller}: lengths and padding_side are for the first call (prefill) only")
            out, stats = self._decode(caller, layer, q, k, v, causal, per_head, probe)
        out = out.transpose(1, 2) if layout == "bhsd" else out
        return out if probe is None else (out, stats)

    def append(self, layer, k, v, *, layout="bshd"):
        """Stores new tokens of `layer` without computing attention (e.g. a prompt whose
        attention was computed elsewhere); each KV head keeps what it would keep."""
        caller = CALLER + ".append"
        (k, v), sizing = self._check_inputs(caller, layer, layout, (("k", k), ("v", v)))
        self._refuse_shared(caller, layer)
        st = self._layers[layer]
        self._check_kv(caller, k, v, sizing[0], st)
        self._check_room(caller, st, k.shape[1])
        self._ensure_sized(caller, sizing)
        st.reserve(max(st.held) + k.shape[1])
        st.append(k, v)
        st.prompt_just_stored = False

    def fill(self, layer, k, v, *, queries=None, lengths=None, layout="bshd", causal=True, **per_head):
        """Stores a prompt whose attention was computed elsewhere (a dense prefill: every method
        built from one full-attention prefill, docs/cache.md) in an empty `layer`: each KV head
        keeps what its kind says, as after this cache's own prefill. Streaming heads fold what
        they evict into their compensation; budget heads choose (allocation included) by the
        SnapKV scores of `queries`, the prompt's last queries as the attention saw them (RoPE
        applied), ``[B, w, Hq, D]``: entry j of row b is position ``lengths[b] - w + j`` (entries
        before position 0 are ignored), w at least the observation window. They are needed only
        when the layer has budget heads. The per-head arguments are those of ``attention``; the
        ones that shape attention probabilities (softmax_scale, key_bias by original position,
        sink_logit, a gate of 0) shape the scores, the others change nothing stored. ``lengths``:
        valid tokens per row (right padding). A call that is refused changes nothing."""
        caller = CALLER + ".fill"
        named = (("k", k), ("v", v)) + ((("queries", queries),) if queries is not None else ())
        tensors, sizing = self._check_inputs(caller, layer, layout, named)
        self._refuse_shared(caller, layer)
        k, v = tensors[0], tensors[1]
        qs = tensors[2] if queries is not None else None
        st = self._layers[layer]
        B, D = sizing[0], st.D
        self._check_kv(caller, k, v, B, st)
        self._check_per_head_names(caller, causal, per_head)
        if max(st.held, default=0) != 0:
            raise ValueError(f"{caller}: layer {layer} holds tokens already; fill stores a prompt in an empty layer "
                             "(append adds tokens)")
        S = k.shape[1]
        rows = [S] * B if lengths is None else _lengths(caller, lengths)
        if len(rows) != B or not all(1 <= n <= S for n in rows):
            raise fail(caller, "lengths", f"{B} values in [1, {S}]", lengths)
        obs = self._observation_window()
        if qs is None and st.budget_layout is not None:
            raise fail(caller, "queries", "the prompt's last queries, [B, w, Hq, D] (the layer has budget heads: they "
                                          "keep the tokens those queries attend to most)", None)
        if qs is not None:
            if qs.shape[0] != B or tuple(qs.shape[2:]) != (self.num_heads, D):
                raise fail(caller, "queries", f"[B, w, Hq, D] with B={B}, Hq={self.num_heads}, D={D}",
                           tuple(qs.shape))
            if st.budget_layout is not None and qs.shape[1] < min(max(rows), obs):  # (read by budget heads only)
                raise fail(caller, "queries", f"at least the observation window's {min(max(rows), obs)} last queries "
                                              "per row", f"{qs.shape[1]}")
        args = self._head_args(caller, st, B, k.device, S, per_head)
        self._check_room(caller, st, max(rows))
        w = 0 if qs is None else qs.shape[1]
        self._store_prompt(caller, st, k, v, None if lengths is None else rows, causal, args, sizing,
                           lambda b, n: None if qs is None else qs[b, max(0, w - n):])

    def _refuse_shared(self, caller, layer) -> None:
        """Storing is for the layers with a storage of their own."""
        if layer in self._kv_source:
            raise ValueError(f"{caller}: layer {layer} reads layer {self._kv_source[layer]}'s keys and values (the "
                             f"model's num_kv_shared_layers) and stores none: store them in layer "
                             f"{self._kv_source[layer]}")

    def _attend_shared(self, caller, layer, q, k, v, causal, per_head, probe):
        """A layer that reads its source layer's storage (Gemma's num_kv_shared_layers), called after
        that layer in the same forward, with the keys and values the model handed on from it: after
        the source's prompt, attention over that prompt as given (`k`, `v` the prompt's; `q` its last
        queries: transformers may pass only those that give logits), within each row's tokens; after
        a decode call, the decode kernel over what the source keeps, which holds the new tokens
        already (nothing is stored)."""
        st, source = self._layers[layer], self._kv_source[layer]
        if not any(st.held):
            raise ValueError(f"{caller}: layer {layer} reads layer {source}'s keys and values (the model's "
                             f"num_kv_shared_layers), which holds none yet: call layer {source} first")
        if not st.prompt_just_stored:
            return self._decode(caller, layer, q, k, v, causal, per_head, probe, store=False)
        B, S, Sq = k.shape[0], k.shape[1], q.shape[1]
        if any(n + p > S for n, p in zip(st.held, st.pads)) or Sq > S:
            raise fail(caller, "k", f"layer {source}'s prompt, {max(st.held)} tokens or more (q at most as many)",
                       f"{S} keys, {Sq} queries")
        args = self._head_args(caller, st, B, q.device, S, per_head)
        if self.options["prefill"] == "full":
            args = args._replace(window=self._model_window(st, args), sinks=None)
        request = self._probe_request(caller, st, q, args, probe, S)
        lengths = None if st.held == [S] * B else list(st.held)
        if request is not None and Sq != S and lengths is not None:
            raise NotImplementedError(f"{caller}: probes of layer {layer} over {Sq} of a padded prompt's {S} queries "
                                      "(the model passed only its last ones): probe rows of one length, or run the "
                                      "model over the whole prompt (logits_to_keep=0)")
        if request is None:
            return self._prompt_attention(q, k, v, lengths, st.pads, causal, args), None
        return _probed_prompt(q, k, v, args, request, lengths, causal, st.pads)

    @staticmethod
    def _prompt_attention(q, k, v, lengths, pads, causal, args: HeadArgs):
        """Attention of a prompt's last q.shape[1] queries over its keys (k, v [B, S, Hkv, D]): row b
        has `lengths[b]` tokens after `pads[b]` of left padding (lengths None: every row all S);
        the output rows of padding are 0."""
        if lengths is None:
            return run_fused(q, k, v, args, causal=causal, heads_first=False)[0]
        S, Sq = k.shape[1], q.shape[1]
        out = torch.zeros_like(q)
        for b, (n, first) in enumerate(zip(lengths, pads)):
            start, end = max(S - Sq, first), first + n  # (padded positions of the row's queries)
            if start < end:
                out[b:b + 1, start - (S - Sq):end - (S - Sq)] = run_fused(
                    q[b:b + 1, start - (S - Sq):end - (S - Sq)], k[b:b + 1, first:end], v[b:b + 1, first:end],
                    args.row(b, n), causal=causal, heads_first=False)[0]
        return out

    @staticmethod
    def _model_window(st, args):
        """The windows of a prefill="full" prompt: none, or in a sliding-window layer of the model
        every query head's the model's (full attention there is what the model sees: before
        2026-12-07 such layers read the whole prompt, and Mistral's logits came out 0.44 off)."""
        if st.model_window is None:
            return None
        return torch.full_like(args.window, st.model_window)

    def _probe_request(self, caller, st, q, args, probe, keys):
        """The checked probe arguments of a call over `keys` keys (None without a probe)."""
        if probe is None:
            return None
        _cache_probe.refuse(caller, args, st)
        return check_probe(caller, probe, B=q.shape[0], Sq=q.shape[1], Sk=keys)

    def _prefill(self, caller, st, q, k, v, lengths, causal, per_head, sizing, probe, padding_side="right"):
        B, S = k.shape[0], k.shape[1]
        args = self._head_args(caller, st, B, q.device, S, per_head)  # the whole batch, before any change
        if self.options["prefill"] == "full":  # every head reads the whole prompt; then keeps its kind's
            args = args._replace(window=self._model_window(st, args), sinks=None)
        request = self._probe_request(caller, st, q, args, probe, S)
        if lengths is not None:
            lengths = _lengths(caller, lengths)
            if len(lengths) != B or not all(1 <= n <= S for n in lengths):
                raise fail(caller, "lengths", f"{B} values in [1, {S}]", lengths)
            if q.shape[1] != S:
                raise ValueError(f"{caller}: with lengths, q must cover the whole prompt")
        self._check_room(caller, st, S if lengths is None else max(lengths))
        pads = [0] * B if lengths is None or padding_side == "right" else [S - n for n in lengths]
        stats = None
        if request is None:
            out = self._prompt_attention(q, k, v, lengths, pads, causal, args)
        else:  # every row's attention, then the cache changes
            out, stats = _probed_prompt(q, k, v, args, request, lengths, causal, pads)
        if any(pads):  # each row's tokens first (right padding), as the storage takes them
            q, k, v = (_shift_rows(t, [-p for p in pads]) for t in (q, k, v))
        self._store_prompt(caller, st, k, v, lengths, causal, args, sizing,
                           (lambda b, n: q[b]) if lengths is None else (lambda b, n: q[b, :n]))
        st.pads = pads
        st.prompt_just_stored = True
        return out, stats

    def _store_prompt(self, caller, st, k, v, lengths, causal, args, sizing, row_queries):
        """Stores a checked prompt (k, v [B, S, Hkv, D]; `lengths` per row or None: all S) in an
        empty layer; budget heads choose from row b's last queries, ``row_queries(b, n)``."""
        self._ensure_sized(caller, sizing)
        B, S = k.shape[0], k.shape[1]
        if lengths is None:
            st.reserve(S)
            st.append(k, v, write_budget=False)
        else:
            st.reserve(max(lengths))
            for b, n in enumerate(lengths):
                st.append(k[b:b + 1, :n], v[b:b + 1, :n], row=b, write_budget=False)
        for b, n in enumerate(lengths or [S] * B):
            self._select_budget(st, b, row_queries(b, n), k[b, :n], v[b, :n], args.row(b, n), causal)
        st.prompt_just_stored = False

    def _observation_window(self) -> int:
        """The prompt's last queries whose attention scores budget heads' tokens."""
        return self.options["observation_window"] or max(self.budget_recent, 1)

    def _select_budget(self, st, b, q, k, v, args: HeadArgs, causal: bool):
        """Row b's budget heads at prefill (headops.budgets): SnapKV scores from the prompt's last
        queries (`q`: at least the observation window's; `args`: row b's per-head arguments), the
        sizes the allocation gives, then each head keeps its sinks, its budget_recent latest tokens
        and its best-scored ones (k, v: the row's whole prompt, [n, Hkv, D])."""
        if st.budget_table is None:
            return
        n = k.shape[0]
        opts = self.options
        obs = min(n, q.shape[0], self._observation_window())
        kept_window = obs if opts["keep_observation_window"] else 0
        heads = [h for h, kind in enumerate(st.kinds) if kind == BUDGET]
        scores = budgets.snapkv_scores(q[None, q.shape[0] - obs:], k[None], v[None], args,
                                       self.num_heads // st.Hkv, causal=causal,
                                       pool_kernel=opts["pool_kernel"], pooling=opts["pooling"], heads=heads,
                                       scored_keys=n - obs if kept_window else None)
        rows = [int(st.kv_index[h]) for h in heads]  # budget head i is the i-th budget KV head
        sizes, kept = budgets.choose(scores[heads], st.selection_budgets, st.budget_layout[:, 2].tolist(),
                                     self.budget_recent, allocation=opts["allocation"], alpha=opts["adakv_alpha"],
                                     kept_window=kept_window)
        slots = [n + st.append_room for n in sizes]
        if slots != st.budget_sizes(b):
            st.set_budget_sizes(b, slots)
        for h, i, keep in zip(heads, rows, kept):
            st.write_budget_selection(b, i, keep, k[keep, h], v[keep, h], scores[h, keep])

    def _decode(self, caller, layer, q, k, v, causal, per_head, probe=None, store=True):
        """One decode step: host decisions read the lengths' Python mirror and shapes only (no
        tensor data), so that torch.compile traces the step whole. `store` False: a layer reading
        its source's storage, which stored the step's keys already."""
        st = self._layers[layer]
        Sq = k.shape[1]
        if store:
            self._check_room(caller, st, Sq)
        elif q.shape[1] <= Sq:  # (transformers may pass a reading layer only the last queries: those giving logits)
            Sq = q.shape[1]
        if q.shape[1] != Sq:
            raise fail(caller, "q", f"as many new tokens as k ({Sq})", q.shape[1])
        if per_head.get("key_bias") is not None and q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{caller}: key_bias cannot be captured in a CUDA graph: it is indexed by position and "
                             "its length is fixed at capture, so the keys a replay appends would get no bias")
        keys = max(st.held) + (Sq if store else 0)
        if Sq > self.max_step:
            # (a read storage's partial heads would take the tokens as steps whose evictions its readers miss;
            # refused in every layer, so that a model's forward is refused at its first layer)
            shared = [source for source, readers in sorted(self._readers.items())
                      if self._layers[source].has_partial_heads]
            if shared:
                raise ValueError(
                    f"{caller}: {Sq} new tokens in one call, more than max_step = {self.max_step}: layer {shared[0]}'s "
                    f"keys are read by layers {self._readers[shared[0]]} too (the model's num_kv_shared_layers), and "
                    "its streaming or budget heads would take the tokens as steps whose evictions those layers' "
                    f"queries miss; make the cache with max_step >= {Sq}")
        if Sq > self.max_step and st.has_partial_heads:
            return self._decode_in_steps(caller, layer, q, k, v, causal, per_head, probe, keys), None
        args, kernel_args = self._step_args(caller, layer, q, keys, per_head)  # checked before the cache changes
        request = self._probe_request(caller, st, q, args, probe, keys)
        if store:
            st.reserve(keys)
            st.append(k, v)
            st.prompt_just_stored = False
        stats = None if request is None else _cache_probe.decode(st, q, args, request, causal)
        return torch.ops.headops.decode_attention.default(
            q, st.full_k, st.full_v, st.ring_k, st.ring_v, st.lengths, st.kv_kind, st.kv_index, st.ring_offset,
            st.ring_sinks, st.ring_size, causal, *kernel_args, _split_keys(self.split_keys, st, q.device),
            *st.budget_args(scored=store), *st.comp_args()), stats

    def _decode_in_steps(self, caller, layer, q, k, v, causal, per_head, probe, keys):
        """A decode call of more than max_step new tokens (a second turn's prompt, a question after a
        compressed context) as consecutive calls of max_step tokens: the rings hold what each of them
        sees, so every query attends as in one call; a budget head evicts between them, as between
        decode steps. Checked whole before anything changes."""
        if probe is not None:
            raise fail(caller, "k", f"at most max_step = {self.max_step} new tokens in a probed decode call",
                       f"{k.shape[1]} tokens")
        self._head_args(caller, self._layers[layer], q.shape[0], q.device, keys, per_head)
        key_bias, first = per_head.get("key_bias"), keys - k.shape[1]
        outs = []
        for start in range(0, k.shape[1], self.max_step):
            end = min(k.shape[1], start + self.max_step)
            step = dict(per_head)
            if isinstance(key_bias, torch.Tensor) and key_bias.dim() and key_bias.shape[-1] == keys:
                step["key_bias"] = key_bias[..., :first + end]  # (indexed by position: the keys so far)
            outs.append(self._decode(caller, layer, q[:, start:end], k[:, start:end], v[:, start:end], causal,
                                     step)[0])
        return torch.cat(outs, 1)

    def _step_args(self, caller, layer, q, keys, per_head):
        """(HeadArgs, their kernel arguments) of a decode step. Steps whose per-head arguments are
        all Python numbers (a patched model's softmax_scale; none at all) repeat the same
        arguments every step: those are built and checked once per layer, batch size, device and
        dtype, and reused (building them was the largest Python cost of a short-context step)."""
        numbers = None if torch.compiler.is_compiling() else _numbers_key(per_head)
        key = None if numbers is None else (layer, q.shape[0], q.device, q.dtype, numbers)
        if key in self._step_args_memo:
            return self._step_args_memo[key]
        args = self._head_args(caller, self._layers[layer], q.shape[0], q.device, keys, per_head)
        built = args, args.kernel_args(q.dtype)
        if key is not None:
            if len(self._step_args_memo) >= 4 * self.num_layers:
                self._step_args_memo.clear()
            self._step_args_memo[key] = built
        return built


def _numbers_key(per_head: dict):
    """The per-head arguments as a hashable key when each is None, an int or a float (exactly:
    a bool, a subclass or a tensor is checked on every call); None otherwise."""
    for value in per_head.values():
        if value is not None and type(value) is not int and type(value) is not float:
            return None
    return tuple(per_head.items())


SPLIT_KEYS = 1024  # keys per work item (CPU) and the most per CUDA block
_BLOCKS_PER_SM = 3  # CUDA decode blocks an SM runs at once (bf16/fp16 to D = 128; decode_kernel.cu)
_SMALLEST_SPLIT = 128  # one 32-key tile for each of a block's 4 warps
_SM_COUNTS: dict[int, int] = {}


def _split_keys(given, st, device: torch.device) -> int:
    """A decode step's keys per work item: `given`, or for split_keys=None 1024 on the CPU and on a
    GPU the fewest (a multiple of 128, at most 1024) that still give every SM 3 blocks for the
    keys the storages can hold (each full head's capacity, every streaming and budget slot). A
    block walks its keys one 32-key tile a warp at a time: on an H200 (2026-12-04) a block of
    1024 keys (8 tiles a warp) took 99 us, and 16 such blocks (8 streaming heads of 1028 keys)
    left the GPU nearly idle for that long; with this rule a step was as fast as the faster of
    the fixed sizes 256 and 1024, or within 2 %, in every case of bench/kvcache_cuda.py there,
    and up to 1.5x faster than 1024 (docs/cuda.md). Shapes and capacities only (no tensor data):
    a CUDA graph or torch.compile sees the same number while the storages keep their sizes."""
    if given is not None:
        return given
    if device.type != "cuda":
        return SPLIT_KEYS
    sms = _SM_COUNTS.get(device.index)
    if sms is None:
        sms = _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    slots = 0 if st.ring_k is None else st.ring_k.shape[1]
    return gpu_split_keys(len(st.held) * (st.full_heads * st.full_capacity + slots), sms)


def gpu_split_keys(keys: int, sms: int) -> int:
    """Keys per CUDA block for `keys` keys on `sms` SMs: the fewest (a multiple of 128, 128 to
    1024) that give every SM 3 blocks."""
    per_block = -(-keys // (_BLOCKS_PER_SM * sms))
    return min(SPLIT_KEYS, max(_SMALLEST_SPLIT, -(-per_block // _SMALLEST_SPLIT) * _SMALLEST_SPLIT))


def _check_device(caller, name, device: torch.device) -> None:
    """The CPU, or a CUDA device when the build has the CUDA kernels (csrc/kvcache/cuda/; written and
    tested on an NVIDIA H200)."""
    from . import _C

    if device.type == "cpu":
        return
    if device.type == "cuda" and getattr(_C, "cuda_compiled", False):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index is None and count) or (device.index is not None and device.index < count):
            return
        raise ValueError(f"{caller}: {name} is on device {device}, but this machine has "
                         f"{count or 'no'} CUDA device{'' if count == 1 else 's'}")
    where = "CPU and CUDA" if getattr(_C, "cuda_compiled", False) else "CPU only in this build"
    raise ValueError(f"{caller}: {name} is on device {device}, which the cache does not support ({where})")


def _probed_prompt(q, k, v, args: HeadArgs, request, lengths, causal, pads):
    """(out, ProbeResult) of a prompt's attention with a probe: rows padded on the left (`pads`)
    go to the probe with their tokens first, and their outputs come back in place."""
    if any(pads):
        q, k, v = (_shift_rows(t, [-p for p in pads]) for t in (q, k, v))
    out, stats = _cache_probe.prefill(q, k, v, args, request, lengths, causal, pads)
    return (_shift_rows(out, pads) if any(pads) else out), stats


def _shift_rows(t, shifts):
    """[B, S, ...] with row b rolled by shifts[b] along S."""
    return torch.stack([torch.roll(t[b], s, 0) if s else t[b] for b, s in enumerate(shifts)])


def _lengths(caller, lengths) -> list:
    """Integers per batch row: an int sequence or an integer tensor (no floats, bools or strings)."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{caller}: lengths must be integers, got a {lengths.dtype} tensor")
        return lengths.reshape(-1).tolist()
    values = _cache_layout.as_list(lengths)
    values = [lengths] if values is None else values
    if not all(is_int(x) for x in values):
        raise TypeError(f"{caller}: lengths must be integers (one per batch row), got {lengths!r}")
    return [int(x) for x in values]


def _check_alpha(caller, alpha, st: LayerStorage):
    """alpha > 0 needs every key (the full branch): only query heads of full KV heads have them.
    (It reads alpha's values: skipped while torch.compile traces, where the CPU decode op
    re-checks it; the CUDA op reads no values, so a GPU alpha under graph capture is trusted as
    it was checked in the eager warm-up.)"""
    if alpha is None or not st.partial_query_heads or torch.compiler.is_compiling():
        return
    if alpha.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # (reading a GPU alpha would synchronise and abort the capture; it was checked eagerly)
    used = (alpha > 0).any(dim=0).tolist()
    heads = [h for h in st.partial_query_heads if used[h]]
    if heads:
        raise ValueError(f"{caller}: alpha must be 0 on query heads served by a streaming or budget KV head (they "
                         f"keep only part of the keys, not the full branch); query heads {heads} have alpha > 0")
