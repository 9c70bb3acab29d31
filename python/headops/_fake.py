"""Fake (meta) kernels: let torch.compile trace headops ops without running them."""

import torch


@torch.library.register_fake("headops::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, heads_first, default_scale, softmax_scale, window, sinks, alpha, key_bias,
                        sink_logit, out_scale, out_bias, gate, skip_zero_gate):
    B, D = q.shape[0], q.shape[3]
    Sq, Hq = (q.shape[2], q.shape[1]) if heads_first else (q.shape[1], q.shape[2])
    out = q.new_empty((B, Hq, Sq, D) if heads_first else (B, Sq, Hq, D))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse
