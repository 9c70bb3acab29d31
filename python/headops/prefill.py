"""One dense prefill, every method's cache built from it (docs/cache.md, "From a dense prefill").

The evaluation of head-level compression methods (docs/DESIGN.md section 7) prefills each
context once with full attention; every method then builds its compressed cache from that
prefill, appends the question and decodes::

    prefill = headops.capture_prefill(model, context_ids, observation_window=32)
    for spec in methods:                                   # HeadSpec.razor, .budget, .headkv ...
        cache = headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=64)
        headops.patch(model, spec)                         # (or set_spec on a patched model)
        out = model.generate(context_and_question_ids, cache=cache, ...)

A ``DensePrefill`` holds what a cache needs from the prompt, per layer: the keys and values as
the model cached them (RoPE applied) and the last queries as attention saw them (for the SnapKV
scores of budget heads), with the valid length of each batch row and the model's softmax scale.
Building a cache from it reads no model weights and runs no attention over the prompt.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch

from ._args import fail, is_int

__all__ = ["DensePrefill", "capture_prefill"]

CAPTURE = "headops_capture_prefill"


@dataclasses.dataclass
class DensePrefill:
    """A prompt's dense prefill, per layer (lists of L tensors, layout "bhsd" as transformers
    caches hold them):

      keys, values: ``[B, Hkv, S, D]`` (RoPE applied);
      queries: ``[B, Hq, w, D]``, the last w queries of each row (entry j of row b is position
          ``lengths[b] - w + j``; entries before position 0 are zeros), or None (no budget heads
          can be built then); a layer that reads another layer's keys and values (Gemma's
          num_kv_shared_layers) has that layer's keys and values and no queries (None);
      lengths: valid tokens per row (right padding), or None: every row is S long;
      softmax_scale: the model's scale per layer (None: 1 / sqrt(D));
      states: a hybrid model's other layers after the prompt, {model layer: transformers' cache
          layer of its convolution and recurrent states} (and of the Mamba mixers that run beside
          attention in one layer: Falcon-H1's), or None (every layer attends, without a mixer).
    """
    keys: list
    values: list
    queries: list | None = None
    lengths: list | None = None
    softmax_scale: list | None = None
    states: dict | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def prefix(self, end: int, observation_window: int) -> "DensePrefill":
        """The prefill of each row's first `end` tokens, as ``capture_prefill`` over them would give
        it (up to the rounding of the model's products over more rows): keys and values cut at
        `end`, and the `observation_window` queries ending there, taken from this prefill's
        queries (which must reach back that far). A causal model's first `end` tokens do not see
        the ones after them, so one prefill of a whole prompt serves both a cache built before
        its question and one built after it (headops.evaluate's question-aware methods)."""
        caller = "headops.DensePrefill.prefix"
        S = self.keys[0].shape[2]
        if self.states:
            raise NotImplementedError(f"{caller}: a hybrid model's recurrent states after the whole prompt hold no "
                                      "prefix's; capture the prefix itself")
        if self.lengths is not None:
            raise fail(caller, "self.lengths", "None (every row S long: a padded prefill has no common prefix end)",
                       self.lengths)
        if not is_int(end) or not 1 <= end <= S:
            raise fail(caller, "end", f"an int in [1, {S}]", repr(end))
        if not is_int(observation_window) or observation_window < 1:
            raise fail(caller, "observation_window", "an int >= 1", repr(observation_window))
        if self.queries is None:
            raise fail(caller, "self.queries", "the prompt's last queries (captured with an observation window)", None)
        have = self.queries[0].shape[2]
        first = max(0, end - observation_window)  # the earliest position wanted (before 0: zeros)
        if first < S - have:
            raise fail(caller, "observation_window", f"a window whose queries this prefill holds (it holds positions "
                       f"{S - have}..{S - 1}; capture it with observation_window >= {S - first} to end a "
                       f"{observation_window}-query window at {end})", observation_window)
        queries = []
        for q in self.queries:
            if q is None:  # (a layer reading another's keys)
                queries.append(None)
                continue
            part = q.new_zeros(q.shape[0], q.shape[1], observation_window, q.shape[3])
            part[:, :, observation_window - (end - first):] = q[:, :, first - (S - have):end - (S - have)]
            queries.append(part)
        return DensePrefill(keys=[k[:, :, :end] for k in self.keys], values=[v[:, :, :end] for v in self.values],
                            queries=queries, lengths=None, softmax_scale=self.softmax_scale)


def capture_prefill(model, input_ids, attention_mask=None, *, observation_window: int = 32) -> DensePrefill:
    """Runs `model` once over `input_ids` ``[B, S]`` with full attention (headops' fused kernels
    with a dense spec, whatever spec or attention the model runs otherwise: the model's own windows
    and sinks kept, as a patched model keeps them) and returns its DensePrefill: every layer's keys
    and values from the model's own cache and its last `observation_window` queries per row.
    `attention_mask` ``[B, S]`` (1 real, 0 padding) must be right padding: each row's tokens
    first. The model's attention implementation (and spec, if patched) is restored afterwards."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionAndFullAttentionLayer
    from transformers.masking_utils import AttentionMaskInterface

    from ._model_attention import attention_layer_indices, config_of, kv_sources, mixer_beside_attention, state_layers
    from .patching import (_headops_attention, _headops_mask, set_text_attention_implementation,
                           text_attention_implementation)
    from .research import with_spec
    from .spec import HeadSpec

    caller = "headops.capture_prefill"
    if not is_int(observation_window) or observation_window < 1:
        raise fail(caller, "observation_window", "an int >= 1", repr(observation_window))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise fail(caller, "input_ids", "a [B, S] tensor", getattr(input_ids, "shape", type(input_ids).__name__))
    B, S = input_ids.shape
    lengths = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, S):
            raise fail(caller, "attention_mask", f"a [B, S] = [{B}, {S}] tensor",
                       getattr(attention_mask, "shape", type(attention_mask).__name__))
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1).tolist()
        if any(n < 1 for n in lengths) or not all(bool(mask[b, :n].all()) for b, n in enumerate(lengths)):
            raise fail(caller, "attention_mask", "right padding (each row's real tokens first, at least one)",
                       attention_mask.tolist())
    rows = lengths or [S] * B
    w = observation_window
    queries, scales = {}, {}

    reading = kv_sources(model)  # (layers reading another's keys: neither keys nor queries of their own)

    def record(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        if layer in reading:
            queries[layer], scales[layer] = None, kwargs.get("scaling")
            return _headops_attention(module, query, key, value, attention_mask, **kwargs)
        q = query.new_zeros(B, query.shape[1], w, query.shape[3])
        for b, n in enumerate(rows):
            take = min(w, n)
            q[b, :, w - take:] = query[b, :, n - take:n]
        queries[layer] = q
        scales[layer] = kwargs.get("scaling")
        # (the fused kernels: on a 2-core AVX512-BF16 EPYC, 2026-12-07, a bf16 layer of 8 SmolLM2
        # prompts of 2k tokens took 0.18 s there against transformers' SDPA's 0.89)
        return _headops_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, record)
    AttentionMaskInterface.register(CAPTURE, _headops_mask)
    # only the keys, values and queries are wanted: the LM head runs for the last position
    # alone (SmolLM2's 49k-word head is a fifth of its FLOPs, and B x S x V logits)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    # a cache of every key in every layer: the model's own would keep only the window's keys in
    # its sliding-window layers (the head-sparse cache takes from the whole prompt what it keeps)
    # (a hybrid model's other layers: their states' layers, as its own cache has them)
    # (and the Mamba mixers' states beside attention in one layer: Falcon-H1's, every key kept there too)
    states, mixers = state_layers(model), mixer_beside_attention(model)
    cache = DynamicCache() if not states and not mixers else Cache(layers=[
        states[i] if i in states else LinearAttentionAndFullAttentionLayer(mixers[i]) if i in mixers else DynamicLayer()
        for i in range(config_of(model).num_hidden_layers)])
    with with_spec(model, HeadSpec.dense(model)):  # (patched for the call, or its spec set aside)
        patched = text_attention_implementation(model)
        set_text_attention_implementation(model, CAPTURE)
        try:
            with torch.no_grad():
                model(input_ids, attention_mask=attention_mask, use_cache=True, cache=cache, **last_only)
        finally:
            set_text_attention_implementation(model, patched)
    layers = attention_layer_indices(model)
    if sorted(queries) != layers:
        raise RuntimeError(f"{caller}: recorded the queries of layers {sorted(queries)}, expected {layers} (does "
                           "this model dispatch its attention through transformers' AttentionInterface?)")
    stored = [reading.get(i, i) for i in layers]  # (a reading layer: its source's keys, which it reads)
    return DensePrefill(keys=[cache.layers[i].keys for i in stored], values=[cache.layers[i].values for i in stored],
                        queries=[queries[i] for i in layers], lengths=lengths,
                        softmax_scale=[scales[i] for i in layers],
                        states={**{i: cache.layers[i] for i in states},
                                **{i: _mixer_states(cache.layers[i]) for i in mixers}} or None)


def _mixer_states(layer):
    """The convolution and recurrent states of a layer running attention beside a Mamba mixer, as a
    transformers LinearAttentionLayer of their own (without the layer's keys and values)."""
    from transformers.cache_utils import LinearAttentionLayer

    states = LinearAttentionLayer(number_of_states=layer.number_of_states)
    _copy_mixer_states(layer, states)
    return states


def _copy_mixer_states(src, dst) -> None:
    """`dst`'s Mamba mixer states become copies of `src`'s (both transformers LinearAttention layers)."""
    for name in ("conv_states", "recurrent_states"):
        setattr(dst, name, {i: None if t is None else t.clone() for i, t in getattr(src, name).items()})
    for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
                 "conv_kernel_size"):
        setattr(dst, name, dict(getattr(src, name)))
    dst.device, dst.dtype = src.device, src.dtype


def _give_states(caller, cache, prefill: DensePrefill) -> None:
    """A hybrid model's cache built from a prefill gets copies of the prompt's states in its layers
    that hold states (each cache its own: several are built from one prefill)."""
    from .cache import _TransformersLayer

    layers = dict(cache._state_layers())
    wanted = sorted(layers)
    if not wanted:
        return
    if not prefill.states or sorted(prefill.states) != wanted:
        raise fail(caller, "prefill.states", f"the states of the hybrid model's layers {wanted} (capture_prefill from "
                                             "this model)", None if not prefill.states else sorted(prefill.states))
    if prefill.lengths is not None:
        raise NotImplementedError(f"{caller}: a right-padded prefill of a hybrid model: its recurrent states ran over "
                                  "the padding; capture each row alone, or rows of one length")
    for i in wanted:
        if isinstance(layers[i], _TransformersLayer):  # (attention beside a Mamba mixer: its own layer gets them)
            _copy_mixer_states(prefill.states[i], cache.layers[i])
        else:
            cache.layers[i] = copy.deepcopy(prefill.states[i])


def build_cache(cls, model_or_config, spec, prefill: DensePrefill, **options):
    """HeadSparseCache.from_prefill (which documents it)."""
    caller = "headops.HeadSparseCache.from_prefill"
    if not isinstance(prefill, DensePrefill):
        raise TypeError(f"{caller}: prefill must be a headops.DensePrefill, got {type(prefill).__name__}")
    cache = cls(model_or_config, spec, **options)
    L = cache.num_layers
    _give_states(caller, cache, prefill)
    for name in ("keys", "values") + (() if prefill.queries is None else ("queries",)):
        if len(getattr(prefill, name)) != L:
            raise fail(caller, f"prefill.{name}", f"one tensor per layer ({L})", len(getattr(prefill, name)))
    if prefill.softmax_scale is not None and len(prefill.softmax_scale) != L:
        raise fail(caller, "prefill.softmax_scale", f"one per layer ({L})", len(prefill.softmax_scale))
    for layer in range(L):
        if cache.reads_layer(layer) is not None:  # (its storage is its source's, filled there)
            continue
        k = prefill.keys[layer]
        args = spec.layer_args(layer, k.shape[2])
        args.pop("window")
        args.pop("sinks")
        if spec.softmax_scale is None and prefill.softmax_scale is not None and \
                prefill.softmax_scale[layer] is not None:
            args["softmax_scale"] = float(prefill.softmax_scale[layer])
        cache.fill(layer, k, prefill.values[layer], queries=None if prefill.queries is None else
                   prefill.queries[layer], lengths=prefill.lengths, layout="bhsd", **args)
    return cache
