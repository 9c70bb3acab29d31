"""Fake (meta) kernels: let torch.compile trace headops ops without running them."""

import torch


@torch.library.register_fake("headops::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, heads_first, default_scale, softmax_scale, window, sinks, alpha, key_bias,
                        sink_logit, out_scale, out_bias, gate, skip_zero_gate):
    # the real kernel's checks cannot run here; a tensor on another device would otherwise
    # route a CPU call to this fake kernel and return uninitialised memory
    for name, t in (("k", k), ("v", v), ("softmax_scale", softmax_scale), ("window", window), ("sinks", sinks),
                    ("alpha", alpha), ("key_bias", key_bias), ("sink_logit", sink_logit), ("out_scale", out_scale),
                    ("out_bias", out_bias), ("gate", gate)):
        if t is not None and t.device != q.device:
            raise RuntimeError(f"headops.attention_fwd: {name} must be on {q.device}, got {t.device}")
    B, D = q.shape[0], q.shape[3]
    Sq, Hq = (q.shape[2], q.shape[1]) if heads_first else (q.shape[1], q.shape[2])
    out = q.new_empty((B, Hq, Sq, D) if heads_first else (B, Sq, Hq, D))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse
