"""What a model's own attention does that a spec must keep (docs/integration.md).

A transformers model may limit some layers to a sliding window of recent keys (Mistral's
config.sliding_window, the sliding layers of Qwen2, Gemma 2/3, Starcoder2, Phi-3, GPT-OSS). Its attention
modules pass the window to the attention function, and its masks carry it, but headops' mask
function passes only the key padding: the window must reach the kernels as the heads' window. In
a sliding layer every query head's window is capped at the model's (a spec's -1, unlimited,
becomes the model's window; sinks stay as the spec says), and a HeadSparseCache keeps such a
layer's KV heads as streaming heads (only what the window lets them see, as transformers' own
sliding-window cache layers do). A full branch mixed in there (alpha) sees the model's window,
not every key (two calls, mixed: patching's _alpha_within_window); budget heads, which would keep
keys past it, are refused, as is what headops cannot compute (logit softcapping, chunked
attention). Several sequences that transformers packs into one row (position_ids
restarting within it) are attended each alone (packed_sequence_ids, the ops' sequence_ids).

And what the model's layers are: which have softmax attention (a hybrid model's linear-attention,
Mamba and MLP layers do not: attention_layer_indices, state_layers), the heads' dims (values of
their own dim in multi-head latent attention, dims per layer in Gemma 4: head_dims) and KV heads
(per layer in Gemma 4's larger models: kv_head_counts), which layers read another layer's keys
and values (Gemma 3n, Gemma 4's small models: kv_sources), and why a HeadSparseCache cannot hold a
model's keys (head_sparse_cache_refusal).
"""

from __future__ import annotations

import weakref

import torch

SLIDING = "sliding_attention"


def config_of(model_or_config):
    """The text config of a transformers model or config (a multimodal model's text_config)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "text_config", None) or cfg


def _per_layer_error():
    """transformers' error for reading one value of a per-layer config attribute (Gemma 4's
    head_dim), or a class nothing raises where this transformers has no per-layer configs."""
    try:
        from transformers.integrations.heterogeneity.configuration_utils import (
            AmbiguousGlobalPerLayerAttributeError)
    except ImportError:
        class AmbiguousGlobalPerLayerAttributeError(Exception):
            pass
    return AmbiguousGlobalPerLayerAttributeError


def uniform_attribute(cfg, name: str, default=None):
    """cfg's `name`, one value for every layer. A heterogeneous config (transformers' per-layer
    configs) that varies it raises a NotImplementedError naming the values: a HeadSpec takes head
    dims and KV heads per layer (head_dims, kv_head_counts: Gemma 4's full-attention layers differ
    in both from its sliding ones), one number of query heads for every layer."""
    try:
        return getattr(cfg, name, default)
    except _per_layer_error():
        values = sorted({getattr(layer, name, None) for layer in cfg.per_layer_config}, key=repr)
        raise NotImplementedError(f"headops: this model's layers differ in {name} ({values}, per layer in its "
                                  "config); a HeadSpec takes head dims and KV heads per layer, one value of the "
                                  "rest for every layer") from None


def _per_layer(cfg, layers, of):
    """of(cfg), or where transformers' per-layer configs make it differ between layers, a tuple of
    of(layer's config) for each of `layers` (an int again if those agree)."""
    try:
        return of(cfg)
    except _per_layer_error():
        per_layer = cfg.per_layer_config
        values = tuple(of(per_layer[i]) for i in layers)
        return values if len(set(values)) > 1 else values[0]


def head_dims(cfg, layers):
    """A head's output dim (the values': v_head_dim where the config names it, else head_dim, else
    hidden_size / heads) in each of `layers`: one int where every layer has it, else a tuple per
    layer (Gemma 4's full-attention layers' 512 beside its sliding layers' 256)."""
    return _per_layer(cfg, layers, lambda c: getattr(c, "v_head_dim", None) or getattr(c, "head_dim", None)
                      or c.hidden_size // c.num_attention_heads)


def kv_head_counts(cfg, layers):
    """The KV heads of each of `layers`: one int where every layer has as many, else a tuple per
    layer (Gemma 4 26B's full-attention layers' 2 beside its sliding layers' 8)."""
    return _per_layer(cfg, layers, lambda c: getattr(c, "num_key_value_heads", None) or c.num_attention_heads)


def encoder_decoder_layers(model_or_config):
    """(encoder layers, decoder layers) of an encoder-decoder model (BART, mBART, Marian, Pegasus,
    Whisper: config.is_encoder_decoder), None for another. Its spec has a layer for each attention
    module, in three stacks: the encoder's self-attention layers, the decoder's self-attention
    layers, then the decoder's cross-attention layers (layer_kinds). A NotImplementedError for one
    whose stacks differ in heads or that has no such fields (T5, whose relative position bias
    headops does not compute)."""
    cfg = config_of(model_or_config)
    if not getattr(cfg, "is_encoder_decoder", False):
        return None
    fields = ("encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads")
    values = [getattr(cfg, name, None) for name in fields]
    if any(not isinstance(v, int) for v in values):
        raise NotImplementedError(f"headops: {type(cfg).__name__} is an encoder-decoder config without "
                                  f"{', '.join(fields)}: supported are those of BART, mBART, Marian, Pegasus "
                                  "and Whisper (T5 adds a relative position bias, which headops does not compute)")
    if values[2] != values[3]:
        raise NotImplementedError(f"headops: the encoder has {values[2]} attention heads and the decoder "
                                  f"{values[3]}; a HeadSpec has one number of heads for every layer")
    return values[0], values[1]


ENCODER_DECODER_CACHE = (
    "headops.HeadSparseCache: an encoder-decoder model (BART, Whisper...) generates through transformers' "
    "EncoderDecoderCache (its cross-attention keys are computed once), which a patched model keeps; "
    "HeadSparseCache holds a decoder-only model's self-attention")


# layer types (transformers' config.layer_types) of layers without softmax attention: a hybrid
# model's Gated DeltaNet, Mamba or lightning-attention layers, LFM's convolutions, and Nemotron-H's
# MLP and MoE layers
WITHOUT_ATTENTION = ("linear_attention", "mamba", "conv", "mlp", "moe")
# layer types whose attention headops computes ("hybrid": attention beside a Mamba mixer, Falcon-H1)
COMPUTED_ATTENTION = ("full_attention", "sliding_attention", "hybrid")
# layer types of attention that headops does not compute, and what they are
UNCOMPUTED_ATTENTION = {
    "indexed_attention": "each query attends to the keys an indexer picks (DeepSeek V3.2's sparse attention)",
    "compressed_sparse_attention": "attention over compressed and selected keys (DeepSeek V4)",
    "heavily_compressed_attention": "attention over compressed keys (DeepSeek V4)",
}


def attention_layer_indices(model_or_config) -> list:
    """The indices of a decoder-only or encoder-only model's layers that have softmax attention, a
    spec's layers in order: every layer, except in a hybrid model (Qwen3-Next, Qwen3.5, OLMo
    hybrid, Jamba, Nemotron-H, MiniMax: config.layer_types naming linear-attention, Mamba, MLP or
    MoE layers), whose other layers headops leaves as they are."""
    cfg = config_of(model_or_config)
    L = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if not types:
        return list(range(L))
    return [i for i, kind in enumerate(list(types)[:L]) if kind not in WITHOUT_ATTENTION]


def is_hybrid(model_or_config) -> bool:
    """Whether some layers of a decoder-only model have no softmax attention (attention_layer_indices)."""
    cfg = config_of(model_or_config)
    return (encoder_decoder_layers(cfg) is None and isinstance(getattr(cfg, "num_hidden_layers", None), int)
            and len(attention_layer_indices(cfg)) != cfg.num_hidden_layers)


def state_layers(model_or_config) -> dict:
    """{model layer: transformers cache layer} for a hybrid model's layers without softmax attention:
    those transformers' DynamicCache makes there (a Gated DeltaNet's or Mamba's convolution and
    recurrent states; a placeholder for an MLP layer), fresh; {} for a model whose every layer
    attends."""
    if not is_hybrid(model_or_config):
        return {}
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

    cfg = config_of(model_or_config)
    attending = set(attention_layer_indices(cfg))
    types, options = get_layer_types_and_kwargs(cfg)
    return {layer: DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
            for layer, (kind, kwargs) in enumerate(zip(types, options)) if layer not in attending}


def mixer_beside_attention(model_or_config) -> dict:
    """{model layer: its mixer's number of convolution/recurrent states} for the layers that run
    attention and a Mamba mixer side by side (config.layer_types "hybrid": Falcon-H1), whose states
    share the layer's cache with the keys and values; {} for other models."""
    cfg = config_of(model_or_config)
    types = list(getattr(cfg, "layer_types", None) or ())
    if "hybrid" not in types and "hybrid_sliding" not in types:
        return {}
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, options = get_layer_types_and_kwargs(cfg)
    return {layer: kwargs.get("number_of_states", 1) for layer, (kind, kwargs) in enumerate(zip(kinds, options))
            if kind in ("hybrid", "hybrid_sliding")}


def layer_kinds(model_or_config, num_layers: int) -> list:
    """Per spec layer, (kind, index in its stack): ("self", i) for a decoder-only or encoder-only
    model (i: the model's layer, which in a hybrid model skips the layers without softmax
    attention); for an encoder-decoder one ("encoder", i), then ("decoder", i), then ("cross", i)."""
    stacks = encoder_decoder_layers(model_or_config) if model_or_config is not None else None
    if stacks is None:
        layers = attention_layer_indices(model_or_config) if model_or_config is not None else None
        return [("self", i) for i in (layers if layers is not None and len(layers) == num_layers
                                      else range(num_layers))]
    encoder, decoder = stacks
    return ([("encoder", i) for i in range(encoder)] + [("decoder", i) for i in range(decoder)]
            + [("cross", i) for i in range(decoder)])


def check_spec_in_cross_attention_layers(fail, spec, kinds) -> None:
    """A cross-attention layer's keys are the encoder's outputs, not positions before the query: a
    spec gives its heads no window or sinks (alpha there mixes two equal branches) and no cache
    kind but full; its gates, scales, key_bias over the encoder's positions, sink logits and
    output scale/bias hold. `fail(name, expected, got)` makes the error."""
    for layer, (kind, index) in enumerate(kinds):
        if kind != "cross":
            continue
        where = f"in layer {layer}, cross-attention layer {index} (its keys are the encoder's outputs)"
        if bool((spec.window[..., layer, :] >= 0).any()) or bool((spec.sinks[..., layer, :] > 0).any()):
            raise fail("window", f"-1 with sinks 0 {where}", f"window {spec.window[layer].tolist()}, sinks "
                                                                f"{spec.sinks[layer].tolist()}")
        if any(k != "full" for k in spec.cache_kind[layer]):
            raise fail("cache_kind", f"'full' {where}", list(spec.cache_kind[layer]))


def sliding_windows(model_or_config, num_layers: int) -> list:
    """Per layer, the model's sliding window (keys at distance < window are seen), None for a layer
    that sees every earlier key. Without layer_types in the config, config.sliding_window holds for
    every layer (Mistral, Starcoder2), unless use_sliding_window is False (Qwen2)."""
    if model_or_config is None:
        return [None] * num_layers
    cfg = config_of(model_or_config)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return [None] * num_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [int(window)] * num_layers
    types = list(types)
    if encoder_decoder_layers(cfg) is None and len(attention_layer_indices(cfg)) == num_layers:
        types = [types[i] for i in attention_layer_indices(cfg)]  # (a hybrid model's attention layers)
    return [int(window) if kind == SLIDING else None for kind in types[:num_layers]]


def refuse_what_headops_cannot_compute(caller, model_or_config) -> None:
    """A NotImplementedError for a model whose attention headops does not compute: logits soft-capped
    (Gemma 2's attn_logit_softcapping) or chunked (Llama 4's chunked_attention layers). (Values of
    another head dim than the keys', as multi-head latent attention's, are computed:
    headops.attention pads the narrower side.)"""
    cfg = config_of(model_or_config)
    if getattr(cfg, "attn_logit_softcapping", None):
        raise NotImplementedError(f"{caller}: this model soft-caps its attention logits (attn_logit_softcapping = "
                                  f"{cfg.attn_logit_softcapping}), which headops does not compute")
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if "chunked_attention" in kinds:
        raise NotImplementedError(f"{caller}: this model has chunked-attention layers, which headops does not "
                                  "compute")
    other = sorted(kinds - set(COMPUTED_ATTENTION) - set(WITHOUT_ATTENTION))
    if other:
        raise NotImplementedError(
            f"{caller}: this model has layers of type {', '.join(map(repr, other))} (config.layer_types)"
            + "".join(f"; {kind!r}: {UNCOMPUTED_ATTENTION[kind]}" for kind in other if kind in UNCOMPUTED_ATTENTION)
            + f"; headops computes the layer types {', '.join(COMPUTED_ATTENTION)} (beside layers without "
            "softmax attention, which it leaves as they are)")


def latent_attention(model_or_config) -> bool:
    """Whether the model's attention is multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash,
    MiniCPM3, Mistral 4...): each layer caches one latent per token (kv_lora_rank dims and a shared
    rotary key) and expands it into every head's keys and values before attending, the values of
    v_head_dim (which may differ from the keys' qk_nope_head_dim + qk_rope_head_dim)."""
    cfg = config_of(model_or_config)
    return getattr(cfg, "kv_lora_rank", None) is not None and getattr(cfg, "v_head_dim", None) is not None


LATENT_ATTENTION_CACHE = (
    "headops.HeadSparseCache: this model's attention is multi-head latent attention (DeepSeek V2/V3 and "
    "kin): its layers cache one latent per token, shared by every head, and expand it into the heads' keys "
    "and values at each step, so there are no per-head keys and values to keep or evict; a patched model "
    "generates through transformers' own cache (which holds the latents)")


HYBRID_CACHE = (
    "headops.HeadSparseCache: this model's hybrid layers run one transformer block shared by several layers "
    "beside their Mamba mixers (Zamba), not an attention of their own (HeadSparseCache holds Falcon-H1's "
    "hybrid layers, and hybrid models whose layers are one or the other)")


def kv_sources(model_or_config) -> dict:
    """{layer: the earlier layer whose keys and values it reads} where a model's last layers reuse
    earlier layers' (config.num_kv_shared_layers: Gemma 3n, Gemma 4's small models; transformers'
    kv_sharing_modes: each "reuse" layer reads the last "store" layer of its layer type); {} for
    every other model. Such a layer has no keys of its own: a HeadSparseCache gives it its source
    layer's storage, and a spec's constructors give it its source's cache rows."""
    if model_or_config is None:
        return {}
    cfg = config_of(model_or_config)
    modes = _kv_sharing_modes(cfg)
    if "reuse" not in modes:
        return {}
    types = list(cfg.layer_types)
    stores = {types[layer]: layer for layer, mode in enumerate(modes) if mode == "store"}
    return {layer: stores[types[layer]] for layer, mode in enumerate(modes) if mode == "reuse"
            and types[layer] in stores}


def _kv_sharing_modes(cfg) -> list:
    """transformers' kv_sharing_modes of a config (None, "store" or "reuse" per layer), [] without."""
    try:
        return list(getattr(cfg, "kv_sharing_modes", None) or ())
    except (AttributeError, TypeError, ValueError):  # (a config property that cannot lay them out)
        return []


SHARED_KV_CACHE = (
    "headops.HeadSparseCache: every layer of this model reuses another layer's keys and values "
    "(config.num_kv_shared_layers = num_hidden_layers), so no layer stores any; a patched model generates "
    "through transformers' cache")


def head_sparse_cache_refusal(model_or_config):
    """Why a HeadSparseCache cannot hold this model's keys and values (ENCODER_DECODER_CACHE,
    LATENT_ATTENTION_CACHE, HYBRID_CACHE), or None."""
    if encoder_decoder_layers(model_or_config) is not None:
        return ENCODER_DECODER_CACHE
    if latent_attention(model_or_config):
        return LATENT_ATTENTION_CACHE
    cfg = config_of(model_or_config)
    if mixer_beside_attention(cfg) and getattr(cfg, "model_type", "").startswith("zamba"):
        return HYBRID_CACHE
    if len(kv_sources(cfg)) < _kv_sharing_modes(cfg).count("reuse"):  # (a reuse layer without a source)
        return SHARED_KV_CACHE
    return None


def check_spec_in_sliding_layers(fail, spec, windows, *, cache: bool = False) -> None:
    """A spec's budget heads are refused in the model's sliding layers (they would keep keys past
    the window), and for a HeadSparseCache (`cache`) its alpha there too (its KV heads keep only
    the window, not the full branch's keys: the model's own cache, or none, takes alpha there);
    `fail(name, expected, got)` makes the error."""
    for layer, window in enumerate(windows):
        if window is None:
            continue
        if cache and spec.alpha is not None and bool((spec.alpha[..., layer, :] > 0).any()):
            raise fail("alpha", f"0 in layer {layer}, a sliding-window layer of the model (window {window}), for a "
                                "HeadSparseCache: its KV heads there keep only the window (alpha's full branch runs "
                                "without one, or through transformers' cache)", "alpha > 0")
        if "budget" in spec.cache_kind[layer]:
            raise fail("cache_kind", f"not 'budget' in layer {layer}, a sliding-window layer of the model (window "
                                     f"{window}): its heads keep their window", list(spec.cache_kind[layer]))


def capped_window(window: torch.Tensor, model_window: int) -> torch.Tensor:
    """Each head's window within the model's: -1 (unlimited) becomes it, larger ones are cut to it."""
    limit = torch.full_like(window, model_window)
    return torch.where(window < 0, limit, torch.minimum(window, limit))


# the last few reads: (what was read, weak references to the tensors it was read from, its value)
_recent_reads: list = []
_RECENT = 4  # (a forward reads a mask per kind of layer, full and sliding, and position_ids)


def read_once(what: str, tensors: tuple, read):
    """read(), or its value from a recent call with these same tensor objects (a forward's layers
    share them: one device-to-host read a forward for each)."""
    for name, refs, value in _recent_reads:
        if name == what and len(refs) == len(tensors) and all(
                (r() if r is not None else None) is t for r, t in zip(refs, tensors)):
            return value
    value = read()
    _recent_reads.insert(0, (what, tuple(weakref.ref(t) if t is not None else None for t in tensors), value))
    del _recent_reads[_RECENT:]
    return value


def packed_sequence_ids(position_ids, batch: int):
    """Where transformers packed several sequences into each row (position_ids restarting within it;
    it does so without an attention mask or a cache: a training batch from
    DataCollatorWithFlattening, and keeps them apart): each token's sequence as headops.attention's
    sequence_ids ([B, S] int64: a new sequence wherever a position does not follow the one before),
    or None where no row restarts. Eagerly one device-to-host read per position_ids tensor (all
    layers of a forward share it), a CPU tensor; while torch.compile traces (no branch on data),
    computed on position_ids' device for every forward, the op finding whether any row restarts."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return None

    def ids():
        restarts = (position_ids[:, 1:] - position_ids[:, :-1] != 1).to(torch.int64)
        return torch.nn.functional.pad(restarts.cumsum(-1), (1, 0)).expand(batch, -1)

    if torch.compiler.is_compiling():
        return ids()

    def read():
        found = ids()
        return found.cpu() if bool(found[:, -1].any()) else None

    return read_once(f"position_ids, batch {batch}", (position_ids,), read)


def sequence_ids_of_cu_seq_lens(caller, cu_seq_lens_q, cu_seq_lens_k, batch: int, length: int):
    """The sequences a caller packed into one row and marked with FlashAttention's variable-length
    arguments (``cu_seq_lens_q``/``_k``: DataCollatorWithFlattening(return_flash_attn_kwargs=True)),
    as headops.attention's sequence_ids ([1, length] int64 on the CPU). A NotImplementedError where
    they are not one row of self-attention over these `length` tokens. One read per pair of
    tensors (a forward's layers share them)."""
    def read():
        if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k.cpu(), cu_seq_lens_q.cpu()):
            raise NotImplementedError(f"{caller}: cu_seq_lens_q and cu_seq_lens_k differ (queries and keys packed "
                                      "apart); headops attends packed sequences to themselves only")
        return cu_seq_lens_q.flatten().tolist()

    bounds = read_once("cu_seq_lens", (cu_seq_lens_q, cu_seq_lens_k), read)
    if batch != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != length or \
            any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise NotImplementedError(f"{caller}: cu_seq_lens_q {bounds[:8]}{'...' if len(bounds) > 8 else ''} is not "
                                  f"the boundaries of sequences packed into one row of {length} tokens "
                                  f"(batch {batch}), which is what headops takes")
    lengths = torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
    return torch.arange(len(lengths)).repeat_interleave(lengths)[None]
