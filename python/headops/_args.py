"""The per-head arguments of every headops call, normalised and checked in one place.

``headops.attention``, ``HeadSparseCache`` (prefill and decode) and ``HeadSpec`` take the same
per-head arguments (docs/DESIGN.md section 1). This module turns each accepted form into the
one the kernels take and holds the rules of their values, with one set of messages. Every
message starts with the caller (``headops.attention``, ``headops.HeadSparseCache.attention``,
``headops.HeadSpec``...) and names the caller's argument.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The per-head arguments that decide the CUDA forward's work list (which heads and key blocks are
# computed, which alpha branches): with CUDA q, k, v they may be CPU tensors, which the host reads
# without a device-to-host sync (docs/cuda.md, "Sync-free calls"). A gate or alpha whose gradient
# is wanted must be on q's device (its gradient is computed there).
PLANNING_ARGS = ("window", "sinks", "gate", "alpha")


def fail(caller: str, name: str, expected: str, got) -> ValueError:
    return ValueError(f"{caller}: {name} must be {expected}, got {got}")


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"


def is_int(x) -> bool:
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def check_attention_shape(caller: str, num_layers, num_heads, num_kv_heads, head_dim, per_layer=False) -> None:
    """A model's attention shape: ints >= 1, query heads a multiple of KV heads (GQA/MQA); with
    `per_layer`, num_kv_heads and head_dim may also be tuples of one int per layer (a model whose
    layers differ: Gemma 4)."""
    if not is_int(num_layers) or num_layers < 1:
        raise fail(caller, "num_layers", "an int >= 1", num_layers)
    if not is_int(num_heads) or num_heads < 1:
        raise fail(caller, "num_heads", "an int >= 1", num_heads)
    for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        values = value if per_layer and isinstance(value, tuple) else (value,)
        if (per_layer and isinstance(value, tuple) and len(value) != num_layers) or \
                not all(is_int(v) and v >= 1 for v in values):
            raise fail(caller, name, "an int >= 1" + (f" or a tuple of {num_layers} (one per layer)"
                                                      if per_layer else ""), value)
    for kv_heads in (num_kv_heads if isinstance(num_kv_heads, tuple) else (num_kv_heads,)):
        if num_heads % kv_heads:
            raise fail(caller, "num_heads", f"a multiple of num_kv_heads ({num_kv_heads})", num_heads)


def of_layer(value, layer: int) -> int:
    """A per-layer attention size (num_kv_heads, head_dim: an int for every layer, or a tuple of one
    per layer) at `layer`."""
    return value[layer] if isinstance(value, tuple) else value


def check_dense(caller: str, t: torch.Tensor, name: str) -> None:
    """Sparse, nested and other non-strided tensors have no strides to read: a TypeError naming them."""
    if t.is_nested or t.layout != torch.strided:
        raise TypeError(f"{caller}: {name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")


def check_float_dtype(caller: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{caller}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


class HeadShapes(NamedTuple):
    """What the per-head arguments are checked against: batch, query heads, keys, q's and k's head
    dim (the default scale's), the values' (a head's output: out_scale's and out_bias's)."""
    B: int
    Hq: int
    Sk: int
    D: int
    Dv: int


class HeadArgs(NamedTuple):
    """Normalised per-head arguments: ``[B, Hq]`` tensors (``[B, Hq, D]`` for out_scale and
    out_bias, ``[B, Hq, Sk]`` for key_bias; expands, not copies) or None, in the order the
    kernels take them after ``default_scale``."""
    default_scale: float
    softmax_scale: torch.Tensor | None = None
    window: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    sink_logit: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    def kernel_args(self, dtype: torch.dtype) -> tuple:
        """The arguments of the fused ops from default_scale to gate, for q, k, v of `dtype`:
        floats in the kernels' accumulation dtype (float64 for float64, else float32), window and
        sinks int64."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def to(t, target):
            return None if t is None else t.to(target)

        return (self.default_scale, to(self.softmax_scale, acc), to(self.window, torch.int64),
                to(self.sinks, torch.int64), to(self.alpha, acc), to(self.key_bias, acc), to(self.sink_logit, acc),
                to(self.out_scale, acc), to(self.out_bias, acc), to(self.gate, acc))

    def row(self, b: int, keys: int) -> "HeadArgs":
        """Batch row b alone (a batch of one), with key_bias over its first `keys` keys."""
        def cut(t):
            return None if t is None else t[b:b + 1]

        rows = {name: cut(getattr(self, name)) for name in self._fields[1:]}
        if self.key_bias is not None:
            rows["key_bias"] = rows["key_bias"][..., :keys]
        return self._replace(**rows)

    def requires_grad(self) -> bool:
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in self[1:])


def per_head(caller, value, name, s: HeadShapes, device, *, integer: bool, host_ok: bool = False):
    """A per-head value (a number, ``[Hq]`` or ``[B, Hq]``) as a ``[B, Hq]`` tensor; None stays None.

    ``host_ok`` (a planning argument of a call that accepts them, PLANNING_ARGS): with a CUDA
    `device` the value may be a CPU tensor, and a number becomes a CPU tensor (read by the host,
    no copy). Otherwise a number is made on `device` by a fill (no copy from pageable memory:
    legal while a CUDA graph is captured)."""
    if value is None:
        return None
    kind = "an int" if integer else "a float"
    host_ok = host_ok and torch.device(device).type == "cuda"
    if isinstance(value, bool):
        raise TypeError(f"{caller}: {name} must be {kind} or a tensor, got bool")
    if isinstance(value, numbers.Number):
        if integer and not isinstance(value, numbers.Integral):
            raise TypeError(f"{caller}: {name} must be an int or an integer tensor, got {value!r}")
        if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
            raise TypeError(f"{caller}: {name} must be a real number or a tensor, got {value!r}")
        if integer and not -2**63 <= value < 2**63:
            raise fail(caller, name, "an int64 value", value)
        # (a fill takes Python's int and float only: Fraction, Decimal, numpy scalars are converted)
        value = torch.full((), int(value) if integer else float(value), dtype=torch.int64 if integer else
                           torch.float64, device="cpu" if host_ok else device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a number or a tensor, got {type(value).__name__}")
    check_dense(caller, value, name)
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{caller}: {name} must be an integer tensor, got dtype {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise TypeError(f"{caller}: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        if not (host_ok and value.device.type == "cpu"):
            where = f"on q's device {device}" + (" or on the CPU" if host_ok else "")
            raise fail(caller, name, where, value.device)
        if value.requires_grad:
            raise fail(caller, name, f"on q's device {device} when it requires grad (its gradient is computed "
                                     "there; a CPU value is for planning only)", value.device)
    if value.dim() == 0:
        return value.expand(s.B, s.Hq)
    if value.dim() == 1 and value.shape[0] == s.Hq:
        return value.unsqueeze(0).expand(s.B, s.Hq)
    if value.dim() == 2 and value.shape[1] == s.Hq and value.shape[0] in (1, s.B):
        return value.expand(s.B, s.Hq)
    raise fail(caller, name, f"of shape [Hq] = [{s.Hq}] or [B, Hq] = [{s.B}, {s.Hq}]", tuple(value.shape))


_DEVICE_COPIES: dict = {}
_DEVICE_COPIES_MAX = 512


def on_device(t, device):
    """`t` on `device`, a host tensor copied once: later calls with the same unchanged tensor (the
    same storage, offset, shape, strides and version: a slice of a HeadSpec field per layer, a
    cache's windows) return the copy made the first time, so a step that repeats (a decode step, a
    patched model's layer) copies nothing after its first call -- nothing that would synchronise
    or break CUDA-graph capture. The tensor is held with its copy (its memory cannot be reused
    under the same key); a tensor changed in place has a new version and is copied again."""
    if t is None or t.device == torch.device(device) or torch.compiler.is_compiling():
        return None if t is None else t.to(device)
    key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version, str(device))
    hit = _DEVICE_COPIES.get(key)
    if hit is not None:
        return hit[1]
    copy = t.to(device)
    if len(_DEVICE_COPIES) >= _DEVICE_COPIES_MAX:
        _DEVICE_COPIES.pop(next(iter(_DEVICE_COPIES)))
    _DEVICE_COPIES[key] = (t, copy)
    return copy


def _float_tensor(caller, value, name, device):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a tensor, got {type(value).__name__}")
    check_dense(caller, value, name)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{caller}: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise fail(caller, name, f"on q's device {device}", value.device)


def per_head_vector(caller, value, name, s: HeadShapes, device):
    """out_scale / out_bias (``[Hq, Dv]`` or ``[B, Hq, Dv]``, Dv the values' head dim) as
    ``[B, Hq, Dv]``; None stays None."""
    if value is None:
        return None
    _float_tensor(caller, value, name, device)
    if value.dim() == 2 and tuple(value.shape) == (s.Hq, s.Dv):
        return value.unsqueeze(0).expand(s.B, s.Hq, s.Dv)
    if value.dim() == 3 and tuple(value.shape[1:]) == (s.Hq, s.Dv) and value.shape[0] in (1, s.B):
        return value.expand(s.B, s.Hq, s.Dv)
    dim = "D" if s.Dv == s.D else "Dv"  # (named as the values' head dim where it is not q's)
    raise fail(caller, name, f"of shape [Hq, {dim}] = [{s.Hq}, {s.Dv}] or [B, Hq, {dim}] = [{s.B}, {s.Hq}, {s.Dv}]",
               tuple(value.shape))


def broadcast_key_bias(caller, value, s: HeadShapes, device):
    """key_bias (anything broadcastable to ``[B, Hq, Sk]``) as ``[B, Hq, Sk]``; None stays None."""
    if value is None:
        return None
    _float_tensor(caller, value, "key_bias", device)
    try:
        if value.dim() > 3:
            raise RuntimeError
        return value.expand(s.B, s.Hq, s.Sk)
    except RuntimeError:
        raise fail(caller, "key_bias", f"broadcastable to [B, Hq, Sk] = [{s.B}, {s.Hq}, {s.Sk}]",
                   tuple(value.shape)) from None


def split_softmax_scale(caller, value, s: HeadShapes, device):
    """(the float scale of every head, the per-head tensor or None): a Python number is a float,
    anything else a per-head value; None is 1/sqrt(D)."""
    if value is None:
        return 1.0 / math.sqrt(s.D), None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise fail(caller, "softmax_scale", "a finite float", value)
        return float(value), None
    return 1.0 / math.sqrt(s.D), per_head(caller, value, "softmax_scale", s, device, integer=False)


def _shown(t):
    """The values of a per-head tensor for a message: one row when every batch row is the same view."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() >= 2 and t.shape[0] > 1 and t.stride(0) == 0:
        t = t[0]
    return t.tolist()


_READ_AS_NUMBERS = 256  # per-head tensors up to this size on the CPU are read as Python numbers


def _violated(value, test) -> bool:
    """Whether `test` (elementwise, written to work on a tensor and on a Python number alike)
    holds anywhere in `value`. A number is tested as itself, and so are the values of a small
    CPU tensor, read as one flat list (a patched model's layer checks its spec's few per-head
    values every call: reading them costs less than the tensor ops, ~3x inside a model's forward)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu" and value.numel() <= _READ_AS_NUMBERS:
            return any(map(test, value.reshape(-1).tolist()))
        return bool(test(value).any())
    return bool(test(value))


def _reads_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def check_values(caller, *, window=None, sinks=None, alpha=None, softmax_scale=None, sink_logit=None,
                 key_bias=None, device_tensors: bool = True) -> None:
    """The rules of the per-head values (Python numbers, or tensors of any shape). They read the
    data, so they are skipped while torch.compile traces (the ops re-check what they need) and
    for tensors without data (the meta device). NaN is refused where it has no meaning: it would
    give a different garbage in the kernel and in the reference.

    Host tensors and numbers are read for free. A tensor on a GPU is read with a device-to-host
    synchronisation: it is checked only with ``device_tensors`` (headops.attention and the cache
    on raw tensors; a HeadSpec's fields are checked once, where the spec is validated, and a
    patched model's calls pass False), and never while a CUDA graph is being captured (a sync
    would abort the capture; the kernels read such values as they are)."""
    if torch.compiler.is_compiling():
        return
    if device_tensors and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        device_tensors = False

    def given(t):
        if t is None:
            return False
        if not isinstance(t, torch.Tensor):
            return True
        return t.numel() > 0 and t.device.type != "meta" and (device_tensors or not _reads_device(t))

    if given(window) and _violated(window, lambda w: w == 0):
        raise fail(caller, "window", ">= 1 for every head (or < 0 for unlimited); 0 would hide every key",
                   _shown(window))
    if given(sinks) and _violated(sinks, lambda n: n < 0):
        raise fail(caller, "sinks", ">= 0 for every head", _shown(sinks))
    if given(alpha) and _violated(alpha, lambda a: (a < 0) | (a > 1) | (a != a)):
        raise fail(caller, "alpha", "in [0, 1] for every head", _shown(alpha))
    if given(softmax_scale) and _violated(softmax_scale, lambda x: (x != x) | (x == math.inf) | (x == -math.inf)):
        raise fail(caller, "softmax_scale", "finite for every head", _shown(softmax_scale))
    if given(sink_logit) and _violated(sink_logit, lambda x: x != x):
        raise fail(caller, "sink_logit", "a number (or -inf: no sink) for every head, not NaN", _shown(sink_logit))
    if given(key_bias) and bool(torch.isnan(key_bias).any()):
        raise fail(caller, "key_bias", "free of NaN (-inf masks a key)", "NaN at index "
                   f"{tuple(torch.isnan(key_bias).nonzero()[0].tolist())} of shape {tuple(key_bias.shape)}")


def head_args(caller, s: HeadShapes, device, *, softmax_scale=None, window=None, sinks=None, alpha=None,
              gate=None, sink_logit=None, out_scale=None, out_bias=None, key_bias=None, host_planning=False,
              device_values=True) -> HeadArgs:
    """Every per-head argument in the form the kernels take, checked: shapes and dtypes, then the
    rules of their values (as given: before any rounding to the accumulation dtype).

    ``host_planning`` (headops.attention): with a CUDA device, window, sinks, gate and alpha may
    be CPU tensors, and numbers given for them stay on the CPU (PLANNING_ARGS). ``device_values``:
    whether values held on a GPU are read to be checked (a sync; see check_values)."""
    default_scale, scale_t = split_softmax_scale(caller, softmax_scale, s, device)
    host = dict(host_ok=host_planning)
    args = HeadArgs(
        default_scale=default_scale, softmax_scale=scale_t,
        window=per_head(caller, window, "window", s, device, integer=True, **host),
        sinks=per_head(caller, sinks, "sinks", s, device, integer=True, **host),
        alpha=per_head(caller, alpha, "alpha", s, device, integer=False, **host),
        gate=per_head(caller, gate, "gate", s, device, integer=False, **host),
        sink_logit=per_head(caller, sink_logit, "sink_logit", s, device, integer=False),
        out_scale=per_head_vector(caller, out_scale, "out_scale", s, device),
        out_bias=per_head_vector(caller, out_bias, "out_bias", s, device),
        key_bias=broadcast_key_bias(caller, key_bias, s, device))

    def as_given(raw, normalised):  # a number is checked as itself, a tensor as normalised
        return raw if isinstance(raw, numbers.Number) else normalised

    check_values(caller, window=as_given(window, args.window), sinks=as_given(sinks, args.sinks),
                 alpha=as_given(alpha, args.alpha), softmax_scale=args.softmax_scale,
                 sink_logit=as_given(sink_logit, args.sink_logit), key_bias=key_bias, device_tensors=device_values)
    return args


def _host_integers(caller, name, value, forms: str, device):
    """`value` checked to be an integer tensor (`forms`: what it may be, for the message) on the CPU
    or q's device: what the ops read on the host to split a call (sequence_ids, key_lengths)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be {forms}, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{caller}: {name} must be an integer tensor, got {value.dtype}")
    if value.device.type != "cpu" and value.device != torch.device(device):
        raise fail(caller, name, f"on the CPU or on q's device {device}", value.device)
    return value


def sequence_ids_arg(caller, value, *, B: int, Sq: int, Sk: int, device):
    """Sequences packed into each row (``[S]`` for every row or ``[B, S]``, integers; a sequence is
    a run of one id) as the ``[B, S]`` int64 tensor the ops take, on the CPU (read there without a
    sync) or q's device (read with one device-to-host copy); None stays None. Self-attention only:
    S = Sq = Sk."""
    if value is None:
        return None
    _host_integers(caller, "sequence_ids", value, "an integer tensor ([S] or [B, S])", device)
    if Sq != Sk:
        raise fail(caller, "sequence_ids", f"given only for self-attention over packed rows (q and k of one "
                                           f"length; here {Sq} and {Sk})", describe(value))
    if value.dim() not in (1, 2) or value.shape[-1] != Sq or (value.dim() == 2 and value.shape[0] not in (1, B)):
        raise fail(caller, "sequence_ids", f"of shape [{Sq}] or [{B}, {Sq}] (one id per token; a sequence is a run "
                                           "of one id)", describe(value))
    return value.to(torch.int64).expand(B, Sq)


def key_lengths_arg(caller, value, *, B: int, Sk: int, device):
    """How many of each row's keys exist (an int, or ``[B]`` / one-element integers; a buffer's
    slots past them are neither read nor seen) as the ``[B]`` int64 tensor the ops take, on the
    CPU (read there without a sync; its values checked here) or q's device (read with one
    device-to-host copy, checked by the op); None stays None."""
    if value is None:
        return None
    if is_int(value):
        value = torch.tensor([value])
    _host_integers(caller, "key_lengths", value, "an int or an integer tensor ([B])", device)
    if value.dim() > 1 or value.numel() not in (1, B):
        raise fail(caller, "key_lengths", f"an int or of shape [{B}] (one length per row)", describe(value))
    value = value.reshape(-1).to(torch.int64).expand(B)
    if value.device.type == "cpu" and not torch.compiler.is_compiling() and value.numel() and \
            not bool(((value >= 0) & (value <= Sk)).all()):  # (traced: the op checks them when it runs)
        raise fail(caller, "key_lengths", f"in [0, {Sk}] (the keys given)", value.tolist())
    return value


# ------------------------------------------------------------------ what a HeadSparseCache keeps

PREFILLS = ("spec", "full")
ALLOCATIONS = ("uniform", "adakv", "headkv")
COMPENSATIONS = ("weighted", "unweighted")
# a HeadSparseCache's options on what it keeps (docs/DESIGN.md section 6), with their defaults; a
# HeadSpec may carry them (spec.cache_options), the cache's keywords override them
CACHE_OPTIONS = {"prefill": "spec", "allocation": "uniform", "adakv_alpha": 0.2, "observation_window": None,
                 "pool_kernel": None, "pooling": "max", "keep_observation_window": False}
POOLINGS = ("max", "avg")


def check_cache_options(caller, options) -> dict:
    """Cache options (a dict of some of CACHE_OPTIONS), checked; returns them with the defaults
    filled in.

    prefill: "spec" (each head's own visibility over the prompt) or "full" (full causal attention
        for every head, then each KV head keeps what its kind says);
    allocation: how budget heads get their sizes at prefill: "uniform" and "headkv" (each head its
        own static budget; HeadKV's come from HeadSpec.headkv), "adakv" (per prompt, row and
        layer, from the scores of all the layer's budget heads, each guaranteed adakv_alpha *
        budget tokens);
    adakv_alpha: that floor, a number in [0, 1];
    observation_window: the last queries of the prompt whose attention scores the budget heads'
        tokens (SnapKV's window; None: budget_recent, at least 1);
    pool_kernel: None (no pooling) or an odd int: each query head's scores are pooled over that
        many neighbouring keys before they are summed over its group (SnapKV uses 7);
    pooling: how: "max" (SnapKV's default) or "avg" (kvpress's SnapKVPress: the mean over the
        kernel, zeros past the prompt's ends counted);
    keep_observation_window: False (each budget head always keeps its sinks and budget_recent latest
        tokens) or True (as SnapKV and kvpress: also the observation window's tokens, the latest
        first as far as the head's size allows, before any scored token).
    """
    if not isinstance(options, dict):
        raise TypeError(f"{caller}: cache_options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(CACHE_OPTIONS))
    if unknown:
        raise ValueError(f"{caller}: unknown cache option(s) {', '.join(map(repr, unknown))} (the options are "
                         f"{', '.join(CACHE_OPTIONS)})")
    out = dict(CACHE_OPTIONS, **options)
    if out["prefill"] not in PREFILLS:
        raise fail(caller, "prefill", f"one of {', '.join(map(repr, PREFILLS))}", repr(out["prefill"]))
    if out["allocation"] not in ALLOCATIONS:
        raise fail(caller, "allocation", f"one of {', '.join(map(repr, ALLOCATIONS))}", repr(out["allocation"]))
    a = out["adakv_alpha"]
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 <= float(a) <= 1.0:
        raise fail(caller, "adakv_alpha", "a number in [0, 1]", repr(a))
    out["adakv_alpha"] = float(a)
    w = out["observation_window"]
    if w is not None and (not is_int(w) or w < 1):
        raise fail(caller, "observation_window", "None or an int >= 1", repr(w))
    k = out["pool_kernel"]
    if k is not None and (not is_int(k) or k < 1 or k % 2 == 0):
        raise fail(caller, "pool_kernel", "None or an odd int >= 1", repr(k))
    if out["pooling"] not in POOLINGS:
        raise fail(caller, "pooling", f"one of {', '.join(map(repr, POOLINGS))}", repr(out["pooling"]))
    if not isinstance(out["keep_observation_window"], bool):
        raise fail(caller, "keep_observation_window", "True or False", repr(out["keep_observation_window"]))
    return out


def check_compensation(caller, value, name="compensation"):
    """One KV head's compensation (RazorAttention): None, "weighted" (its logit carries + log n)
    or "unweighted"."""
    if value is not None and value not in COMPENSATIONS:
        raise fail(caller, name, "None, 'weighted' or 'unweighted' for every KV head", repr(value))
    return value
