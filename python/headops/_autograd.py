"""Autograd for ``torch.ops.headops.attention_fwd``: thin glue around the fused backward op.

The forward, called with ``save_for_backward=True``, returns each branch's attention average
and lse besides the output; the backward op recomputes the probabilities tile by tile from
them and returns only the gradients that are needed.
"""

import torch

# positions of the differentiable inputs of attention_fwd, in the order of attention_bwd's
# needs_grad and of its returned gradients
_GRAD_INPUTS = (0, 1, 2, 6, 9, 10, 11, 12, 13, 14)  # q k v softmax_scale alpha key_bias sink_logit out_scale out_bias gate
_NUM_INPUTS = 18


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, heads_first, default_scale, softmax_scale, window, sinks, alpha, key_bias, sink_logit,
     out_scale, out_bias, gate, skip_zero_gate, _skip_unused_branch, save_for_backward) = inputs
    _out, lse, o_stream, o_full, lse_full = output
    # an output the loss does not use must arrive as None, not as zeros: a gated-off head's
    # key loop is skipped only when no dL/dlse exists
    ctx.set_materialize_grads(False)
    ctx.saved = save_for_backward
    ctx.flags = (causal, heads_first, default_scale, skip_zero_gate)
    ctx.has_alpha = alpha is not None
    if save_for_backward:
        ctx.save_for_backward(q, k, v, o_stream, lse, o_full, lse_full, softmax_scale, window, sinks, alpha,
                              key_bias, sink_logit, out_scale, out_bias, gate)


def _backward(ctx, dout, dlse, _do_stream, _do_full, _dlse_full):
    if not ctx.saved:
        raise RuntimeError("headops.attention_fwd was called with save_for_backward=False, so it kept nothing "
                           "for a backward pass; call headops.attention (it saves what the backward needs)")
    (q, k, v, o_stream, lse, o_full, lse_full, softmax_scale, window, sinks, alpha, key_bias, sink_logit,
     out_scale, out_bias, gate) = ctx.saved_tensors
    causal, heads_first, default_scale, skip_zero_gate = ctx.flags
    needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_INPUTS]
    if dout is None:
        dout = torch.zeros_like(q)
    if ctx.has_alpha:
        dlse = None  # lse is not a result of an alpha call (no single lse)
    else:
        o_full = lse_full = None
    grads = torch.ops.headops.attention_bwd(
        dout, dlse, q, k, v, o_stream, lse, o_full, lse_full, causal, heads_first, default_scale, softmax_scale,
        window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate, skip_zero_gate,
        [int(n) for n in needs])
    result = [None] * _NUM_INPUTS
    for position, wanted, grad in zip(_GRAD_INPUTS, needs, grads):
        if wanted:
            result[position] = grad
    return tuple(result)


torch.library.register_autograd("headops::attention_fwd", _backward, setup_context=_setup_context)
