"""``headops.HeadSpec``: what every head of every layer of a model does (docs/DESIGN.md section 3).

A spec holds, per layer and query head, the per-head arguments of ``headops.attention`` (gate,
softmax_scale, window, sinks, alpha, sink_logit, out_scale, out_bias) and, per layer and KV head,
what a ``HeadSparseCache`` keeps (kind and budget). Gates may be per batch row (``[B, L, Hq]``)
to evaluate several head coalitions in one batch, and so may alpha (``[B, L, Hq]``: one
DuoAttention ablation per row). Constructors read like the papers::

    HeadSpec.dense(model)                                  # every head full, nothing changed
    HeadSpec.dense(model).mask_heads({3: [0, 5]})          # Michel et al.: heads switched off
    HeadSpec.from_duo_attention(model, "full_attention_heads.tsv", sinks=128, window=256)
    HeadSpec.from_scores(model, scores, full_fraction=0.25, window=256, sinks=16)  # headops.discover
    HeadSpec.streaming(model, {0: [1, 2]}, window=1024, sinks=4)   # chosen KV heads streaming
    HeadSpec.streaming_llm(model, window=1024, sinks=4)    # StreamingLLM: every KV head streaming
    HeadSpec.razor(model, {0: [1]}, window=1024, sinks=4)  # RazorAttention: others compensated streaming
    HeadSpec.budget(model, {0: [1]}, budget=512)           # KV heads keeping at most 512 tokens
    HeadSpec.budget(model, budget=128, allocation="adakv", alpha=0.2)   # AdaKV over every KV head
    HeadSpec.headkv(model, scores, budget=128, beta=1.2)   # HeadKV: static budgets from head scores
    HeadSpec.pyramid(model, budget=128, beta=20)           # PyramidKV: budgets falling layer by layer

and a spec moves and splits like its tensors::

    spec.to("cuda")                                        # every tensor field there (a new spec)
    spec.slice_heads(range(0, 8))                          # query heads 0-7 and their KV heads

``HeadSparseCache(model, spec)`` makes the cache that keeps what a spec's heads can see.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import torch

from ._args import (check_attention_shape, check_cache_options, check_compensation, check_values, fail, is_int,
                    of_layer)
from ._model_attention import (attention_layer_indices, check_spec_in_cross_attention_layers,
                               check_spec_in_sliding_layers, config_of, encoder_decoder_layers, layer_kinds,
                               head_dims, kv_head_counts, kv_sources, sliding_windows, uniform_attribute)

__all__ = ["HeadSpec"]

CALLER = "headops.HeadSpec"
_FLOAT_FIELDS = ("gate", "softmax_scale", "alpha", "sink_logit", "out_scale", "out_bias", "key_bias")
# fields with a query-head axis: dim 1 ([L, Hq, ...]), except the per-batch ones' last dim ([L, Hq] or [B, L, Hq])
_PER_QUERY_HEAD = _FLOAT_FIELDS + ("window", "sinks")
# fields that may be given per batch row, [B, L, Hq]: head-masking coalitions (gate), DuoAttention
# ablations (alpha), evaluated as one batch
_PER_BATCH = ("gate", "alpha")
# fields that decide the CUDA forward's work list (headops._args.PLANNING_ARGS): on a CUDA device a
# spec keeps them on the host, so a call reads them without a device-to-host sync -- window and
# sinks always, gate and alpha unless they require grad (their gradient is computed on the device)
_HOST_PLANNING = ("window", "sinks", "gate", "alpha")


def placement(name: str, t: torch.Tensor, device: torch.device) -> torch.device:
    """Where ``HeadSpec.to(device)`` puts field `name` (tensor `t`): `device`, except the planning
    fields of a spec for a CUDA device, which stay on (or come back to) the CPU."""
    if device.type == "cuda" and name in _HOST_PLANNING and not t.requires_grad:
        return torch.device("cpu")
    return device


def _fail(name, expected, got):
    return fail(CALLER, name, expected, got)


def _shape_of(model_or_config):
    """(layers, query heads, KV heads, head dim) from a transformers model or config; the head dim
    is a head's output's, the values' (v_head_dim where a config names it: multi-head latent
    attention's keys have another, and its head_dim names the rotary part); KV heads and head dim
    are tuples of one per layer where the layers differ (Gemma 4)."""
    cfg = config_of(model_or_config)
    stacks = encoder_decoder_layers(cfg)
    if stacks is not None:  # a layer per attention module: encoder, decoder, cross (layer_kinds)
        Hq = cfg.encoder_attention_heads
        return stacks[0] + 2 * stacks[1], Hq, Hq, getattr(cfg, "head_dim", None) or cfg.d_model // Hq
    try:
        layers = attention_layer_indices(cfg)  # (a hybrid model: its softmax-attention layers)
        Hq = uniform_attribute(cfg, "num_attention_heads")
        Hkv = kv_head_counts(cfg, layers)  # (Hkv and D per layer where the layers differ: Gemma 4)
        D = head_dims(cfg, layers)
        L = len(layers)
    except (AttributeError, TypeError, ZeroDivisionError):
        raise TypeError(f"headops.HeadSpec: cannot read the attention shape of model_or_config (a "
                        f"{type(model_or_config).__name__}; expected a transformers model or config with "
                        "num_hidden_layers, num_attention_heads and head_dim or hidden_size)") from None
    return L, Hq, Hkv, D


def _budget_options(allocation, *, alpha=None, observation_window=None, pool_kernel=None, pooling=None,
                    keep_observation_window=None) -> dict:
    """A budget method's cache options (those left at None are the cache's defaults)."""
    options = {"allocation": allocation, "adakv_alpha": alpha, "observation_window": observation_window,
               "pool_kernel": pool_kernel, "pooling": pooling, "keep_observation_window": keep_observation_window}
    return {name: value for name, value in options.items() if value is not None}


def _check_heads(heads, what):
    """{layer: [head indices]} with the head lists as lists of ints (the caller checks the ranges)."""
    if not isinstance(heads, dict):
        raise TypeError(f"headops.HeadSpec: heads must be a dict {{layer: [{what} head indices]}}, got "
                        f"{type(heads).__name__}")
    out = {}
    for layer, hs in heads.items():
        if isinstance(hs, (str, bytes, dict)) or not hasattr(hs, "__iter__") or (
                isinstance(hs, torch.Tensor) and hs.dim() != 1):
            raise TypeError(f"headops.HeadSpec: heads must map each layer to a list of {what} head indices, got "
                            f"{hs!r} for layer {layer!r}")
        out[layer] = hs.tolist() if isinstance(hs, torch.Tensor) else list(hs)
        for h in out[layer]:
            if not is_int(h):
                raise TypeError(f"headops.HeadSpec: heads must hold int {what} head indices, got {h!r}")
    return out


@dataclasses.dataclass(eq=False, repr=False)
class HeadSpec:
    """Per-layer, per-head behaviour of a model's attention (see the module docstring).

    Fields (tensors, or None where the default applies to every head):
      gate, alpha ``[L, Hq]`` or ``[B, L, Hq]``; softmax_scale, sink_logit ``[L, Hq]``;
      window, sinks ``[L, Hq]`` int64 (window < 0 unlimited; None: unlimited, no sinks);
      out_scale, out_bias ``[L, Hq, D]``, D = head_dim, a head's output's (the values' head dim:
      multi-head latent attention's keys have another); where the layers' heads differ in dim
      (Gemma 4), head_dim is a tuple of one per layer, D = ``out_dim`` is the largest, and layer
      l reads the first head_dim[l] entries of each head's row (the rest are not read: their
      gradient is 0);
      key_bias ``[L, Hq, K]``: added to the logits of the first K key positions (sink tokens:
      ZeroTuning, attention calibration), 0 beyond;
      num_kv_heads: an int, or where the layers differ in KV heads (Gemma 4's larger models) a tuple
      of one per layer (``kv_heads(layer)``), and the ``[L][Hkv]`` lists below have each layer's;
      cache_kind ``[L][Hkv]`` of "full" / "streaming" / "budget" (None: all full); cache_budget
      ``[L][Hkv]`` (None where not a budget head); cache_compensation ``[L][Hkv]`` of None /
      "weighted" / "unweighted" (streaming heads only: RazorAttention's compensation token);
      cache_options: a dict of HeadSparseCache options the spec's method needs (prefill,
      allocation, adakv_alpha, observation_window, pool_kernel, pooling, keep_observation_window;
      docs/cache.md), the defaults for
      ``HeadSparseCache(model, spec)`` (its keywords override them).

    A spec is checked when it is made and by ``validate()``; fields may be set in between (e.g.
    a gate that requires grad), ``validate()`` (and ``headops.patch``) checks them again.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int | tuple
    head_dim: int | tuple
    gate: torch.Tensor | None = None
    softmax_scale: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    sink_logit: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    window: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    cache_kind: list | None = None
    cache_budget: list | None = None
    cache_compensation: list | None = None
    cache_options: dict | None = None

    def __post_init__(self):
        check_attention_shape(CALLER, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim,
                              per_layer=True)
        L, Hq = self.num_layers, self.num_heads
        if self.window is None:
            self.window = torch.full((L, Hq), -1, dtype=torch.int64)
        if self.sinks is None:
            self.sinks = torch.zeros(L, Hq, dtype=torch.int64)
        if self.cache_kind is None:
            self.cache_kind = [["full"] * self.kv_heads(layer) for layer in range(L)]
        if self.cache_budget is None:
            self.cache_budget = [[None] * self.kv_heads(layer) for layer in range(L)]
        if self.cache_compensation is None:
            self.cache_compensation = [[None] * self.kv_heads(layer) for layer in range(L)]
        if self.cache_options is None:
            self.cache_options = {}
        self.validate()

    # ------------------------------------------------------------------------ constructors

    @classmethod
    def dense(cls, model_or_config) -> "HeadSpec":
        """Every head full attention, unchanged: a patched model gives the unpatched logits."""
        return cls(*_shape_of(model_or_config))

    def copy(self) -> "HeadSpec":
        return copy.deepcopy(self)

    def mask_heads(self, heads: dict) -> "HeadSpec":
        """A copy with the given heads' gates at 0 ({layer: [query heads]}); gated heads cost nothing."""
        spec = self.copy()
        heads = _check_heads(heads, "query")
        gate = spec.gate if spec.gate is not None else torch.ones(self.num_layers, self.num_heads)
        for layer, hs in heads.items():
            self._check_layer(layer)
            for h in hs:
                if not 0 <= h < self.num_heads:
                    raise _fail("heads", f"query head indices in [0, {self.num_heads})", h)
                gate[..., layer, h] = 0.0
        spec.gate = gate
        return spec

    def scale_first_token(self, scale) -> "HeadSpec":
        """A copy in which each head's attention to its row's first token is multiplied by `scale`
        and the row renormalised (ZeroTuning's initial-token scaling: a probability p becomes
        scale p / (scale p + 1 - p)): log(scale) added to key_bias at key 0 (the row's first real
        token in a padded batch). scale: a number > 0 for every head, or an ``[L, Hq]`` tensor of
        them (1: the head unchanged)."""
        L, Hq = self.num_layers, self.num_heads
        if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
            raise _fail("scale", "a number > 0 or an [L, Hq] tensor of them", type(scale).__name__)
        scale = torch.as_tensor(scale, dtype=torch.float32).detach()
        if scale.dim() == 0:
            scale = scale.expand(L, Hq)
        if tuple(scale.shape) != (L, Hq) or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise _fail("scale", f"a finite number > 0 or an [L, Hq] = [{L}, {Hq}] tensor of them",
                        tuple(scale.shape) if scale.dim() != 2 or tuple(scale.shape) != (L, Hq) else scale.tolist())
        spec = self.copy()
        bias = spec.key_bias.detach().clone() if spec.key_bias is not None else torch.zeros(L, Hq, 1)
        bias[:, :, 0] += scale.log().to(bias.dtype)
        spec.key_bias = bias
        return spec

    @classmethod
    def streaming(cls, model_or_config, heads: dict, *, window: int, sinks: int = 4) -> "HeadSpec":
        """The given KV heads ({layer: [KV heads]}) streaming (sinks + window), the rest full. In a
        model whose last layers read earlier layers' keys and values (Gemma 3n, Gemma 4's small
        models), a KV head of such a layer is its source layer's: naming either makes both
        streaming (every constructor gives those layers their source's cache rows)."""
        spec = cls.dense(model_or_config)
        heads = _check_heads(heads, "KV")
        spec._check_window_sinks(window, sinks)
        kinds = layer_kinds(model_or_config, spec.num_layers)
        sources = kv_sources(model_or_config)
        for layer, kv_heads in heads.items():
            spec._check_layer(layer)
            if kinds[layer][0] == "cross":
                raise _fail("heads", "in layers other than cross-attention layers (their keys are the encoder's "
                                     "outputs: no window)", f"layer {layer}, cross-attention layer {kinds[layer][1]}")
            for h in kv_heads:
                spec._check_kv_head("heads", layer, h)
                spec._make_streaming(sources.get(layer, layer), h, window, sinks)
        return spec._share_kv_rows(sources)

    @classmethod
    def streaming_llm(cls, model_or_config, *, window: int, sinks: int = 4) -> "HeadSpec":
        """StreamingLLM (Xiao et al.): every KV head streaming, keeping its first `sinks` tokens
        (attention sinks) and the last `window`; an encoder-decoder model's cross-attention layers
        stay full (their keys are the encoder's outputs)."""
        L, _, Hkv, _ = _shape_of(model_or_config)
        kinds = layer_kinds(model_or_config, L)
        return cls.streaming(model_or_config, {layer: range(of_layer(Hkv, layer)) for layer in range(L)
                                               if kinds[layer][0] != "cross"}, window=window, sinks=sinks)

    @classmethod
    def razor(cls, model_or_config, retrieval_heads, *, window: int, sinks: int = 4,
              weighted: bool = True) -> "HeadSpec":
        """RazorAttention (Tang et al.): the retrieval heads' KV heads keep every token, every
        other KV head is streaming (sinks + window) and folds what it evicts into one
        compensation token (the mean key and value of the evicted tokens; its logit carries
        + log(count) when `weighted`). `retrieval_heads`: {layer: [KV heads]} or (layer, KV head)
        pairs (e.g. headops.head_scores.top_heads of echo + induction scores). The prompt runs
        full attention for every head (cache option prefill="full"), as the paper does."""
        if not isinstance(weighted, bool):
            raise TypeError(f"headops.HeadSpec.razor: weighted must be a bool, got {type(weighted).__name__}")
        spec = cls.dense(model_or_config)
        spec._check_window_sinks(window, sinks)
        if not isinstance(retrieval_heads, dict):
            pairs = [tuple(p) if isinstance(p, (tuple, list)) else p for p in retrieval_heads]
            if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
                raise TypeError("headops.HeadSpec.razor: retrieval_heads must be a dict {layer: [KV heads]} or "
                                f"(layer, KV head) pairs, got {retrieval_heads!r}")
            grouped = {}
            for layer, h in pairs:
                grouped.setdefault(layer, []).append(h)
            retrieval_heads = grouped
        heads = _check_heads(retrieval_heads, "KV")
        sources = kv_sources(model_or_config)  # (a layer reading another's keys: its retrieval heads keep the source's)
        full = set()
        for layer, kv_heads in heads.items():
            spec._check_layer(layer)
            for h in kv_heads:
                spec._check_kv_head("retrieval_heads", layer, h)
                full.add((sources.get(layer, layer), h))
        for layer, h in spec._kv_head_list():
            if (layer, h) not in full:
                spec._make_streaming(layer, h, window, sinks)
                spec.cache_compensation[layer][h] = "weighted" if weighted else "unweighted"
        spec._share_kv_rows(sources)
        spec.cache_options = {"prefill": "full"}
        spec.validate()
        return spec

    @classmethod
    def budget(cls, model_or_config, heads: dict | None = None, *, budget: int, allocation: str = "uniform",
               alpha: float = 0.2, observation_window: int | None = None, pool_kernel: int | None = None,
               pooling: str | None = None, keep_observation_window: bool | None = None) -> "HeadSpec":
        """Budget KV heads (SnapKV-style; the given ones, {layer: [KV heads]}, the rest full; None:
        every KV head): each keeps at most `budget` tokens in a HeadSparseCache, chosen at prefill
        by SnapKV scores (the prompt's last `observation_window` queries' attention, pooled over
        `pool_kernel` keys by `pooling`, "max" or "avg"; with `keep_observation_window` the window's
        tokens kept too, as SnapKV and kvpress do) and evicted least-attended first during decode
        (a model's sliding-window layers keep their window instead, as kvpress leaves them). `allocation`: "uniform"
        (every head its budget) or "adakv" (AdaKV: per prompt and layer, the layer's budget heads
        share budget x heads tokens by score, each guaranteed int(alpha x budget)). Their attention
        is unchanged until tokens are evicted (the cache keeps sinks, the latest tokens, the best
        scored)."""
        if not is_int(budget) or budget < 1:
            raise _fail("budget", "an int >= 1", budget)
        if allocation not in ("uniform", "adakv"):
            raise _fail("allocation", "'uniform' or 'adakv' (HeadKV's static budgets: HeadSpec.headkv)",
                        repr(allocation))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise _fail("alpha", "a number in [0, 1] (AdaKV's floor, a fraction of the budget)", repr(alpha))
        spec = cls.dense(model_or_config)
        if heads is None:  # (every KV head of the layers without a sliding window)
            heads = {layer: range(spec.kv_heads(layer)) for layer in spec._budget_layers(model_or_config)}
        heads = _check_heads(heads, "KV")
        windows = sliding_windows(model_or_config, spec.num_layers)
        sources = kv_sources(model_or_config)  # (a layer reading another's keys: its KV heads are the source's)
        for layer, kv_heads in heads.items():
            spec._check_layer(layer)
            layer = sources.get(layer, layer)
            if windows[layer] is not None:
                raise _fail("heads", f"layers without the model's sliding window (layer {layer} slides, window "
                                     f"{windows[layer]}: its KV heads keep the window, not a budget)", layer)
            for h in kv_heads:
                spec._check_kv_head("heads", layer, h)
                spec.cache_kind[layer][h] = "budget"
                spec.cache_budget[layer][h] = int(budget)
        spec._share_kv_rows(sources)
        spec.cache_options = _budget_options(allocation, alpha=alpha if allocation == "adakv" else None,
                                             observation_window=observation_window, pool_kernel=pool_kernel,
                                             pooling=pooling, keep_observation_window=keep_observation_window)
        spec.validate()
        return spec

    @classmethod
    def headkv(cls, model_or_config, scores, *, budget: int, beta: float, pool: str = "mean", window: int | None = None,
               observation_window: int | None = None, pool_kernel: int | None = None, pooling: str | None = None,
               keep_observation_window: bool | None = None) -> "HeadSpec":
        """HeadKV (Fu et al.): every KV head a budget head with a static budget from per-head
        importance `scores` (``[L, Hkv]``, or ``[L, Hq]`` pooled over each KV head's group by
        `pool`, "mean" or "max"; e.g. retrieval scores from headops.discover): each head keeps
        ``budget - budget // beta`` tokens plus its score's share of a pool of
        ``(budget // beta) x L x Hkv`` (headops.budgets.headkv_budgets; in a model with sliding-window
        layers, over the other layers' KV heads: the sliding ones keep their window). With
        `window` (the latest tokens every head keeps: the budget_recent of the HeadSparseCache the
        spec is for, 8 by default there) no head gets fewer than ``window + 1`` tokens, which a
        budget head needs: where its share would leave it below, the others share the rest (the
        total stays; where budget - budget // beta > window, nothing changes). Without, the formula
        alone (a head of a small score may then get less than the cache takes). Tokens are chosen
        by SnapKV scores as in HeadSpec.budget."""
        from .budgets import headkv_budgets

        if window is not None and (not is_int(window) or window < 0):
            raise _fail("window", "None or an int >= 0", repr(window))
        if window is not None and (not is_int(budget) or budget <= window):
            raise _fail("budget", f"an int > window ({window}: the latest tokens every head keeps)", repr(budget))

        spec = cls.dense(model_or_config)
        sources = kv_sources(model_or_config)
        kv_scores = spec._kv_head_scores("headops.HeadSpec.headkv", scores, pool, sources)
        layers = spec._budget_layers(model_or_config)  # (a sliding-window layer keeps its window)
        # one pool over every KV head of those layers
        budgets = headkv_budgets(torch.cat([kv_scores[layer] for layer in layers])[None], budget, beta,
                                 floor=0 if window is None else window + 1)[0]
        if int(budgets.min()) < 1:
            raise _fail("beta", f"large enough that every KV head keeps a token (beta = {beta} gives "
                                f"{int((budgets < 1).sum())} KV heads a budget of 0)", repr(beta))
        for layer, row in zip(layers, budgets.split([spec.kv_heads(layer) for layer in layers])):
            spec.cache_kind[layer] = ["budget"] * len(row)
            spec.cache_budget[layer] = row.tolist()
        spec._share_kv_rows(sources)
        spec.cache_options = _budget_options("headkv", observation_window=observation_window, pool_kernel=pool_kernel,
                                             pooling=pooling, keep_observation_window=keep_observation_window)
        spec.validate()
        return spec

    @classmethod
    def pyramid(cls, model_or_config, *, budget: int, beta: float = 20, window: int = 8, allocation: str = "uniform",
                alpha: float = 0.2, observation_window: int | None = None, pool_kernel: int | None = None,
                pooling: str | None = None, keep_observation_window: bool | None = None) -> "HeadSpec":
        """PyramidKV (Cai et al.): every KV head a budget head, layer l's keeping
        ``headops.budgets.pyramid_budgets(L, budget, beta, kept=window)[l]`` tokens: `window` (the
        latest tokens every head keeps: a HeadSparseCache's budget_recent, 8 by default) and a
        share of the rest falling from ``2 (budget - window) - (budget - window) / beta`` in the
        first layer to ``(budget - window) / beta`` in the last; `budget` on average, as many bytes
        as HeadSpec.budget(model, budget=budget). Tokens are chosen by SnapKV scores as there;
        `allocation` "uniform" (each KV head its layer's budget) or "adakv" (the layer's heads
        share it as AdaKV does, each guaranteed int(alpha x its budget)). In a model with
        sliding-window layers the pyramid runs over the other layers (the sliding ones keep their
        window)."""
        from .budgets import pyramid_budgets

        if allocation not in ("uniform", "adakv"):
            raise _fail("allocation", "'uniform' or 'adakv'", repr(allocation))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise _fail("alpha", "a number in [0, 1] (AdaKV's floor, a fraction of the budget)", repr(alpha))
        if not is_int(window) or window < 0:
            raise _fail("window", "an int >= 0", repr(window))
        if not is_int(budget) or budget <= window:
            raise _fail("budget", f"an int > window ({window}: the latest tokens every head keeps)", repr(budget))
        spec = cls.dense(model_or_config)
        layers = spec._budget_layers(model_or_config)  # (the pyramid over the layers without a sliding window)
        budgets = pyramid_budgets(len(layers), budget, beta, kept=window)
        if min(budgets) <= window:
            raise _fail("beta", f"small enough that the last layer keeps a token beyond the window ((budget - window) "
                                f"/ beta >= 0.5; budget {budget}, window {window})", repr(beta))
        for layer, b in zip(layers, budgets):
            spec.cache_kind[layer] = ["budget"] * spec.kv_heads(layer)
            spec.cache_budget[layer] = [b] * spec.kv_heads(layer)
        spec._share_kv_rows(kv_sources(model_or_config))
        spec.cache_options = _budget_options(allocation, alpha=alpha if allocation == "adakv" else None,
                                             observation_window=observation_window, pool_kernel=pool_kernel,
                                             pooling=pooling, keep_observation_window=keep_observation_window)
        spec.validate()
        return spec

    @classmethod
    def from_duo_attention(cls, model_or_config, path, *, sinks: int, window: int, threshold: float = 0.5,
                           keep_alpha: bool = False) -> "HeadSpec":
        """DuoAttention's published pattern (``full_attention_heads.tsv``: one row per layer, one
        gate per KV head). KV heads whose gate is above threshold stay full (retrieval heads), the
        others become streaming with the given sinks and window. keep_alpha=True instead keeps
        every head on a full cache and mixes both views with alpha = the clipped gate."""
        spec = cls.dense(model_or_config)
        spec._check_window_sinks(window, sinks)
        rows = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append([float(x) for x in line.split()])
                    except ValueError:
                        raise _fail("the pattern", "rows of numbers (layers x KV heads)", repr(line.strip())) from None
        counts = [spec.kv_heads(layer) for layer in range(spec.num_layers)]
        if [len(r) for r in rows] != counts:
            want = (f"{spec.num_layers} rows of {counts[0]} values" if len(set(counts)) == 1 else
                    f"{spec.num_layers} rows of each layer's KV heads ({counts})")
            raise _fail("the pattern", f"{want} (layers x KV heads)", f"rows of {[len(r) for r in rows]}")
        # each query head its KV head's clipped gate ([L, Hq]: the layers may differ in KV heads)
        alpha = torch.stack([torch.tensor(row, dtype=torch.float32).clamp(0.0, 1.0).repeat_interleave(
            spec.kv_group(layer)) for layer, row in enumerate(rows)])
        if not keep_alpha:
            return cls.from_scores(model_or_config, alpha, threshold=threshold, window=window, sinks=sinks)
        spec.alpha = alpha
        spec.window[:] = window
        spec.sinks[:] = sinks
        return spec

    @classmethod
    def from_scores(cls, model_or_config, scores, *, full_fraction: float | None = None,
                    threshold: float | None = None, window: int, sinks: int, pool: str = "max") -> "HeadSpec":
        """Full KV heads where the scores say retrieval, streaming (sinks + window) elsewhere.

        scores: ``[L, Hkv]`` per KV head, or ``[L, Hq]`` per query head (e.g. headops.discover's),
        pooled over each KV head's group by `pool` ("max" or "mean"; headops.head_scores). Give
        one of full_fraction (the top round(fraction * L * Hkv) KV heads full, equal scores in
        (layer, head) order) and threshold (KV heads scoring above it full, as DuoAttention's
        gates). Where layers read another layer's keys and values (Gemma 3n, Gemma 4's small
        models), a KV head scores the most of the layers reading it, the fraction counts the
        layers that store keys, and the reading layers keep their source's rows."""
        spec = cls.dense(model_or_config)
        spec._check_window_sinks(window, sinks)
        sources = kv_sources(model_or_config)  # (layers reading another's keys: ranked as their source's)
        kv_scores = spec._kv_head_scores("headops.HeadSpec.from_scores", scores, pool, sources)
        heads = [(layer, h) for layer, h in spec._kv_head_list() if layer not in sources]
        if (full_fraction is None) == (threshold is None):
            raise ValueError("headops.HeadSpec.from_scores: give one of full_fraction and threshold")
        if full_fraction is not None:
            if isinstance(full_fraction, bool) or not isinstance(full_fraction, (int, float)) or \
                    not 0.0 <= full_fraction <= 1.0:
                raise _fail("full_fraction", "a number in [0, 1]", repr(full_fraction))
            full = spec._top_stored_kv_heads(kv_scores, sources, full_fraction)
        else:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
                raise _fail("threshold", "a number", repr(threshold))
            full = {(layer, h) for layer, h in heads if kv_scores[layer][h] > threshold}
        for layer, h in heads:
            if (layer, h) not in full:
                spec._make_streaming(layer, h, window, sinks)
        return spec._share_kv_rows(sources)

    def _top_stored_kv_heads(self, kv_scores, sources, fraction) -> set:
        """The top round(fraction x KV heads of the layers that store keys) (layer, KV head) by
        `kv_scores` (_kv_head_scores with the same `sources`: the layers that read another's keys
        are not ranked, their source scores for them), equal scores in (layer, head) order."""
        from .head_scores import top_heads

        stored = [layer for layer in range(self.num_layers) if layer not in sources]
        count = round(fraction * sum(self.kv_heads(layer) for layer in stored))
        return {(stored[i], h) for i, h in top_heads([kv_scores[layer] for layer in stored], count)}

    def _kv_head_scores(self, caller, scores, pool, sources=None) -> list:
        """Per-head `scores` checked (a floating tensor [L, Hkv] or [L, Hq], free of NaN; [L, Hq]
        where the layers differ in KV heads) and pooled to one per KV head by `pool` over its group
        of query heads: a list of each layer's [Hkv]. Where layers read another layer's keys and
        values (`sources`, {layer: source}), a source's KV head scores the most of its readers'
        (its own included): the keys kept for one serve them all."""
        from .head_scores import POOLINGS, pool_kv_heads

        L, Hq, Hkv = self.num_layers, self.num_heads, self.num_kv_heads
        if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point:
            raise TypeError(f"{caller}: scores must be a floating-point tensor, got "
                            f"{scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__}")
        shapes = ((L, Hq),) if isinstance(Hkv, tuple) else ((L, Hkv), (L, Hq))
        if tuple(scores.shape) not in shapes:
            raise _fail("scores", f"[L, Hq] = [{L}, {Hq}] (the layers differ in KV heads: {Hkv})" if len(shapes) == 1
                        else f"[L, Hkv] = [{L}, {Hkv}] or [L, Hq] = [{L}, {Hq}]", tuple(scores.shape))
        if bool(torch.isnan(scores).any()):
            raise _fail("scores", "free of NaN", "NaN")
        if pool not in POOLINGS:
            raise _fail("pool", f"one of {', '.join(POOLINGS)}", repr(pool))
        kv_scores = list(pool_kv_heads(scores, Hkv, pool) if scores.shape[1] == Hq else scores)
        for layer, source in (sources or {}).items():
            kv_scores[source] = torch.maximum(kv_scores[source], kv_scores[layer])
        return kv_scores

    @staticmethod
    def _check_window_sinks(window, sinks):
        if not is_int(window) or not 1 <= window < 2**63:
            raise _fail("window", "an int >= 1", window)
        if not is_int(sinks) or not 0 <= sinks < 2**63:
            raise _fail("sinks", "an int >= 0", sinks)

    def _make_streaming(self, layer, kv_head, window, sinks):
        self._check_window_sinks(window, sinks)
        group = self.kv_group(layer)
        self.window[layer, kv_head * group:(kv_head + 1) * group] = window
        self.sinks[layer, kv_head * group:(kv_head + 1) * group] = sinks
        self.cache_kind[layer][kv_head] = "streaming"

    def _share_kv_rows(self, sources: dict) -> "HeadSpec":
        """Each layer that reads another layer's keys and values (`sources`, {layer: source}:
        headops._model_attention.kv_sources) given its source's cache rows: kinds, budgets,
        compensation and its query heads' windows and sinks (a HeadSparseCache stores the keys
        once, as the source keeps them, and refuses a spec whose rows differ). Returns self."""
        for layer, source in sources.items():
            self.window[layer] = self.window[source]
            self.sinks[layer] = self.sinks[source]
            self.cache_kind[layer] = list(self.cache_kind[source])
            self.cache_budget[layer] = list(self.cache_budget[source])
            self.cache_compensation[layer] = list(self.cache_compensation[source])
        return self

    def _check_layer(self, layer):
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise _fail("layer", f"an int in [0, {self.num_layers})", repr(layer))

    def _budget_layers(self, model_or_config) -> list:
        """The layers whose KV heads can be budget heads: those the model does not limit to a
        sliding window (in those, a KV head keeps the window, as transformers' cache and kvpress
        do), and that keep keys of their own (a layer reading another's has its source's budgets)."""
        windows = sliding_windows(model_or_config, self.num_layers)
        sources = kv_sources(model_or_config)
        layers = [layer for layer, window in enumerate(windows) if window is None and layer not in sources]
        if not layers:
            raise _fail("the model", "one with layers that see every earlier key (every layer of this one slides: "
                                     "its KV heads keep their windows, no budget heads)", f"windows {windows}")
        return layers

    def _check_kv_head(self, name, layer, h):
        if not 0 <= h < self.kv_heads(layer):
            raise _fail(name, f"KV head indices in [0, {self.kv_heads(layer)})"
                              + (f" in layer {layer}" if isinstance(self.num_kv_heads, tuple) else ""), h)

    def _kv_head_list(self) -> list:
        """Every (layer, KV head), layer by layer."""
        return [(layer, h) for layer in range(self.num_layers) for h in range(self.kv_heads(layer))]

    def _per_query_head(self, per_kv_head: torch.Tensor) -> torch.Tensor:
        """[L, Hq] from one value per KV head (a flat tensor, layer by layer, as _kv_head_list):
        each query head its KV head's."""
        rows = per_kv_head.split([self.kv_heads(layer) for layer in range(self.num_layers)])
        return torch.stack([row.repeat_interleave(self.kv_group(layer)) for layer, row in enumerate(rows)])

    def _kv_rows(self, per_kv_head: torch.Tensor):
        """One value per KV head (a flat tensor, layer by layer) as [L, Hkv], or where the layers
        differ in KV heads a list of each layer's [Hkv]."""
        if isinstance(self.num_kv_heads, int):
            return per_kv_head.view(self.num_layers, self.num_kv_heads)
        return list(per_kv_head.split(list(self.num_kv_heads)))

    def kv_heads(self, layer: int) -> int:
        """Layer `layer`'s KV heads (num_kv_heads, or its entry where the layers differ: Gemma 4)."""
        return of_layer(self.num_kv_heads, layer)

    @property
    def out_dim(self) -> int:
        """The last dim of out_scale and out_bias: head_dim, or where the layers differ in head dim
        the largest (layer l reads the first head_dim[l] entries)."""
        return self.head_dim if isinstance(self.head_dim, int) else max(self.head_dim)

    def kv_group(self, layer: int) -> int:
        """How many query heads read each of layer `layer`'s KV heads (GQA's group)."""
        return self.num_heads // self.kv_heads(layer)

    # --------------------------------------------------------------------------- use

    def validate(self, model_or_config=None) -> None:
        """Checks every field: shapes, dtypes and the rules of the values (and, given a model or
        config, that the spec was made for it)."""
        check_attention_shape(CALLER, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim,
                              per_layer=True)
        L, Hq, Hkv, D = self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim
        if model_or_config is not None and _shape_of(model_or_config) != (L, Hq, Hkv, D):
            raise _fail("the spec", f"made for this model (layers, heads, KV heads, head dim = "
                                    f"{_shape_of(model_or_config)})", (L, Hq, Hkv, D))
        for name in _FLOAT_FIELDS:
            t = getattr(self, name)
            if t is not None and not (isinstance(t, torch.Tensor) and t.dtype.is_floating_point):
                raise TypeError(f"headops.HeadSpec: {name} must be None or a floating-point tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        for name in ("window", "sinks"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"headops.HeadSpec: {name} must be an int64 tensor, got "
                                f"{type(getattr(self, name)).__name__}")
        for name in ("softmax_scale", "sink_logit"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (L, Hq):
                raise _fail(name, f"[L, Hq] = [{L}, {Hq}]", tuple(t.shape))
        for name in _PER_BATCH:
            t = getattr(self, name)
            if t is not None and not (tuple(t.shape) == (L, Hq) or (t.dim() == 3 and tuple(t.shape[1:]) == (L, Hq))):
                raise _fail(name, f"[L, Hq] = [{L}, {Hq}] or [B, L, Hq]", tuple(t.shape))
        for name in ("window", "sinks"):
            t = getattr(self, name)
            if tuple(t.shape) != (L, Hq) or t.dtype != torch.int64:
                raise _fail(name, f"an int64 [L, Hq] = [{L}, {Hq}] tensor", f"{t.dtype} {tuple(t.shape)}")
        for name in ("out_scale", "out_bias"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (L, Hq, self.out_dim):
                raise _fail(name, f"[L, Hq, D] = [{L}, {Hq}, {self.out_dim}]" + (
                    "" if isinstance(D, int) else f" (D = out_dim, the largest of the layers' head dims {D})"),
                    tuple(t.shape))
        if self.key_bias is not None and (self.key_bias.dim() != 3 or tuple(self.key_bias.shape[:2]) != (L, Hq)):
            raise _fail("key_bias", f"[L, Hq, K] = [{L}, {Hq}, K]", tuple(self.key_bias.shape))
        kinds, budgets = self.cache_kind, self.cache_budget
        counts = [self.kv_heads(layer) for layer in range(L)]
        kv_shape = f"[L, Hkv] = [{L}, {Hkv}]" if isinstance(Hkv, int) else f"[L][Hkv] with Hkv = {Hkv}, per layer"

        def per_kv_head(rows):
            return isinstance(rows, (list, tuple)) and len(rows) == L and all(
                isinstance(r, (list, tuple)) and len(r) == n for r, n in zip(rows, counts))

        if not per_kv_head(kinds):
            raise _fail("cache_kind", kv_shape, kinds)
        if any(k not in ("full", "streaming", "budget") for r in kinds for k in r):
            raise _fail("cache_kind", "'full', 'streaming' or 'budget' for every KV head", kinds)
        if not per_kv_head(budgets) or any(b is not None and not is_int(b) for r in budgets for b in r):
            raise _fail("cache_budget", f"{kv_shape} ints (None where not a budget head)", budgets)
        check_values(CALLER, window=self.window, sinks=self.sinks, alpha=self.alpha, softmax_scale=self.softmax_scale,
                     sink_logit=self.sink_logit, key_bias=self.key_bias)
        comp = self.cache_compensation
        if not per_kv_head(comp):
            raise _fail("cache_compensation", f"{kv_shape} of None, 'weighted' or 'unweighted'", comp)
        for layer, (kind_row, comp_row) in enumerate(zip(kinds, comp)):
            for h, (kind, c) in enumerate(zip(kind_row, comp_row)):
                check_compensation(CALLER, c, "cache_compensation")
                if c is not None and kind != "streaming":
                    raise _fail("cache_compensation", "None on KV heads that are not streaming",
                                f"{c!r} on {kind} KV head {h} of layer {layer}")
        check_cache_options(CALLER, self.cache_options)
        if model_or_config is not None:
            check_spec_in_sliding_layers(_fail, self, sliding_windows(model_or_config, L))
            check_spec_in_cross_attention_layers(_fail, self, layer_kinds(model_or_config, L))

    def layer_args(self, layer: int, keys: int | None = None, *, visibility: bool = True) -> dict:
        """headops.attention's per-head arguments for `layer` (None fields left out); key_bias
        needs the number of keys (original positions 0 .. keys - 1). ``visibility=False`` leaves
        out window and sinks too (a HeadSparseCache's attention takes its own)."""
        self._check_layer(layer)
        if keys is not None and (not is_int(keys) or keys < 0):
            raise _fail("keys", "None or an int >= 0", repr(keys))
        if not isinstance(visibility, bool):
            raise _fail("visibility", "True or False", repr(visibility))
        args = {"window": self.window[layer], "sinks": self.sinks[layer]} if visibility else {}
        if self.key_bias is not None:
            if keys is None:
                raise ValueError("headops.HeadSpec.layer_args: key_bias needs the number of keys")
            prefix = self.key_bias[layer][:, :keys]
            args["key_bias"] = torch.nn.functional.pad(prefix, (0, keys - prefix.shape[-1]))
        for name in _FLOAT_FIELDS[:-1]:
            t = getattr(self, name)
            if t is not None:
                args[name] = t[:, layer] if (name in _PER_BATCH and t.dim() == 3) else t[layer]
        for name in ("out_scale", "out_bias"):  # (layers of other head dims: the layer's first entries)
            if name in args and args[name].shape[-1] != of_layer(self.head_dim, layer):
                args[name] = args[name][..., :of_layer(self.head_dim, layer)]
        return args

    def tensors(self) -> dict:
        """The tensor fields that are set: {name: tensor}."""
        return {name: getattr(self, name) for name in _PER_QUERY_HEAD if getattr(self, name) is not None}

    @staticmethod
    def _device(device) -> torch.device:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise _fail("device", "a torch.device or a device string", repr(device)) from None

    def is_on(self, device) -> bool:
        """Whether every tensor field is where ``to(device)`` would put it."""
        device = self._device(device)
        return all(t.device == placement(name, t, device) for name, t in self.tensors().items())

    def to(self, device) -> "HeadSpec":
        """A new spec with every tensor field on `device` (as ``Tensor.to``: a tensor already
        there is the same tensor, so a gate that requires grad stays the leaf it was).

        For a CUDA device the fields that plan the work (window, sinks; gate and alpha unless they
        require grad) stay on the CPU: headops.attention reads them on the host without a
        device-to-host sync, and a gate of exactly 0 still skips its head (docs/cuda.md)."""
        device = self._device(device)
        return dataclasses.replace(self, **{name: t.to(placement(name, t, device))
                                            for name, t in self.tensors().items()},
                                   cache_kind=[list(r) for r in self.cache_kind],
                                   cache_budget=[list(r) for r in self.cache_budget],
                                   cache_compensation=[list(r) for r in self.cache_compensation],
                                   cache_options=dict(self.cache_options))

    def slice_heads(self, q_heads) -> "HeadSpec":
        """The spec of a contiguous block of query heads (``range(a, b)`` or ``slice(a, b)``) and
        of the KV heads they read, e.g. one tensor-parallel rank's heads (docs/DESIGN.md section
        8). The block must hold whole GQA groups: query heads that share a KV head stay together."""
        where = "headops.HeadSpec.slice_heads"
        if not isinstance(q_heads, (range, slice)):
            raise TypeError(f"{where}: q_heads must be a range or a slice of query heads, got "
                            f"{type(q_heads).__name__}")
        if isinstance(q_heads, slice) and not all(x is None or is_int(x) for x in (q_heads.start, q_heads.stop,
                                                                                   q_heads.step)):
            raise TypeError(f"{where}: q_heads must be a slice of ints, got {q_heads!r}")
        Hq = self.num_heads
        first, stop, step = (q_heads.indices(Hq) if isinstance(q_heads, slice) else
                             (q_heads.start, q_heads.stop, q_heads.step))
        if step != 1 or not 0 <= first < stop <= Hq:
            raise fail(where, "q_heads", f"a non-empty block of consecutive query heads in [0, {Hq})", q_heads)
        for group in sorted({self.kv_group(layer) for layer in range(self.num_layers)}, reverse=True):
            if first % group or stop % group:
                raise fail(where, "q_heads", f"whole GQA groups ({group} query heads share each KV head: a block "
                                             f"from a multiple of {group} to a multiple of {group})", q_heads)
        # each layer's KV heads of the block (the layers may differ in KV heads)
        kv = [slice(first // self.kv_group(layer), stop // self.kv_group(layer)) for layer in range(self.num_layers)]
        kv_heads = tuple(s.stop - s.start for s in kv)
        block = {name: (t[..., first:stop] if name in _PER_BATCH else t[:, first:stop]).clone()
                 for name, t in self.tensors().items()}

        def rows(per_kv_head):
            return [list(r[s]) for r, s in zip(per_kv_head, kv)]

        return dataclasses.replace(self, num_heads=stop - first, **block,
                                   num_kv_heads=kv_heads if isinstance(self.num_kv_heads, tuple) else kv_heads[0],
                                   cache_kind=rows(self.cache_kind), cache_budget=rows(self.cache_budget),
                                   cache_compensation=rows(self.cache_compensation),
                                   cache_options=dict(self.cache_options))

    # ------------------------------------------------------------------------ save / load

    def to_dict(self) -> dict:
        d = {"num_layers": self.num_layers, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
             "head_dim": self.head_dim, "window": self.window.tolist(), "sinks": self.sinks.tolist(),
             "cache_kind": self.cache_kind, "cache_budget": self.cache_budget,
             "cache_compensation": self.cache_compensation, "cache_options": dict(self.cache_options)}
        for name in _FLOAT_FIELDS:
            t = getattr(self, name)
            d[name] = None if t is None else t.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSpec":
        if not isinstance(d, dict):
            raise TypeError(f"headops.HeadSpec.from_dict: d must be a dict (of HeadSpec.to_dict), got {type(d).__name__}")
        missing = [n for n in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "window", "sinks", "cache_kind",
                               "cache_budget") if n not in d]
        if missing:
            raise _fail("the dict", f"a HeadSpec.to_dict() with {', '.join(missing)}", sorted(d))

        def tensor(name, integer):
            try:
                t = torch.tensor(d[name])
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise _fail(name, "a nested list of numbers", repr(d[name])[:200]) from None
            if integer and (t.dtype.is_floating_point or t.dtype == torch.bool):
                raise _fail(name, "integers", t.dtype)
            return t.to(torch.int64 if integer else torch.float32)

        for name in ("cache_kind", "cache_budget"):
            if not isinstance(d[name], (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in d[name]):
                raise _fail(name, "a list of lists (layers x KV heads)", repr(d[name]))
        fields = {name: d[name] for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim")}
        for name in ("num_kv_heads", "head_dim"):
            if isinstance(fields[name], list):  # (one per layer, a tuple that JSON wrote as a list)
                fields[name] = tuple(fields[name])
        fields.update(window=tensor("window", True), sinks=tensor("sinks", True),
                      cache_kind=[list(r) for r in d["cache_kind"]], cache_budget=[list(r) for r in d["cache_budget"]])
        fields.update({name: tensor(name, False) for name in _FLOAT_FIELDS if d.get(name) is not None})
        for name in ("cache_compensation", "cache_options"):  # (specs saved before these fields had none)
            if d.get(name) is not None:
                fields[name] = d[name]
        return cls(**fields)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path) -> "HeadSpec":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __repr__(self):
        kinds = [k for r in self.cache_kind for k in r]
        gated = 0 if self.gate is None else int((self.gate == 0).sum())
        return (f"HeadSpec(layers={self.num_layers}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, streaming KV heads={kinds.count('streaming')}/{len(kinds)}, "
                f"gated heads={gated})")
