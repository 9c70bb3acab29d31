"""Plain-PyTorch reference of every headops op: the oracle for tests.

It materialises the full Sq x Sk score matrix and is never a fast path. It follows
docs/DESIGN.md section 1 literally and shares no code with the kernels or with the
argument validation of ``headops.attention``, so that a bug in either cannot hide here.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "probe", "visibility"]


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
              return_lse=False, sequence_ids=None, key_lengths=None):
    """Reference of ``headops.attention`` (same arguments, same results, S x S memory)."""
    per_head = dict(softmax_scale=softmax_scale, gate=gate, window=window, sinks=sinks, alpha=alpha,
                    key_bias=key_bias, sink_logit=sink_logit, out_scale=out_scale, out_bias=out_bias)
    if sequence_ids is not None:
        return _packed(q, k, v, sequence_ids, causal=causal, layout=layout, return_lse=return_lse, **per_head)
    if key_lengths is not None:
        return _key_lengths(q, k, v, key_lengths, causal=causal, layout=layout, return_lse=return_lse, **per_head)
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

    Dv = v.shape[-1]  # a head's output: the values' head dim (which may differ from q's and k's)
    os_ = _per_head_vector(out_scale, B, Hq, Dv, compute, "out_scale")
    if os_ is not None:
        out = out * os_[:, :, None, :]
    ob = _per_head_vector(out_bias, B, Hq, Dv, compute, "out_bias")
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


def _row_args(per_head, B, Hq, Dv, keys, b, n):
    """Row b's per-head arguments (a batch of one), key_bias over its first n keys (Dv: the
    values' head dim, out_scale's and out_bias's last)."""
    shapes = {"out_scale": (B, Hq, Dv), "out_bias": (B, Hq, Dv), "key_bias": (B, Hq, keys)}

    def of_row(name, value):
        if value is None:
            return None
        t = torch.as_tensor(value).expand(*shapes.get(name, (B, Hq)))[b:b + 1]
        return t[..., :n] if name == "key_bias" else t

    return {name: of_row(name, value) for name, value in per_head.items()}


def _key_lengths(q, k, v, key_lengths, *, causal, layout, return_lse, **per_head):
    """Each row over its first key_lengths[b] keys (an int or [B]), as a batch of its own."""
    seq = 1 if layout == "bshd" else 2
    B, Sk = q.shape[0], k.shape[seq]
    Hq, Dv = q.shape[3 - seq], v.shape[3]
    lengths = torch.as_tensor(key_lengths).reshape(-1).expand(B).tolist()
    rows = [attention(q[b:b + 1], k[b:b + 1].narrow(seq, 0, n), v[b:b + 1].narrow(seq, 0, n), causal=causal,
                      layout=layout, return_lse=return_lse, **_row_args(per_head, B, Hq, Dv, Sk, b, n))
            for b, n in enumerate(lengths)]
    if return_lse:
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    return torch.cat(rows)


def _packed(q, k, v, sequence_ids, *, causal, layout, return_lse, **per_head):
    """Each run of one id in a row of sequence_ids ([S] or [B, S]) attended as a batch of its own:
    its row's per-head arguments, key_bias over its first keys (by position from its first token)."""
    seq = 1 if layout == "bshd" else 2
    B, S = q.shape[0], q.shape[seq]
    Hq, Dv = q.shape[3 - seq], v.shape[3]
    ids = torch.as_tensor(sequence_ids).expand(B, S).tolist()
    outs, lses = [], []
    for b in range(B):
        row_out, row_lse, start = [], [], 0
        while start < S:
            end = start + 1
            while end < S and ids[b][end] == ids[b][start]:
                end += 1
            n = end - start
            part = [t[b:b + 1].narrow(seq, start, n) for t in (q, k, v)]
            got = attention(*part, causal=causal, layout=layout, return_lse=return_lse,
                            **_row_args(per_head, B, Hq, Dv, S, b, n))
            row_out.append(got[0] if return_lse else got)
            if return_lse:
                row_lse.append(got[1])
            start = end
        outs.append(torch.cat(row_out, dim=seq))
        if return_lse:
            lses.append(torch.cat(row_lse, dim=-1))
    out = torch.cat(outs)
    return (out, torch.cat(lses)) if return_lse else out


def probe(q, k, v, *, causal=True, layout="bshd", softmax_scale=None, gate=None, window=None, sinks=None,
          key_bias=None, sink_logit=None, spans=None, distances=None, sink_mass=False, topk=0, entropy=False,
          key_mass_rows=None, compensation_key=None, compensation_bias=None, compensation_mass=False,
          pattern_rows=None):
    """Reference of the probe statistics (DESIGN section 5) from the materialised probabilities,
    in float64. Returns a dict: span_mass [B, Hq, Sq, n_spans], distance_mass [B, Hq, Sq, n_ranges],
    sink_mass, entropy [B, Hq, Sq], topk_index (int64) and topk_prob [B, Hq, Sq, topk], key_mass
    [B, Hq, Sk], pattern [B, Hq, n, Sk] (the probabilities of the query rows pattern_rows, ints,
    negative ones from the last); None for what was not asked.

    spans: [n, 2] or [B, n, 2] absolute key positions [start, end); distances: [n, 2] ranges
    [d0, d1) of pos_i - j; key_mass_rows: (r0, r1), the query rows whose mass each key collects.
    A head whose gate is exactly 0 is not computed: masses 0, indices -1, entropy 0. Top-k ranks
    the visible keys by logit (a -inf logit, from key_bias, is not a candidate; NaN ranks first),
    ties to the lower position; -1 and probability 0 where fewer than topk keys remain.

    compensation_key [B, Hq, D] with compensation_bias [B, Hq]: one more key every row of head
    (b, h) sees, with no position (DESIGN section 6, RazorAttention's compensation key: the mean
    of what a streaming head evicted, bias log n in the weighted form; a bias of -inf: no such key
    for that head). Its logit scale * q . k + bias enters lse and the entropy; no span, distance,
    top-k or key mass counts it (it has no position); compensation_mass [B, Hq, Sq] is its own
    probability (0 without the key).
    """
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    elif layout != "bhsd":
        raise ValueError(f"reference: layout {layout!r}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev, f64 = q.device, torch.float64
    qc = q.to(f64)
    kc = k.to(f64).repeat_interleave(Hq // Hkv, dim=1)
    scale = _per_head(1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale, B, Hq, f64, dev,
                      "softmax_scale")
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * scale[:, :, None, None]
    if key_bias is not None:
        logits = logits + key_bias.to(f64).expand(B, Hq, Sk)[:, :, None, :]
    visible = visibility(Sq, Sk, causal=causal, window=window, sinks=sinks, B=B, Hq=Hq, device=dev)
    masked = logits.masked_fill(~visible, float("-inf"))
    sink = _per_head(sink_logit, B, Hq, f64, dev, "sink_logit")
    with_sink = masked if sink is None else torch.cat([masked, sink[:, :, None, None].expand(B, Hq, Sq, 1)], -1)
    comp = None  # [B, Hq, Sq]: the compensation key's logit per row
    if compensation_key is not None:
        comp = torch.einsum("bhid,bhd->bhi", qc, compensation_key.to(f64)) * scale[:, :, None]
        comp = comp + compensation_bias.to(f64)[:, :, None]
        comp = torch.where(torch.isneginf(compensation_bias.to(f64))[:, :, None], float("-inf"), comp)
        with_sink = torch.cat([with_sink, comp[..., None]], -1)
    if with_sink.shape[-1]:
        row_max = with_sink.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        total = torch.exp(with_sink - row_max).sum(-1, keepdim=True)
        lse = torch.where(total != 0, torch.log(total) + row_max, torch.full_like(total, float("-inf")))
    else:
        lse = masked.new_full((B, Hq, Sq, 1), float("-inf"))
    seen = lse != float("-inf")  # a row that saw nothing has no probabilities (all 0)
    p = torch.where(seen & ~torch.isneginf(masked), torch.exp(masked - lse), torch.zeros_like(masked))
    p_sink = None
    if sink is not None:
        # exp(sink - lse); a +inf sink logit takes the whole row (lse +inf too): 1, not exp(inf - inf)
        whole = torch.isposinf(sink[:, :, None]) & torch.isposinf(lse[..., 0])
        p_sink = torch.where(seen[..., 0], torch.where(whole, 1.0, torch.exp(sink[:, :, None] - lse[..., 0])),
                             torch.zeros_like(lse[..., 0]))
    p_comp = None
    if comp is not None:
        p_comp = torch.where(seen[..., 0] & ~torch.isneginf(comp), torch.exp(comp - lse[..., 0]),
                             torch.zeros_like(comp))
    g = _per_head(gate, B, Hq, f64, dev, "gate")
    computed = torch.ones(B, Hq, dtype=torch.bool, device=dev) if g is None else g != 0

    def off(x, fill=0.0):
        """what a gated-off head reports"""
        mask = computed.view(B, Hq, *([1] * (x.dim() - 2)))
        return torch.where(mask, x, torch.full_like(x, fill))

    result = dict.fromkeys(("span_mass", "distance_mass", "sink_mass", "entropy", "topk_index", "topk_prob",
                            "key_mass", "compensation_mass", "pattern"))
    key = torch.arange(Sk, device=dev)
    if spans is not None:
        spans = torch.as_tensor(spans, device=dev).to(torch.int64)
        sp = spans.expand(B, *spans.shape[-2:]) if spans.dim() == 3 else spans.expand(B, *spans.shape)
        inside = (key.view(1, 1, Sk) >= sp[..., 0:1]) & (key.view(1, 1, Sk) < sp[..., 1:2])  # [B, n, Sk]
        result["span_mass"] = off(torch.einsum("bhik,bnk->bhin", p, inside.to(f64)))
    if distances is not None:
        distances = torch.as_tensor(distances, device=dev).to(torch.int64)
        pos = torch.arange(Sq, device=dev) + (Sk - Sq)
        diff = pos.view(Sq, 1) - key.view(1, Sk)  # [Sq, Sk]
        inside = (diff[None] >= distances[:, 0, None, None]) & (diff[None] < distances[:, 1, None, None])
        result["distance_mass"] = off(torch.einsum("bhik,nik->bhin", p, inside.to(f64)))
    if sink_mass:
        result["sink_mass"] = off(p_sink if p_sink is not None else torch.zeros(B, Hq, Sq, dtype=f64, device=dev))
    if entropy:
        # 0 log 0 = 0; a NaN probability (a NaN logit the row sees) stays NaN, as in lse
        terms = torch.where((p > 0) | torch.isnan(p), -p * torch.log(p), torch.zeros_like(p)).sum(-1)
        for extra in (p_sink, p_comp):
            if extra is not None:
                terms = terms + torch.where(extra > 0, -extra * torch.log(extra), torch.zeros_like(extra))
        result["entropy"] = off(terms)
    if topk:
        # rank by logit, NaN first, ties to the lower position (a stable sort keeps key order)
        rank = torch.where(torch.isnan(masked), torch.full_like(masked, float("inf")), masked)
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :topk]
        chosen = torch.gather(masked, -1, order)
        real = chosen != float("-inf")
        index = torch.where(real, order, torch.full_like(order, -1))
        prob = torch.where(real, torch.gather(p, -1, order), torch.zeros_like(chosen))
        if index.shape[-1] < topk:  # fewer keys than topk in all
            pad = topk - index.shape[-1]
            index = torch.cat([index, index.new_full((*index.shape[:-1], pad), -1)], -1)
            prob = torch.cat([prob, prob.new_zeros((*prob.shape[:-1], pad))], -1)
        result["topk_index"] = off(index, -1)
        result["topk_prob"] = off(prob)
    if key_mass_rows is not None:
        r0, r1 = key_mass_rows
        result["key_mass"] = off(p[:, :, r0:r1].sum(2))
    if compensation_mass:
        result["compensation_mass"] = off(p_comp if p_comp is not None else torch.zeros(B, Hq, Sq, dtype=f64,
                                                                                        device=dev))
    if pattern_rows is not None:
        result["pattern"] = off(p[:, :, [int(r) % Sq for r in pattern_rows]])
    return result
