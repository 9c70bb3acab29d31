"""``headops.patch`` / ``headops.unpatch``: run a transformers model's attention through headops
with a per-layer, per-head ``HeadSpec`` (docs/DESIGN.md section 3).

patch() registers one attention function ("headops") in transformers' ``AttentionInterface``,
switches the model to it and gives every attention module its spec and layer. The function
reads the module's layer arguments from the spec, turns transformers' padding mask into a
key_bias (-inf on padded keys), and runs ``headops.attention`` -- or, when the model was given
a ``HeadSparseCache`` as its cache, that cache's attention (prefill, then one decode call per
step over every head's storage). ``set_spec`` swaps the spec without re-patching.

A model sharded by transformers' tensor parallelism (DESIGN section 8) is patched with the
whole-model spec too: each rank's modules get the spec sliced to the rank's heads
(headops._distributed), and probe statistics are gathered over the ranks, so a recording holds
every head of the model on every rank.
"""

from __future__ import annotations

import torch

from . import _distributed, _model_attention, _padding
from .attention import attention_with as _attention
from .spec import HeadSpec

__all__ = ["patch", "unpatch", "set_spec", "patched_spec", "attention_layers"]

IMPLEMENTATION = "headops"
_registered = False


def _headops_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  device=None, **kwargs):
    """transformers mask function for "headops": no S x S mask, only the key padding as a
    [B, 1, 1, positions] bool mask over every position so far; causality and windows are the
    kernel's. None without padding, unless the keys are not the positions 0 .. the last query's:
    - the model's cache dropped the first kv_offset keys (transformers' sliding-window cache layers
      keep only the window's): the mask, over every position, is longer than the keys;
    - a static cache (StaticCache, its sliding layers before they fill) hands over all its slots,
      those past the last query not written yet: the mask ends at the last query, shorter than
      the keys, and the attention function leaves the rest out (its queries are the last keys).
    While torch.compile traces, the mask whatever its values."""
    if kwargs.get("use_vmap"):  # (transformers' sign that it composed a mask function of the model's own)
        raise NotImplementedError("headops: the model builds a custom attention mask here (e.g. bidirectional image "
                                  "tokens or a prefix), which headops does not carry: it computes causal or "
                                  "bidirectional attention, with windows and padding")
    # a bidirectional mask (an encoder's, or cross-attention's over the encoder's outputs): every key
    bidirectional = "allow_is_bidirectional_skip" in kwargs
    if not bidirectional and isinstance(q_offset, torch.Tensor) and q_length < kv_offset + kv_length and \
            torch.compiler.is_compiling():
        return _static_cache_mask(batch_size, q_length, kv_length, q_offset, attention_mask, device)
    total = kv_offset + kv_length if bidirectional else _positions_so_far(q_length, kv_length, q_offset, kv_offset)
    if attention_mask is None and total == kv_length:
        if q_length > 1 and kwargs.get("allow_is_causal_skip") is False and not bidirectional:
            return _may_be_packed(batch_size, total, device)
        return None
    if attention_mask is None:
        return torch.ones(batch_size, 1, 1, total, dtype=torch.bool, device=device)
    from transformers.masking_utils import prepare_padding_mask

    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, :total].bool()
    if total == kv_length and not torch.compiler.is_compiling() and bool(padding.all()):
        return None
    return padding[:, None, None, :]


def _may_be_packed(batch_size, total, device):
    """The mask of a forward with no attention mask and no cache of transformers' in which
    transformers found several sequences packed into a row (position_ids restarting: it then
    stops skipping the causal mask, allow_is_causal_skip=False; a few families always do): all
    keys, marked, so the attention function reads position_ids for the sequences."""
    mask = torch.ones(batch_size, 1, 1, total, dtype=torch.bool, device=device)
    mask._headops_may_be_packed = True
    return mask


def _positions_so_far(q_length, kv_length, q_offset, kv_offset) -> int:
    """The positions up to the last query: kv_offset + kv_length, except where the cache's keys run
    past the last query (a static layer's slots not written yet; kv_offset is then 0): one read
    of a static layer's offset, kept on the device (while torch.compile traces,
    _static_cache_mask instead)."""
    total = kv_offset + kv_length
    if q_length >= total:
        return total
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    return min(total, q_offset + q_length)


def _static_cache_mask(batch_size, q_length, kv_length, q_offset, attention_mask, device):
    """While torch.compile traces a static cache layer (its offset a tensor, which the graph does
    not read): the mask over all its slots, those not written yet masked, carrying where the keys
    end (``_headops_key_end``, a tensor) for the op's key_lengths."""
    end = q_offset.to(device) + q_length
    mask = (torch.arange(kv_length, device=device) < end).expand(batch_size, kv_length)
    if attention_mask is not None:
        from transformers.masking_utils import prepare_padding_mask

        mask = mask & prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length].bool()
    mask = mask[:, None, None, :]
    mask._headops_key_end = end
    return mask


def _headops_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q, k, v in [B, H, S, D]; returns ([B, S, Hq, D], None)."""
    spec = getattr(module, "_headops_spec", None)
    if spec is None:
        raise RuntimeError("headops: this attention module was not patched by headops.patch (no spec)")
    layer = module._headops_layer
    if query.shape[1] != spec.num_heads:
        raise RuntimeError(f"headops: layer {layer}'s attention got {query.shape[1]} query heads, its spec has "
                           f"{spec.num_heads}: the model was sharded or changed after headops.patch (patch it again)")
    cache = kwargs.get("headops_cache")
    if cache is None:
        # (an attention that does not get the kwargs the cache's update saw, or a layer reading
        # another's keys, gets the keys as the cache returned them)
        from .cache import HeadSparseCache, keys_may_be_handed_out

        if keys_may_be_handed_out():
            cache = HeadSparseCache.of_keys(key)
    if cache is not None:
        cache.reached(layer)
    if cache is not None and getattr(module, "_headops_cache_refused", None):
        raise NotImplementedError(module._headops_cache_refused)
    recording = getattr(module, "_headops_recording", None)
    causal = bool(kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True))
    sequence_ids = None  # sequences packed into a row: each attended alone
    may_be_packed = getattr(attention_mask, "_headops_may_be_packed", False)
    if may_be_packed:
        attention_mask = None
    if kwargs.get("cu_seq_lens_q") is not None:  # (FlashAttention's form of packing: the caller's word)
        if cache is not None or attention_mask is not None or key.shape[2] != query.shape[2]:
            raise NotImplementedError(f"headops (layer {layer}): cu_seq_lens_q (packed sequences) with a cache or an "
                                      "attention mask; headops takes them for one row of self-attention")
        sequence_ids = _model_attention.sequence_ids_of_cu_seq_lens(
            f"headops (layer {layer})", kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k"), query.shape[0],
            query.shape[2])
    elif may_be_packed and cache is None:
        sequence_ids = _model_attention.packed_sequence_ids(kwargs.get("position_ids"), query.shape[0])
    _padding.refuse_other_masks(f"headops (layer {layer})", attention_mask, causal, kwargs.get("sliding_window"))
    padding = _padding.of_mask(attention_mask)  # None: no key is padding
    # a static cache's slots past the last query, not written yet (_headops_mask): the mask ends
    # there, or (traced) says where; the keys end there
    key_lengths = getattr(attention_mask, "_headops_key_end", None)
    if key_lengths is not None:
        key_lengths = key_lengths.reshape(1).expand(query.shape[0])
    elif cache is None and attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:
        if module._headops_hybrid:  # (a static cache's unwritten slots are a whole-attention model's)
            raise NotImplementedError(
                f"headops (layer {layer}): the model's mask covers {attention_mask.shape[-1]} positions, its keys "
                f"{key.shape[2]}: its cache sized the mask by another layer (transformers' MiniMax cache, whose first "
                "layer is a linear-attention layer, in a padded batch's decode steps); headops cannot tell which keys "
                "are padding there")
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    # keys the model's own cache dropped before these (a sliding-window layer's keeps the window's):
    # the mask covers every position so far (_headops_mask), the keys are the last ones
    dropped = 0 if cache is not None or attention_mask is None else attention_mask.shape[-1] - key.shape[2]
    # key_bias is indexed by position: a row's from its first token (with a cache, those it holds)
    keys = cache.keys_of_call(layer, key.shape[2]) if cache is not None else key.shape[2] + dropped
    args = spec.layer_args(layer, keys, visibility=cache is None)  # (a cache has its own window and sinks)
    if spec.softmax_scale is None and scaling is not None:
        args["softmax_scale"] = float(scaling)
    model_window = _keep_model_attention(layer, args, cache, dropout, kwargs)
    if dropped > 0 and model_window is None:  # (only a sliding window lets a model's cache drop keys)
        raise RuntimeError(
            f"headops (layer {layer}): the mask covers {attention_mask.shape[-1]} positions but the layer got "
            f"{key.shape[2]} keys, and it has no sliding window that would have dropped the others"
            + (": it reads another layer's keys (num_kv_shared_layers), which came without the "
               "headops.HeadSparseCache that holds them" if getattr(module, "_headops_reads_kv", False) else ""))
    # a cache holds a left-padded batch without its padding; otherwise the padding is masked by key_bias
    cache_args = None if padding is None or cache is None else _cache_padding(cache, layer, padding, key.shape[2])
    if cache is None and (padding is not None or dropped):
        first = padding.first if padding is not None else torch.zeros(key.shape[0], dtype=torch.int64)
        _check_dropped(layer, dropped, first, module._headops_has_sinks, recording)
        args = _padding.from_first_token(args, first, dropped)
    if padding is not None and cache_args is None:
        bias = _padding.padding_bias(padding.valid[:, dropped:])
        args["key_bias"] = bias if "key_bias" not in args else args["key_bias"] + bias
    cache_args = cache_args or {}
    if key_lengths is not None and recording is not None:
        raise NotImplementedError(f"headops (layer {layer}): probes through a static cache traced by torch.compile; "
                                  "probe uncompiled")
    if sequence_ids is not None and recording is not None and torch.compiler.is_compiling():
        raise NotImplementedError(f"headops (layer {layer}): probes over sequences packed into one row while "
                                  "torch.compile traces (which marks any row with position_ids as packed); probe "
                                  "uncompiled")
    if cache is not None:
        if recording is None:
            out = cache.attention(layer, query, key, value, layout="bhsd", causal=causal, **cache_args, **args)
        else:
            out, stats = cache.attention(layer, query, key, value, layout="bhsd", causal=causal,
                                         probe=recording.probe, **cache_args, **args)
            recording.record(layer, _distributed.gather_probe(stats, module._headops_shard))
    elif recording is not None:  # (with alpha refused by the probe: no full branch)
        out, stats = _attention(query, key, value, layout="bhsd", causal=causal, probe=recording.probe,
                                sequence_ids=sequence_ids, device_values=False, **args)
        recording.record(layer, _distributed.gather_probe(stats, module._headops_shard))
    else:
        out = _attend(query, key, value, args, causal, model_window, sequence_ids, key_lengths)
    return out.transpose(1, 2), None


def _attend(query, key, value, args, causal, model_window, sequence_ids=None, key_lengths=None):
    """headops.attention over [B, H, S, D] with the layer's arguments (and the sequences packed
    into its rows, each alone, or where its keys end); in a layer the model limits to a sliding
    window, a head's alpha mixes in a full branch limited to that window too
    (_alpha_within_window). The spec's values were checked by patch/set_spec: nothing on the GPU
    is read again (no sync)."""
    for name, given in (("sequence_ids", sequence_ids), ("key_lengths", key_lengths)):
        if given is not None:
            args = dict(args, **{name: given})
    if model_window is not None and args.get("alpha") is not None:
        return _alpha_within_window(query, key, value, args, causal, model_window)
    return _attention(query, key, value, layout="bhsd", causal=causal, device_values=False, **args)


def _alpha_within_window(query, key, value, args, causal, model_window):
    """DuoAttention's mix, out = alpha * full + (1 - alpha) * streaming, then the epilogue (out_scale,
    out_bias, gate), where the model's sliding window bounds the full branch: the kernels' full
    branch sees every key, so the two branches run as two calls (the streaming one with the
    head's window and sinks, the full one with the model's window and no sinks; the same logits),
    mixed and finished here in float (as the kernels do in their accumulators), rounded once. A
    branch whose weight is exactly 0 passes no NaN or inf of its own (the kernels skip it) but its
    gradient to alpha, as the reference does."""
    epilogue = ("alpha", "gate", "out_scale", "out_bias")
    branch = {name: t for name, t in args.items() if name not in epilogue}
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    streaming = _attention(query, key, value, layout="bhsd", causal=causal, device_values=False, **branch).to(acc)
    full_args = dict(branch, window=torch.full_like(branch["window"], model_window),
                     sinks=torch.zeros_like(branch["sinks"]))
    full = _attention(query, key, value, layout="bhsd", causal=causal, device_values=False, **full_args).to(acc)

    def per_head(t):  # [Hq] or [B, Hq] -> [B or 1, Hq, 1, 1] on the outputs' device
        t = t.to(device=query.device, dtype=acc)
        return (t if t.dim() == 2 else t[None])[:, :, None, None]

    def unless_weight_zero(x, weight):
        return torch.where(weight == 0, x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), x)

    a = per_head(args["alpha"])
    out = a * unless_weight_zero(full, a) + (1 - a) * unless_weight_zero(streaming, 1 - a)
    for name in ("out_scale", "out_bias"):  # [Hq, D] or [B, Hq, D]
        if args.get(name) is not None:
            t = args[name].to(device=query.device, dtype=acc)
            t = (t if t.dim() == 3 else t[None])[:, :, None, :]
            out = out * t if name == "out_scale" else out + t
    if args.get("gate") is not None:
        g = per_head(args["gate"])
        out = unless_weight_zero(out, g) * g
    return out.to(query.dtype)


# what some families pass to their attention function that changes it and headops does not compute:
# logit softcapping, T5's relative position bias, sink tensors of other forms than GPT-OSS's s_aux,
# block-sparse indices (packed sequences' cu_seq_lens are taken: sequence_ids)
_NOT_COMPUTED = ("softcap", "position_bias", "sinks", "block_indices", "indices")  # (indices: sparse attention's)


def _keep_model_attention(layer, args, cache, dropout, kwargs):
    """The model's own limits on this layer's attention (headops._model_attention): its sliding
    window caps each head's window (a cache's windows were capped when it was made from the model:
    checked here), and what headops does not compute is refused: the arguments above, attention
    weights asked for, attention dropout. Returns the model's window for a call without a cache
    (None elsewhere): alpha's full branch keeps within it (_attend)."""
    caller = f"headops (layer {layer})"
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            f"{caller}: output_attentions=True asks for the S x S attention weights, which headops never forms "
            "(transformers would return an empty tuple); per-head statistics of the pattern (span, sink and "
            "distance masses, top-k keys, entropy, per-key mass) come from `with headops.probe(model, ...) as rec: "
            "model(...)`; for the weights themselves, headops.unpatch(model) and the eager implementation")
    if dropout:
        raise NotImplementedError(f"{caller}: the model trains with attention dropout {dropout}, which headops does "
                                  "not apply; set the model config's attention_dropout to 0 (or model.eval())")
    for name in _NOT_COMPUTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{caller}: the model's attention passes {name}, which headops does not "
                                      "compute")
    model_sinks = kwargs.get("s_aux")  # GPT-OSS's learnt per-head sink logits: headops' sink_logit
    if model_sinks is not None:
        spec_sinks = args.get("sink_logit")  # (both: two terms of the denominator, one logit)
        args["sink_logit"] = model_sinks if spec_sinks is None else torch.logaddexp(
            spec_sinks.to(model_sinks.device, torch.float32), model_sinks.float())
    window = kwargs.get("sliding_window")
    if not window:
        return None
    if cache is None:
        args["window"] = _model_attention.capped_window(args["window"], int(window))
        return int(window)
    held = cache.windows(layer)
    if any(w < 0 or w > window for w in held):
        raise ValueError(f"{caller}: the model attends to a sliding window of {window} keys here, but the "
                         f"HeadSparseCache's windows for this layer are {held}: make it from the model, "
                         "HeadSparseCache(model, spec), which caps them")


def _check_dropped(layer, dropped, first, has_sinks: bool, recording):
    """Refuses what needs keys the model's cache dropped (its sliding-window layer keeps the last
    window's): a row's sinks (the spec's, `has_sinks`, where a row's first token was dropped;
    while torch.compile traces, which cannot read the rows' padding: wherever the spec has sinks
    there), and probe statistics (their positions)."""
    if not dropped:
        return
    caller = f"headops (layer {layer})"
    if has_sinks and (torch.compiler.is_compiling() or bool((first < dropped).any())):
        raise NotImplementedError(f"{caller}: the model's cache keeps only its sliding window's keys here, and the "
                                  "spec's sinks are first tokens it dropped: generate through "
                                  "headops.HeadSparseCache(model, spec), which keeps them")
    if recording is not None:
        raise NotImplementedError(f"{caller}: the model's cache keeps only its sliding window's keys here; probe "
                                  "without a cache (use_cache=False) or through headops.HeadSparseCache(model, spec)")


def _cache_padding(cache, layer, padding, new_tokens):
    """The cache's arguments for a padded batch: a prompt padded on the left is given as each row's
    tokens (``lengths``, ``padding_side="left"``), and the decode steps after it need no mask (the
    cache holds no padding). None where the mask pads no row on the left and the cache holds no
    padding: a key_bias then masks the keys by position (the cache's positions are the mask's)."""
    caller = "headops (attention with a HeadSparseCache)"
    if cache.longest_row(layer) == 0:  # the prompt
        if not bool(padding.first.any()):
            return None
        pads = _padding.pads_before_first_tokens(caller, padding)
        return {"lengths": [new_tokens - p for p in pads], "padding_side": "left"}
    held = cache.left_padding(layer)
    if not any(held):
        return None
    pads = _padding.pads_before_first_tokens(caller, padding)
    if pads != held:
        raise NotImplementedError(f"{caller}: the attention mask pads the rows by {pads} tokens on the left, where the "
                                  f"prompt was padded by {held}")
    return {}


# (Llama-likes, Phi-3, GPT-2, BERT and ViT, GPT-NeoX, DistilBERT, ModernBERT)
_PROJECTIONS = ("q_proj", "qkv_proj", "c_attn", "query", "query_key_value", "q_lin", "Wqkv")


def _attention_modules(model):
    """The attention modules in the order of a spec's layers: by layer_idx (modules with a
    layer_idx and projections; in a hybrid model those of its softmax-attention layers), or in
    module order in an encoder whose modules have none (ViT, DeiT, DINOv2, DistilBERT, ESM: no
    cache, so no layer_idx); for an encoder-decoder model the encoder's (in module order: some
    have no layer_idx), the decoder's self-attention, then its cross-attention modules (not
    causal), as _model_attention.layer_kinds lays them out."""
    if not isinstance(model, torch.nn.Module) or _model_attention.encoder_decoder_layers(model) is None:
        found, without_index = [], []
        for _, m in _language_model(model).named_modules():
            if any(hasattr(m, p) for p in _PROJECTIONS):
                (found if isinstance(getattr(m, "layer_idx", None), int) else without_index).append(m)
        if not found and without_index and all(getattr(m, "is_causal", None) is False for m in without_index):
            return without_index  # (an encoder's: bidirectional, in module order)
        if isinstance(model, torch.nn.Module) and _model_attention.is_hybrid(model):
            # (a hybrid model's linear-attention layers may name their projections as attention's)
            layers = set(_model_attention.attention_layer_indices(model))
            found = [m for m in found if m.layer_idx in layers]
        return sorted(found, key=lambda m: m.layer_idx)
    in_encoder = {id(m) for m in model.get_encoder().modules()}
    stacks = {"encoder": [], "decoder": [], "cross": []}
    for _, m in model.named_modules():
        if any(hasattr(m, p) for p in _PROJECTIONS) and hasattr(m, "is_causal"):
            kind = "encoder" if id(m) in in_encoder else "decoder" if m.is_causal else "cross"
            stacks[kind].append(m)
    return stacks["encoder"] + stacks["decoder"] + stacks["cross"]


def _language_model(model):
    """The module holding a model's text attention: a multimodal model's language model (Gemma 3,
    3n and 4 as AutoModelForCausalLM loads them: their vision and audio towers have attention
    modules of their own, which headops leaves as they are), else the model."""
    text = _model_attention.config_of(model)
    if not isinstance(model, torch.nn.Module) or text is getattr(model, "config", None):
        return model
    return next((m for m in model.modules() if getattr(m, "config", None) is text), model)


def text_attention_implementation(model) -> str:
    """The attention implementation of the model's text layers (a multimodal model's text config's)."""
    return _model_attention.config_of(model)._attn_implementation


def set_text_attention_implementation(model, implementation) -> None:
    """Sets the attention implementation of the model's text layers only: a multimodal model's
    vision and audio towers keep theirs (transformers' per-sub-config form)."""
    text, top = _model_attention.config_of(model), model.config
    key = next((k for k in getattr(top, "sub_configs", {}) if getattr(top, k, None) is text), None)
    model.set_attn_implementation(implementation if text is top or key is None else {key: implementation})


def attention_modules_of_patched(model, caller):
    """The attention modules of a model patched by headops.patch (a RuntimeError otherwise)."""
    if not hasattr(model, "_headops_previous"):
        raise RuntimeError(f"{caller}: the model is not patched (call headops.patch first)")
    return _attention_modules(model)


def _dispatches_through_attention_interface(model, modules) -> bool:
    """Whether the attention modules' code calls transformers' attention functions by name: most
    families do; a few (Falcon, Bloom, MPT, DeBERTa-v2 in transformers 5) compute attention
    themselves. Asked of the modules' own code (the model's where none was found), so a wrapper
    around the model (a PEFT model) answers as the model it wraps."""
    import sys

    code = {sys.modules.get(type(m).__module__) for m in modules or [model]}
    return all(c is not None and "ALL_ATTENTION_FUNCTIONS" in vars(c) for c in code)


def patch(model, spec: HeadSpec):
    """Runs `model`'s attention through headops with `spec` (returns the model). A module whose
    parameters live on another device than the spec's tensors gets ``spec.to(that device)``; a
    rank of a tensor-parallel model gets the spec's slice of its own heads (`spec` is always the
    whole model's)."""
    global _registered
    from transformers import AttentionInterface

    if not isinstance(spec, HeadSpec):
        raise TypeError(f"headops.patch: spec must be a headops.HeadSpec, got {type(spec).__name__}")
    _model_attention.refuse_what_headops_cannot_compute("headops.patch", model)
    spec.validate(model)
    modules = _attention_modules(model)
    if not _dispatches_through_attention_interface(model, modules):
        raise NotImplementedError(
            f"headops.patch: {type(model).__name__} computes its attention in its own code, not through "
            "transformers' AttentionInterface, so headops cannot take it over (supported: the families that "
            "dispatch through it, e.g. Llama, Mistral, Qwen2/3, GPT-2, BERT; docs/DESIGN.md section 3)")
    if len(modules) != spec.num_layers:
        raise NotImplementedError(f"headops.patch: found {len(modules)} attention modules in {type(model).__name__} "
                                  "(by layer_idx, or in module order in an encoder whose modules have none), expected "
                                  f"{spec.num_layers}, one a layer; this model family is not supported yet")
    if _model_attention.encoder_decoder_layers(model) is None and all(
            isinstance(getattr(m, "layer_idx", None), int) for m in modules):
        layers = [kind[1] for kind in attention_layers(model)]
        if [m.layer_idx for m in modules] != layers:
            raise NotImplementedError(
                f"headops.patch: {type(model).__name__}'s attention modules are in layers "
                f"{[m.layer_idx for m in modules]}, its config's softmax-attention layers are {layers} "
                "(config.layer_types); this model family is not supported yet")
    shard = _distributed.head_shard(model, "headops.patch")
    local = spec if shard is None else shard.local_spec(spec)
    if not _registered:
        from transformers import AttentionMaskInterface

        AttentionInterface.register(IMPLEMENTATION, _headops_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, _headops_mask)
        _registered = True
    if not hasattr(model, "_headops_previous"):
        model._headops_previous = text_attention_implementation(model)
    model._headops_whole_spec, model._headops_shard = spec, shard
    _give_spec(modules, local)
    cache_refused = _model_attention.head_sparse_cache_refusal(model)
    hybrid = _model_attention.is_hybrid(model)
    reading = _model_attention.kv_sources(model)
    for layer, m in enumerate(modules):
        m._headops_layer = layer
        m._headops_shard = shard
        m._headops_cache_refused = cache_refused
        m._headops_hybrid = hybrid
        m._headops_reads_kv = layer in reading  # (its keys: another layer's, handed on by the model)
    set_text_attention_implementation(model, IMPLEMENTATION)
    return model


def attention_layers(model) -> list:
    """What each layer of a spec for `model` is: (kind, index in its stack) per layer, ("self", i)
    for a decoder-only or encoder-only model (i the model's layer: a hybrid model's spec has only
    its softmax-attention layers); for an encoder-decoder model (BART, Marian, Whisper)
    its encoder's self-attention layers ("encoder", i), then its decoder's ("decoder", i), then its
    cross-attention layers ("cross", i)."""
    from .spec import _shape_of

    return _model_attention.layer_kinds(model, _shape_of(model)[0])


def patched_spec(model) -> HeadSpec:
    """The whole-model spec a patched model runs with (the last one given to patch or set_spec)."""
    if not hasattr(model, "_headops_previous"):
        raise RuntimeError("headops.patched_spec: the model is not patched (call headops.patch first)")
    return model._headops_whole_spec


def _give_spec(modules, spec: HeadSpec):
    """Each module gets the spec on the device of its parameters (a model may span devices):
    the spec itself where its tensors are there already (a gate that requires grad stays the
    leaf it was), else ``spec.to(device)`` (on a GPU its planning fields stay on the host:
    HeadSpec.to)."""
    on_device = {}
    for layer, m in enumerate(modules):
        # read here, once, so that a traced forward need not branch on the spec's values (_check_dropped)
        m._headops_has_sinks = bool((spec.sinks[..., layer, :] > 0).any())
        device = next((p.device for p in m.parameters()), None)
        if device is None or spec.is_on(device):
            m._headops_spec = spec
            continue
        if device not in on_device:
            on_device[device] = spec.to(device)
        m._headops_spec = on_device[device]


def set_spec(model, spec: HeadSpec):
    """Replaces the spec of a patched model (no re-patching; e.g. new per-batch gates). `spec` is
    the whole model's, on a tensor-parallel rank too."""
    if not hasattr(model, "_headops_previous"):
        raise RuntimeError("headops.set_spec: the model is not patched (call headops.patch first)")
    if not isinstance(spec, HeadSpec):
        raise TypeError(f"headops.set_spec: spec must be a headops.HeadSpec, got {type(spec).__name__}")
    spec.validate(model)
    shard = model._headops_shard
    local = spec if shard is None else shard.local_spec(spec)
    model._headops_whole_spec = spec
    _give_spec(_attention_modules(model), local)


def unpatch(model):
    """Restores the model's own attention implementation and removes what patch() added."""
    if not hasattr(model, "_headops_previous"):
        raise RuntimeError("headops.unpatch: the model is not patched")
    previous = model._headops_previous
    for m in _attention_modules(model):
        for name in ("_headops_spec", "_headops_layer", "_headops_shard", "_headops_cache_refused", "_headops_hybrid",
                     "_headops_has_sinks", "_headops_reads_kv"):
            if hasattr(m, name):
                delattr(m, name)
    set_text_attention_implementation(model, previous)
    del model._headops_previous, model._headops_whole_spec, model._headops_shard
    return model
