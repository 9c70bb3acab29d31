"""``headops.attention``: argument validation and the call of the fused op."""

from __future__ import annotations

import math
import numbers

import torch

_LAYOUTS = ("bshd", "bhsd")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fail(name: str, expected: str, got) -> ValueError:
    return ValueError(f"headops.attention: {name} must be {expected}, got {got}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"


class _Shapes:
    def __init__(self, q, k, layout):
        heads_first = layout == "bhsd"
        self.heads_first = heads_first
        self.B = q.shape[0]
        self.Sq, self.Hq = (q.shape[2], q.shape[1]) if heads_first else (q.shape[1], q.shape[2])
        self.Sk, self.Hkv = (k.shape[2], k.shape[1]) if heads_first else (k.shape[1], k.shape[2])
        self.D = q.shape[3]


def _check_dense(t, name):
    """Sparse, nested and other non-strided tensors have no strides to read: a TypeError naming them."""
    if t.is_nested or t.layout != torch.strided:
        raise TypeError(f"headops.attention: {name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")


def _check_qkv(q, k, v, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"headops.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check_dense(t, name)
        if t.dim() != 4:
            raise _fail(name, f"a 4-D tensor ({'[B, S, H, D]' if layout == 'bshd' else '[B, H, S, D]'} "
                              f"for layout {layout!r})", _describe(t))
    if q.dtype not in _DTYPES:
        raise TypeError(f"headops.attention: q must be float32, float64, bfloat16 or float16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"headops.attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise _fail(name, f"on q's device {q.device}", t.device)
    if k.shape != v.shape:
        raise _fail("v", f"the shape of k {tuple(k.shape)}", tuple(v.shape))
    s = _Shapes(q, k, layout)
    if k.shape[0] != s.B:
        raise _fail("k", f"of q's batch size {s.B} (dim 0)", k.shape[0])
    if k.shape[3] != s.D:
        raise _fail("k", f"of q's head dim {s.D} (last dim)", k.shape[3])
    if s.D < 1:
        raise _fail("q", "a tensor with head dim >= 1", tuple(q.shape))
    if s.Hkv < 1 or s.Hq % s.Hkv != 0:
        raise _fail("k", f"a tensor whose number of heads divides q's {s.Hq} (GQA/MQA)",
                    f"{s.Hkv} heads (shape {tuple(k.shape)}, layout {layout!r})")
    if q.device.type == "cuda" and _cuda_compiled():
        if q.dtype == torch.float64:
            raise TypeError("headops.attention: float64 is CPU only; on CUDA q must be float32, bfloat16 or float16")
    elif q.device.type != "cpu":
        where = "CPU and CUDA" if _cuda_compiled() else "CPU only"
        raise ValueError(f"headops.attention: q is on device {q.device}, which is not supported yet ({where} in "
                         "this build)")
    return s


def _cuda_compiled() -> bool:
    from . import _C
    return bool(getattr(_C, "cuda_compiled", False))


def _scalar_or_tensor(value, name, s: _Shapes, device, *, integer: bool):
    """Validates a per-head value and returns it as a [B, Hq] tensor (an expand, not a copy)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"headops.attention: {name} must be {'an int' if integer else 'a float'} or a tensor, "
                        f"got bool")
    if isinstance(value, numbers.Number):
        if integer and not isinstance(value, numbers.Integral):
            raise TypeError(f"headops.attention: {name} must be an int or an integer tensor, got {value!r}")
        if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
            raise TypeError(f"headops.attention: {name} must be a real number or a tensor, got {value!r}")
        if integer and not -2**63 <= value < 2**63:
            raise _fail(name, "an int64 value", value)
        value = torch.tensor(value, dtype=torch.int64 if integer else torch.float64, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"headops.attention: {name} must be a number or a tensor, got {type(value).__name__}")
    _check_dense(value, name)
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"headops.attention: {name} must be an integer tensor, got dtype {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise TypeError(f"headops.attention: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise _fail(name, f"on q's device {device}", value.device)
    if value.dim() == 0:
        value = value.reshape(1).expand(s.Hq)
    if value.dim() == 1:
        if value.shape[0] != s.Hq:
            raise _fail(name, f"of shape [Hq] = [{s.Hq}] or [B, Hq] = [{s.B}, {s.Hq}]", tuple(value.shape))
        return value.unsqueeze(0).expand(s.B, s.Hq)
    if value.dim() == 2 and value.shape[1] == s.Hq and value.shape[0] in (1, s.B):
        return value.expand(s.B, s.Hq)
    raise _fail(name, f"of shape [Hq] = [{s.Hq}] or [B, Hq] = [{s.B}, {s.Hq}]", tuple(value.shape))


def _check_float_tensor(value, name, device):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"headops.attention: {name} must be a tensor, got {type(value).__name__}")
    _check_dense(value, name)
    if not value.dtype.is_floating_point:
        raise TypeError(f"headops.attention: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise _fail(name, f"on q's device {device}", value.device)


def _per_head_vector(value, name, s: _Shapes, device):
    if value is None:
        return None
    _check_float_tensor(value, name, device)
    if value.dim() == 2 and tuple(value.shape) == (s.Hq, s.D):
        return value.unsqueeze(0).expand(s.B, s.Hq, s.D)
    if value.dim() == 3 and tuple(value.shape[1:]) == (s.Hq, s.D) and value.shape[0] in (1, s.B):
        return value.expand(s.B, s.Hq, s.D)
    raise _fail(name, f"of shape [Hq, D] = [{s.Hq}, {s.D}] or [B, Hq, D] = [{s.B}, {s.Hq}, {s.D}]",
                tuple(value.shape))


def _key_bias(value, s: _Shapes, device):
    if value is None:
        return None
    _check_float_tensor(value, "key_bias", device)
    try:
        if value.dim() > 3:
            raise RuntimeError
        return value.expand(s.B, s.Hq, s.Sk)
    except RuntimeError:
        raise _fail("key_bias", f"broadcastable to [B, Hq, Sk] = [{s.B}, {s.Hq}, {s.Sk}]",
                    tuple(value.shape)) from None


def _check_values(*, window=None, sinks=None, alpha=None, softmax_scale=None, sink_logit=None, key_bias=None):
    """Value checks of validated per-head tensors (they read the data: skipped while torch.compile
    traces; the op re-checks what it needs). NaN is refused where it has no meaning: it would give
    a different garbage in the kernel and in the reference."""
    if torch.compiler.is_compiling():
        return
    if window is not None and window.numel() and bool((window == 0).any()):
        raise _fail("window", ">= 1 for every head (or < 0 for unlimited); 0 would hide every key",
                    window[0].tolist() if window.shape[0] == 1 else window.tolist())
    if sinks is not None and sinks.numel() and bool((sinks < 0).any()):
        raise _fail("sinks", ">= 0 for every head", sinks.tolist())
    if alpha is not None and alpha.numel() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
        raise _fail("alpha", "in [0, 1] for every head", alpha.tolist())
    if softmax_scale is not None and softmax_scale.numel() and not bool(torch.isfinite(softmax_scale).all()):
        raise _fail("softmax_scale", "finite for every head", softmax_scale.tolist())
    if sink_logit is not None and sink_logit.numel() and bool(torch.isnan(sink_logit).any()):
        raise _fail("sink_logit", "a number (or -inf: no sink) for every head, not NaN", sink_logit.tolist())
    if key_bias is not None and key_bias.numel() and bool(torch.isnan(key_bias).any()):
        raise _fail("key_bias", "free of NaN (-inf masks a key)", "NaN at index "
                    f"{tuple(torch.isnan(key_bias).nonzero()[0].tolist())} of shape {tuple(key_bias.shape)}")


def _requires_grad(*values) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in values)


def attention(q, k, v, *, causal=True, layout="bshd", softmax_scale=None, gate=None, window=None, sinks=None,
              alpha=None, key_bias=None, sink_logit=None, out_scale=None, out_bias=None, return_lse=False):
    """Multi-head attention in which every head has its own behaviour (docs/DESIGN.md section 1).

    q ``[B, Sq, Hq, D]``, k and v ``[B, Sk, Hkv, D]`` (layout "bshd"; "bhsd" swaps the middle
    axes); ``Hq % Hkv == 0``. Per-head arguments take a scalar (every head), an ``[Hq]`` or a
    ``[B, Hq]`` tensor; ``out_scale``/``out_bias`` take ``[Hq, D]`` or ``[B, Hq, D]``;
    ``key_bias`` anything broadcastable to ``[B, Hq, Sk]``.

    Returns out (q's dtype and layout), or ``(out, lse)`` with ``return_lse=True``; lse is
    ``[B, Hq, Sq]`` float32 (float64 for float64 inputs). A head whose gate is exactly 0 is
    not computed: its output is 0 and its lse is -inf (unless the gate requires grad: then the
    head is computed, since its gradient is the head's importance).

    Differentiable in q, k, v and every floating per-head argument (a fused backward that
    recomputes the probabilities tile by tile; no S x S memory).
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"headops.attention: layout must be 'bshd' or 'bhsd', got {layout!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"headops.attention: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"headops.attention: return_lse must be a bool, got {type(return_lse).__name__}")
    s = _check_qkv(q, k, v, layout)
    device = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if return_lse and alpha is not None:
        raise ValueError("headops.attention: return_lse=True cannot be combined with alpha: a mixture of two "
                         "softmaxes has no single lse")

    default_scale = 1.0 / math.sqrt(s.D)
    scale_t = None
    if softmax_scale is not None:
        if isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool):
            default_scale = float(softmax_scale)
            if not math.isfinite(default_scale):
                raise _fail("softmax_scale", "a finite float", softmax_scale)
        else:
            scale_t = _scalar_or_tensor(softmax_scale, "softmax_scale", s, device, integer=False)
    window_t = _scalar_or_tensor(window, "window", s, device, integer=True)
    sinks_t = _scalar_or_tensor(sinks, "sinks", s, device, integer=True)
    alpha_t = _scalar_or_tensor(alpha, "alpha", s, device, integer=False)
    gate_t = _scalar_or_tensor(gate, "gate", s, device, integer=False)
    sink_t = _scalar_or_tensor(sink_logit, "sink_logit", s, device, integer=False)
    os_t = _per_head_vector(out_scale, "out_scale", s, device)
    ob_t = _per_head_vector(out_bias, "out_bias", s, device)
    kb_t = _key_bias(key_bias, s, device)

    _check_values(window=window_t, sinks=sinks_t, alpha=alpha_t, softmax_scale=scale_t, sink_logit=sink_t,
                  key_bias=key_bias)

    grad_needed = torch.is_grad_enabled() and _requires_grad(q, k, v, scale_t, alpha_t, gate_t, sink_t, os_t, ob_t,
                                                             kb_t)
    # a gate (alpha) whose gradient is wanted needs the head (both branches) even at 0 (0 or 1)
    skip_zero_gate = not (grad_needed and gate_t is not None and gate_t.requires_grad)
    skip_unused_branch = not (grad_needed and alpha_t is not None and alpha_t.requires_grad)

    def to_acc(t):
        return None if t is None else t.to(acc)

    def to_long(t):
        return None if t is None else t.to(torch.int64)

    q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse, *_saved = torch.ops.headops.attention_fwd(
        q, k, v, causal, s.heads_first, default_scale, to_acc(scale_t), to_long(window_t), to_long(sinks_t),
        to_acc(alpha_t), to_acc(kb_t), to_acc(sink_t), to_acc(os_t), to_acc(ob_t), to_acc(gate_t), skip_zero_gate,
        skip_unused_branch, grad_needed)
    return (out, lse) if return_lse else out
