"""Plain-PyTorch reference of every headops op: the oracle for tests.

It materialises the full Sq x Sk score matrix and is never a fast path. It follows
docs/DESIGN.md section 1 literally and shares no code with the kernels or with the
argument validation of ``headops.attention``, so that a bug in either cannot hide here.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "visibility"]


def _per_head(value, B: int, Hq: int, dtype, device, name: str):
    """[B, Hq] tensor from a scalar, an [Hq] or a [B, Hq] value (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype)
    else:  # a Python number: straight to the target dtype (no float32 rounding on the way)
        t = torch.tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(Hq)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape[-1] != Hq or t.dim() != 2 or t.shape[0] not in (1, B):
        raise ValueError(f"reference: {name} has shape {tuple(t.shape)}")
    return t.expand(B, Hq)


def _per_head_vector(value, B: int, Hq: int, D: int, dtype, name: str):
    """[B, Hq, D] from an [Hq, D] or [B, Hq, D] tensor."""
    if value is None:
        return None
    t = value.to(dtype)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[1:] != (Hq, D) or t.shape[0] not in (1, B):
        raise ValueError(f"reference: {name} has shape {tuple(t.shape)}")
    return t.expand(B, Hq, D)


def visibility(Sq: int, Sk: int, *, causal: bool, window=None, sinks=None, B: int = 1, Hq: int = 1,
               device=None) -> torch.Tensor:
    """Boolean [B, Hq, Sq, Sk]: key j is visible to query i (DESIGN section 1, 'Visibility')."""
    pos = torch.arange(Sq, device=device) + (Sk - Sq)  # bottom-right aligned query positions
    key = torch.arange(Sk, device=device)
    diff = (pos[:, None] - key[None, :]).expand(B, Hq, Sq, Sk)  # pos_i - j
    causal_ok = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    w = _per_head(window, B, Hq, torch.int64, device, "window")
    if w is None:
        in_window = torch.ones_like(diff, dtype=torch.bool)
    else:
        w = w[:, :, None, None]
        distance = diff if causal else diff.abs()
        in_window = (w < 0) | (distance < w)
    s = _per_head(sinks, B, Hq, torch.int64, device, "sinks")
    in_sinks = torch.zeros_like(diff, dtype=torch.bool) if s is None else key.view(1, 1, 1, Sk) < s[:, :, None, None]
    return causal_ok & (in_window | in_sinks)


def _softmax_average(logits, visible, v, sink_logit):
    """Attention average and lse of one softmax branch; rows with nothing visible give 0, -inf."""
    masked = logits.masked_fill(~visible, float("-inf"))
    if sink_logit is not None:
        # a virtual key with this logit and a zero value
        masked = torch.cat([masked, sink_logit[:, :, None, None].expand(*masked.shape[:3], 1)], dim=-1)
    if masked.shape[-1] == 0:  # no keys at all (Sk = 0, no sink): every row sees nothing
        return v.new_zeros(*masked.shape[:3], v.shape[-1]), masked.new_full(masked.shape[:3], float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(masked - row_max)
    total = p.sum(dim=-1, keepdim=True)
    if sink_logit is not None:
        p = p[..., :-1]
    finite_v = torch.isfinite(v)
    if bool(finite_v.all()):
        out = torch.matmul(p, v)
    else:  # a NaN/inf value enters only the rows that see its key with a logit above -inf
        out = torch.matmul(p, torch.where(finite_v, v, torch.zeros_like(v)))
        seen = ~torch.isneginf(masked[..., :v.shape[-2]])  # invisible or key_bias -inf: not seen
        for b, h, j, d in (~finite_v).expand(*p.shape[:2], *v.shape[-2:]).nonzero().tolist():
            out[b, h, :, d] = out[b, h, :, d] + torch.where(seen[b, h, :, j], p[b, h, :, j] * v[b, h, j, d], 0.0)
    # total is 0 for a row that saw nothing; NaN (from NaN or inf inputs) stays NaN
    out = out / torch.where(total != 0, total, torch.ones_like(total))
    lse = torch.where(total != 0, torch.log(total) + row_max, torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def _unless_weight_zero(x, weight):
    """x, with its NaN/inf replaced by 0 where `weight` is exactly 0 (the gradient with respect
    to the weight stays x where x is finite)."""
    return torch.where(weight == 0, x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), x)


def attention(q, k, v, *, causal=True, layout="bshd", softmax_scale=None, gate=None, window=None,
              sinks=None, alpha=None, key_bias=None, sink_logit=None, out_scale=None, out_bias=None,
              return_lse=False):
    """Reference of ``headops.attention`` (same arguments, same results, S x S memory)."""
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    elif layout != "bhsd":
        raise ValueError(f"reference: layout {layout!r}")
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qc = q.to(compute)
    kc = k.to(compute).repeat_interleave(group, dim=1)
    vc = v.to(compute).repeat_interleave(group, dim=1)
    dev = q.device

    scale = _per_head(1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale, B, Hq, compute, dev,
                      "softmax_scale")
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * scale[:, :, None, None]
    if key_bias is not None:
        logits = logits + key_bias.to(compute).expand(B, Hq, Sk)[:, :, None, :]
    sink = _per_head(sink_logit, B, Hq, compute, dev, "sink_logit")

    streaming = visibility(Sq, Sk, causal=causal, window=window, sinks=sinks, B=B, Hq=Hq, device=dev)
    out, lse = _softmax_average(logits, streaming, vc, sink)
    a = _per_head(alpha, B, Hq, compute, dev, "alpha")
    if a is not None:
        full = visibility(Sq, Sk, causal=causal, B=B, Hq=Hq, device=dev)
        out_full, _ = _softmax_average(logits, full, vc, sink)
        a = a[:, :, None, None]
        # a branch whose weight is exactly 0 is not part of the head (the kernels skip it): its
        # NaN/inf, from NaN/inf inputs only it sees, must not reach the output (0 * NaN)
        out = a * _unless_weight_zero(out_full, a) + (1 - a) * _unless_weight_zero(out, 1 - a)
        lse = None  # a mixture of two softmaxes has no single lse

    os_ = _per_head_vector(out_scale, B, Hq, D, compute, "out_scale")
    if os_ is not None:
        out = out * os_[:, :, None, :]
    ob = _per_head_vector(out_bias, B, Hq, D, compute, "out_bias")
    if ob is not None:
        out = out + ob[:, :, None, :]
    g = _per_head(gate, B, Hq, compute, dev, "gate")
    if g is not None:
        g = g[:, :, None, None]
        out = _unless_weight_zero(out, g) * g  # a gate of exactly 0 gives exactly 0, NaN inputs included

    out = out.to(out_dtype)
    if layout == "bshd":
        out = out.transpose(1, 2)
    if return_lse:
        if lse is None:
            raise ValueError("reference: return_lse=True together with alpha")
        return out, lse.to(torch.float64 if compute == torch.float64 else torch.float32)
    return out
