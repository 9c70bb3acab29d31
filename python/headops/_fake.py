"""Fake (meta) kernels: let torch.compile trace headops ops without running them.

Each binds its call through the registered schema (``_ops.bind``), so it takes exactly the
arguments the op takes, defaults included.
"""

import torch

from . import _C
from ._args import PLANNING_ARGS
from ._ops import bind, tensors


# what the forward and backward read on the host when they are CPU tensors beside CUDA q, k, v
_HOST_OK = PLANNING_ARGS + ("sequence_ids", "key_lengths")


def _bound_on_one_device(op, args, kwargs, anchor, host_ok=()):
    # the real kernel's checks cannot run here; a tensor on another device would otherwise
    # route a CPU call to this fake kernel and return uninitialised memory. `host_ok`: arguments
    # that may be CPU tensors beside CUDA ones (the forward's planning arguments)
    a = bind(op, args, kwargs)
    device = getattr(a, anchor).device
    for name, t in tensors(a):
        if t.device != device and not (name in host_ok and device.type == "cuda" and t.device.type == "cpu"):
            raise RuntimeError(f"headops.{op}: {name} must be on {device}, got {t.device}")
    return a


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _sizes(q, k, heads_first):
    """(B, Sq, Sk, Hq, D) of a call's q and k."""
    seq, heads = (2, 1) if heads_first else (1, 2)
    return q.shape[0], q.shape[seq], k.shape[seq], q.shape[heads], q.shape[3]


@torch.library.register_fake("headops::attention_fwd")
def _attention_fwd_fake(*args, **kwargs):
    a = _bound_on_one_device("attention_fwd", args, kwargs, "q", _HOST_OK)
    B, Sq, _, Hq, D = _sizes(a.q, a.k, a.heads_first)
    acc = _acc(a.q)
    out = a.q.new_empty((B, Hq, Sq, D) if a.heads_first else (B, Sq, Hq, D))
    lse = a.q.new_empty((B, Hq, Sq), dtype=acc)
    o_stream = a.q.new_empty((B, Hq, Sq, D) if a.save_for_backward else (0,), dtype=acc)
    with_full = a.save_for_backward and a.alpha is not None
    o_full = a.q.new_empty((B, Hq, Sq, D) if with_full else (0,), dtype=acc)
    lse_full = a.q.new_empty((B, Hq, Sq) if with_full else (0,), dtype=acc)
    return out, lse, o_stream, o_full, lse_full


@torch.library.register_fake("headops::attention_bwd")
def _attention_bwd_fake(*args, **kwargs):
    a = _bound_on_one_device("attention_bwd", args, kwargs, "q", _HOST_OK)
    acc = _acc(a.q)
    grads = []
    # one gradient per name of attention_grad_inputs (the C++ order), each in its input's shape
    for wanted, name in zip(a.needs_grad, _C.attention_grad_inputs()):
        given = getattr(a, name)
        if wanted and given is not None:
            grads.append(a.q.new_empty(given.shape, dtype=a.q.dtype if name in ("q", "k", "v") else acc))
        else:
            grads.append(a.q.new_empty((0,), dtype=acc))
    return grads


@torch.library.register_fake("headops::attention_probe")
def _attention_probe_fake(*args, **kwargs):
    a = _bound_on_one_device("attention_probe", args, kwargs, "q")
    B, Sq, Sk, Hq, D = _sizes(a.q, a.k, a.heads_first)
    acc = _acc(a.q)

    def stat(wanted, *shape, dtype=torch.float32):
        return a.q.new_empty(shape if wanted else (0,), dtype=dtype)

    return (a.q.new_empty((B, Hq, Sq, D) if a.heads_first else (B, Sq, Hq, D)),
            a.q.new_empty((B, Hq, Sq), dtype=acc),
            stat(a.spans is not None, B, Hq, Sq, 0 if a.spans is None else a.spans.shape[-2]),
            stat(a.distances is not None, B, Hq, Sq, 0 if a.distances is None else a.distances.shape[0]),
            stat(a.sink_mass, B, Hq, Sq), stat(a.entropy, B, Hq, Sq),
            stat(a.topk > 0, B, Hq, Sq, a.topk, dtype=torch.int64), stat(a.topk > 0, B, Hq, Sq, a.topk),
            stat(a.key_mass_rows is not None, B, Hq, Sk))


@torch.library.register_fake("headops::kv_append")
def _kv_append_fake(*args, **kwargs):
    _bound_on_one_device("kv_append", args, kwargs, "k_new")


@torch.library.register_fake("headops::decode_attention")
def _decode_attention_fake(*args, **kwargs):
    a = _bound_on_one_device("decode_attention", args, kwargs, "q")
    return a.q.new_empty(a.q.shape)
