"""Fake (meta) kernels: let torch.compile trace headops ops without running them."""

import torch


def _check_devices(op, q, named):
    # the real kernel's checks cannot run here; a tensor on another device would otherwise
    # route a CPU call to this fake kernel and return uninitialised memory
    for name, t in named:
        if t is not None and t.device != q.device:
            raise RuntimeError(f"headops.{op}: {name} must be on {q.device}, got {t.device}")


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("headops::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, heads_first, default_scale, softmax_scale, window, sinks, alpha, key_bias,
                        sink_logit, out_scale, out_bias, gate, skip_zero_gate, skip_unused_branch, save_for_backward):
    _check_devices("attention_fwd", q, (("k", k), ("v", v), ("softmax_scale", softmax_scale), ("window", window),
                                        ("sinks", sinks), ("alpha", alpha), ("key_bias", key_bias),
                                        ("sink_logit", sink_logit), ("out_scale", out_scale),
                                        ("out_bias", out_bias), ("gate", gate)))
    B, D = q.shape[0], q.shape[3]
    Sq, Hq = (q.shape[2], q.shape[1]) if heads_first else (q.shape[1], q.shape[2])
    acc = _acc(q)
    out = q.new_empty((B, Hq, Sq, D) if heads_first else (B, Sq, Hq, D))
    lse = q.new_empty((B, Hq, Sq), dtype=acc)
    empty = q.new_empty((0,), dtype=acc)
    o_stream = q.new_empty((B, Hq, Sq, D), dtype=acc) if save_for_backward else empty
    with_full = save_for_backward and alpha is not None
    o_full = q.new_empty((B, Hq, Sq, D), dtype=acc) if with_full else q.new_empty((0,), dtype=acc)
    lse_full = q.new_empty((B, Hq, Sq), dtype=acc) if with_full else q.new_empty((0,), dtype=acc)
    return out, lse, o_stream, o_full, lse_full


@torch.library.register_fake("headops::attention_bwd")
def _attention_bwd_fake(dout, dlse, q, k, v, o_stream, lse, o_full, lse_full, causal, heads_first, default_scale,
                        softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate,
                        skipped_zero_gate, needs_grad):
    _check_devices("attention_bwd", q, (("dout", dout), ("k", k), ("v", v), ("o_stream", o_stream)))
    acc = _acc(q)
    B, D = q.shape[0], q.shape[3]
    Hq = q.shape[1] if heads_first else q.shape[2]
    Sk = k.shape[2] if heads_first else k.shape[1]
    shapes = [q.shape, k.shape, v.shape, (B, Hq), (B, Hq), (B, Hq, Sk), (B, Hq), (B, Hq, D), (B, Hq, D), (B, Hq)]
    present = [True, True, True, softmax_scale is not None, alpha is not None, key_bias is not None,
               sink_logit is not None, out_scale is not None, out_bias is not None, gate is not None]
    grads = []
    for i, (shape, here) in enumerate(zip(shapes, present)):
        wanted = bool(needs_grad[i]) and here
        dtype = q.dtype if i < 3 else acc
        grads.append(q.new_empty(shape if wanted else (0,), dtype=dtype if wanted or i >= 3 else acc))
    return grads


@torch.library.register_fake("headops::kv_append")
def _kv_append_fake(k_new, v_new, full_k, full_v, ring_k, ring_v, lengths, kv_kind, kv_index, ring_offset,
                    ring_sinks, ring_size):
    _check_devices("kv_append", k_new, (("v_new", v_new), ("ring_k", ring_k), ("ring_v", ring_v)))


@torch.library.register_fake("headops::decode_attention")
def _decode_attention_fake(q, full_k, full_v, ring_k, ring_v, lengths, kv_kind, kv_index, ring_offset, ring_sinks,
                           ring_size, causal, default_scale, softmax_scale, window, sinks, alpha, key_bias, sink_logit,
                           out_scale, out_bias, gate, split_keys):
    _check_devices("decode_attention", q, (("ring_k", ring_k), ("ring_v", ring_v)))
    return q.new_empty(q.shape)
