"""``headops.attention``: argument validation and the call of the fused op."""

from __future__ import annotations

import torch

from ._args import (HeadArgs, HeadShapes, check_dense, check_float_dtype, describe, fail, head_args,
                    key_lengths_arg, sequence_ids_arg)
from . import probes
from .probes import check_probe, refuse_unmeasurable, run_probe

_LAYOUTS = ("bshd", "bhsd")


CALLER = "headops.attention"


def _fail(name: str, expected: str, got) -> ValueError:
    return fail(CALLER, name, expected, got)


class _Shapes:
    def __init__(self, q, k, v, layout):
        heads_first = layout == "bhsd"
        self.heads_first = heads_first
        self.B = q.shape[0]
        self.Sq, self.Hq = (q.shape[2], q.shape[1]) if heads_first else (q.shape[1], q.shape[2])
        self.Sk, self.Hkv = (k.shape[2], k.shape[1]) if heads_first else (k.shape[1], k.shape[2])
        self.D = q.shape[3]
        self.Dv = v.shape[3]

    def heads(self) -> HeadShapes:
        return HeadShapes(B=self.B, Hq=self.Hq, Sk=self.Sk, D=self.D, Dv=self.Dv)


def _check_qkv(q, k, v, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{CALLER}: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_dense(CALLER, t, name)
        if t.dim() != 4:
            raise _fail(name, f"a 4-D tensor ({'[B, S, H, D]' if layout == 'bshd' else '[B, H, S, D]'} "
                              f"for layout {layout!r})", describe(t))
    check_float_dtype(CALLER, "q", q)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{CALLER}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise _fail(name, f"on q's device {q.device}", t.device)
    if k.shape[:3] != v.shape[:3]:
        raise _fail("v", f"the shape of k {tuple(k.shape)} but for the head dim (last dim)", tuple(v.shape))
    s = _Shapes(q, k, v, layout)
    if k.shape[0] != s.B:
        raise _fail("k", f"of q's batch size {s.B} (dim 0)", k.shape[0])
    if k.shape[3] != s.D:
        raise _fail("k", f"of q's head dim {s.D} (last dim)", k.shape[3])
    if s.D < 1:
        raise _fail("q", "a tensor with head dim >= 1", tuple(q.shape))
    if s.Dv < 1:
        raise _fail("v", "a tensor with head dim >= 1", tuple(v.shape))
    if s.Hkv < 1 or s.Hq % s.Hkv != 0:
        raise _fail("k", f"a tensor whose number of heads divides q's {s.Hq} (GQA/MQA)",
                    f"{s.Hkv} heads (shape {tuple(k.shape)}, layout {layout!r})")
    if q.device.type == "cuda" and _cuda_compiled():
        if q.dtype == torch.float64:
            raise TypeError(f"{CALLER}: float64 is CPU only; on CUDA q must be float32, bfloat16 or float16")
    elif q.device.type != "cpu":
        where = "CPU and CUDA" if _cuda_compiled() else "CPU only"
        raise ValueError(f"{CALLER}: q is on device {q.device}, which is not supported yet ({where} in "
                         "this build)")
    return s


def _cuda_compiled() -> bool:
    from . import _C
    return bool(getattr(_C, "cuda_compiled", False))


# Per-head gradients that each sum, over all of a head's rows, terms that largely cancel (key_bias:
# per key, over the rows that see it). The 16-bit forward rounds P for P V (the saved averages the
# backward reads), as SDPA does; in these sums that rounding took up to 5e-2 of their size (bf16,
# causal, S = 333, D = 128, CPU), 2x their test tolerance. A 16-bit call that learns one of them
# asks for precise_probabilities: the CPU reads P in two bfloat16 parts (and its backward dL/do for
# dP where it learns softmax_scale or key_bias), CUDA runs its generic kernel, whose P is float
# (docs/attention.md).
_CANCELLING_GRADS = ("softmax_scale", "sink_logit", "alpha", "key_bias")


def _learns_cancelling_sums(q, args: HeadArgs, grad_needed: bool) -> bool:
    return grad_needed and q.dtype in (torch.bfloat16, torch.float16) and any(
        getattr(args, n) is not None and getattr(args, n).requires_grad for n in _CANCELLING_GRADS)


def _one_head_dim(q, k, v, args: HeadArgs, s: _Shapes):
    """q, k, v (and out_scale, out_bias) at one head dim, the kernels' (they take one): values of
    another head dim than the keys' (multi-head latent attention: DeepSeek V2/V3's 192 and 128) as
    transformers' FlashAttention path takes them, the narrower side padded with zeros. Zeros in q
    and k add nothing to a logit (the default scale stays q's); the output's columns past Dv,
    from the zeros of v, are cut off by the caller. The cost: the kernels' P V and the
    backward's products with v at the wider dim, and a padded copy of the narrower tensors."""
    if s.Dv == s.D:
        return q, k, v, args
    width = max(s.D, s.Dv)

    def pad(t):
        return None if t is None else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    if s.Dv < width:
        return q, k, pad(v), args._replace(out_scale=pad(args.out_scale), out_bias=pad(args.out_bias))
    return pad(q), pad(k), v, args


def _values_head_dim(out, s: _Shapes):
    return out if out.shape[-1] == s.Dv else out[..., :s.Dv].contiguous()


def run_fused(q, k, v, args: HeadArgs, *, causal: bool, heads_first: bool, sequence_ids=None, key_lengths=None):
    """The fused op on checked q, k, v and normalised per-head arguments (and sequence_ids or
    key_lengths, as _args.sequence_ids_arg / key_lengths_arg give them): (out, lse)."""
    grad_needed = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v)) or args.requires_grad())
    # a gate (alpha) whose gradient is wanted needs the head (both branches) even at 0 (0 or 1)
    skip_zero_gate = not (grad_needed and args.gate is not None and args.gate.requires_grad)
    skip_unused_branch = not (grad_needed and args.alpha is not None and args.alpha.requires_grad)
    q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse, *_saved = torch.ops.headops.attention_fwd(q, k, v, causal, heads_first, *args.kernel_args(q.dtype),
                                                        skip_zero_gate, skip_unused_branch, grad_needed,
                                                        _learns_cancelling_sums(q, args, grad_needed),
                                                        sequence_ids=sequence_ids, key_lengths=key_lengths)
    return out, lse


def attention(q, k, v, *, causal=True, layout="bshd", softmax_scale=None, gate=None, window=None, sinks=None,
              alpha=None, key_bias=None, sink_logit=None, out_scale=None, out_bias=None, return_lse=False,
              probe=None, sequence_ids=None, key_lengths=None):
    """Multi-head attention in which every head has its own behaviour (docs/DESIGN.md section 1).

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` (layout "bshd"; "bhsd"
    swaps the middle axes); ``Hq % Hkv == 0``; out ``[B, Sq, Hq, Dv]``. Per-head arguments take a
    scalar (every head), an ``[Hq]`` or a ``[B, Hq]`` tensor; ``out_scale``/``out_bias`` take
    ``[Hq, Dv]`` or ``[B, Hq, Dv]``; ``key_bias`` anything broadcastable to ``[B, Hq, Sk]``.
    Values of another head dim than the keys' (Dv != D: multi-head latent attention) run with
    the narrower side padded with zeros to the wider dim (the kernels take one head dim): the
    work of a call at that dim, plus the padded copy.

    ``sequence_ids`` (``[S]`` or ``[B, S]`` integers; self-attention, Sq = Sk): sequences packed
    into each row, a sequence being a run of one id (``[0, 0, 0, 1, 1, 2, ...]``). Each is attended
    alone, its positions counted from its first token (its sinks, window and key_bias by
    position), as in a batch of its own: a training batch flattened without padding, as
    FlashAttention's variable-length rows; no work or memory across sequences. A CPU tensor is
    read without a sync; on a GPU one beside CUDA q costs one device-to-host copy per call. With
    a probe, each sequence is probed alone and its statistics reported at the row's positions
    (one probe call per sequence beside the packed forward: a research path).

    ``key_lengths`` (an int or ``[B]`` integers): k and v are buffers of which each row's first
    key_lengths[b] keys exist (a static KV cache's slots; FlashAttention's cache_seqlens); the
    queries are the last positions before it (bottom-right aligned to it) and the slots past it
    are neither read nor seen; their gradients are 0. Read on the host as sequence_ids are.

    Returns out (q's dtype and layout), or ``(out, lse)`` with ``return_lse=True``; lse is
    ``[B, Hq, Sq]`` float32 (float64 for float64 inputs). A head whose gate is exactly 0 is
    not computed: its output is 0 and its lse is -inf (unless the gate requires grad: then the
    head is computed, since its gradient is the head's importance).

    Differentiable in q, k, v and every floating per-head argument (a fused backward that
    recomputes the probabilities tile by tile; no S x S memory).

    ``probe=headops.Probe(...)`` also returns per-head attention statistics (docs/DESIGN.md
    section 5) from the same pass over the keys: ``(out, ProbeResult)``, or ``(out, lse,
    ProbeResult)`` with return_lse (not with alpha). The statistics carry no gradient; on the
    CPU, when one is needed, out comes from the differentiable op, at the cost of a second
    pass. CUDA tensors: out and lse are the CUDA forward's, the statistics recomputed on the
    device from that lse by blocks of query rows (docs/probes.md, "On a GPU").

    CUDA: window, sinks, gate and alpha may be CPU tensors beside CUDA q, k, v (numbers given
    for them stay on the CPU too); the host plans the work from them without a device-to-host
    sync (docs/cuda.md, "Sync-free calls"). Given as CUDA tensors they work too, at the cost
    of one small copy that waits for the stream. Values held on the GPU (alpha, softmax_scale,
    sink_logit, key_bias) are checked with a sync, except while a CUDA graph is captured.
    """
    return attention_with(q, k, v, causal=causal, layout=layout, softmax_scale=softmax_scale, gate=gate,
                          window=window, sinks=sinks, alpha=alpha, key_bias=key_bias, sink_logit=sink_logit,
                          out_scale=out_scale, out_bias=out_bias, return_lse=return_lse, probe=probe,
                          sequence_ids=sequence_ids, key_lengths=key_lengths)


def attention_with(q, k, v, *, causal=True, layout="bshd", softmax_scale=None, gate=None, window=None, sinks=None,
                   alpha=None, key_bias=None, sink_logit=None, out_scale=None, out_bias=None, return_lse=False,
                   probe=None, sequence_ids=None, key_lengths=None, device_values=True):
    """headops.attention; ``device_values=False`` skips reading the values of per-head tensors
    held on a GPU (no sync): for callers whose values were checked already (a patched model's
    HeadSpec, validated by patch/set_spec)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"{CALLER}: layout must be 'bshd' or 'bhsd', got {layout!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{CALLER}: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{CALLER}: return_lse must be a bool, got {type(return_lse).__name__}")
    s = _check_qkv(q, k, v, layout)
    if return_lse and alpha is not None:
        raise ValueError(f"{CALLER}: return_lse=True cannot be combined with alpha: a mixture of two softmaxes has "
                         "no single lse")
    if probe is not None:
        refuse_unmeasurable(CALLER, alpha)
        if key_lengths is not None:
            raise NotImplementedError(f"{CALLER}: probes over the key buffers of a static cache (key_lengths); probe "
                                      "over the keys that exist")
    if sequence_ids is not None and key_lengths is not None:
        raise ValueError(f"{CALLER}: sequence_ids (packed self-attention) and key_lengths cannot be combined")
    sequence_ids = sequence_ids_arg(CALLER, sequence_ids, B=s.B, Sq=s.Sq, Sk=s.Sk, device=q.device)
    key_lengths = key_lengths_arg(CALLER, key_lengths, B=s.B, Sk=s.Sk, device=q.device)
    args = head_args(CALLER, s.heads(), q.device, softmax_scale=softmax_scale, window=window, sinks=sinks,
                     alpha=alpha, gate=gate, sink_logit=sink_logit, out_scale=out_scale, out_bias=out_bias,
                     key_bias=key_bias, host_planning=True, device_values=device_values)
    q, k, v, args = _one_head_dim(q, k, v, args, s)
    if probe is None:
        out, lse = run_fused(q, k, v, args, causal=causal, heads_first=s.heads_first, sequence_ids=sequence_ids,
                             key_lengths=key_lengths)
        out = _values_head_dim(out, s)
        return (out, lse) if return_lse else out
    request = check_probe(CALLER, probe, B=s.B, Sq=s.Sq, Sk=s.Sk)
    if sequence_ids is not None:  # (each sequence probed alone; out and lse are the packed forward's)
        stats = probes.run_probe_packed(q, k, v, args, request, sequence_ids, causal=causal,
                                        heads_first=s.heads_first)
        out, lse = run_fused(q, k, v, args, causal=causal, heads_first=s.heads_first, sequence_ids=sequence_ids)
        out = _values_head_dim(out, s)
        return (out, lse, stats) if return_lse else (out, stats)
    out, lse, stats = run_probe(q, k, v, args, request, causal=causal, heads_first=s.heads_first)
    # the probe kernel's out carries no gradient (the row-block path's is the fused forward's)
    if (probes.kernel_probes(q.device) and torch.is_grad_enabled()
            and (any(t.requires_grad for t in (q, k, v)) or args.requires_grad())):
        out, lse = run_fused(q, k, v, args, causal=causal, heads_first=s.heads_first)
    out = _values_head_dim(out, s)
    return (out, lse, stats) if return_lse else (out, stats)
