"""Autograd for ``torch.ops.headops.attention_fwd``: thin glue around the fused backward op.

The forward, called with ``save_for_backward=True``, returns each branch's attention average
and lse besides the output; the backward op recomputes the probabilities tile by tile from
them and returns only the gradients that are needed. Arguments travel by schema name: the
backward op takes the forward's arguments under the same names, and its gradients come in the
order of ``_C.attention_grad_inputs()`` (the C++ table).
"""

import functools
import warnings

import torch

from . import _C
from ._ops import argument_names

_FORWARD, _BACKWARD = "attention_fwd", "attention_bwd"


@functools.cache
def _shared_arguments():
    """The forward's arguments the backward op takes again, as (tensor names, other names)."""
    shared = [n for n in argument_names(_FORWARD) if n in argument_names(_BACKWARD)]
    schema = torch.ops.headops.attention_fwd.default._schema
    is_tensor = {a.name: "Tensor" in str(a.type) for a in schema.arguments}
    return tuple(n for n in shared if is_tensor[n]), tuple(n for n in shared if not is_tensor[n])


@functools.cache
def _gradient_positions():
    """Where each of the backward op's gradients goes among the forward's inputs."""
    return tuple(argument_names(_FORWARD).index(n) for n in _C.attention_grad_inputs())


def _setup_context(ctx, inputs, output):
    given = dict(zip(argument_names(_FORWARD), inputs))
    _out, lse, o_stream, o_full, lse_full = output
    # an output the loss does not use must arrive as None, not as zeros: a gated-off head's
    # key loop is skipped only when no dL/dlse exists
    ctx.set_materialize_grads(False)
    ctx.saved = given["save_for_backward"]
    ctx.has_alpha = given["alpha"] is not None
    tensor_names, other_names = _shared_arguments()
    ctx.tensor_names = tensor_names
    ctx.others = {n: given[n] for n in other_names}
    if ctx.saved:
        ctx.save_for_backward(o_stream, lse, o_full, lse_full, *(given[n] for n in tensor_names))


@functools.cache
def warn_cuda_backward() -> None:
    """Once per process: the CUDA backward's cost, which nothing else would tell."""
    warnings.warn("headops: the CUDA backward is a reference-speed kernel (float32, a warp per query row and per "
                  "key; no tensor cores), far slower than the CUDA forward and than SDPA's backward; a tensor-core "
                  "backward is not written yet (docs/cuda.md)", stacklevel=3)


def _backward(ctx, dout, dlse, _do_stream, _do_full, _dlse_full):
    if not ctx.saved:
        raise RuntimeError("headops.attention_fwd was called with save_for_backward=False, so it kept nothing "
                           "for a backward pass; call headops.attention (it saves what the backward needs)")
    o_stream, lse, o_full, lse_full, *shared = ctx.saved_tensors
    args = dict(zip(ctx.tensor_names, shared), **ctx.others)
    if args["q"].is_cuda:
        warn_cuda_backward()
    positions = _gradient_positions()
    needs = [bool(ctx.needs_input_grad[i]) for i in positions]
    if dout is None:
        dout = torch.zeros_like(args["q"])
    if ctx.has_alpha:
        dlse = None  # lse is not a result of an alpha call (no single lse)
    else:
        o_full = lse_full = None
    grads = torch.ops.headops.attention_bwd(
        dout=dout, dlse=dlse, o_stream=o_stream, lse=lse, o_full=o_full, lse_full=lse_full,
        needs_grad=[int(n) for n in needs], **args)
    result = [None] * len(ctx.needs_input_grad)
    for position, wanted, grad in zip(positions, needs, grads):
        if wanted:
            result[position] = grad
    return tuple(result)


torch.library.register_autograd("headops::attention_fwd", _backward, setup_context=_setup_context)
