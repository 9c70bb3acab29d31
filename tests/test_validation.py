"""Bad inputs: headops.attention raises ValueError/TypeError naming the argument; the raw op
torch.ops.headops.attention_fwd raises RuntimeError (TORCH_CHECK) naming it, and never crashes."""

import math
import re

import pytest
import torch

import headops

B, S, HQ, HKV, D = 2, 5, 4, 2, 8


def qkv(dtype=torch.float32):
    return (torch.randn(B, S, HQ, D, dtype=dtype), torch.randn(B, S, HKV, D, dtype=dtype),
            torch.randn(B, S, HKV, D, dtype=dtype))


def ones(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


def long(*values):
    return torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------- headops.attention

q0, k0, v0 = qkv()

BAD_INPUTS = {
    # name: (exception, word the message must contain, q, k, v, kwargs)
    "q_rank3": (ValueError, "q", q0[0], k0, v0, {}),
    "k_rank5": (ValueError, "k", q0, k0[None], v0, {}),
    "v_rank2": (ValueError, "v", q0, k0, v0[0, 0], {}),
    "q_not_tensor": (TypeError, "q", q0.tolist(), k0, v0, {}),
    "layout_unknown": (ValueError, "layout", q0, k0, v0, dict(layout="bsdh")),
    "layout_upper": (ValueError, "layout", q0, k0, v0, dict(layout="BSHD")),
    "causal_not_bool": (TypeError, "causal", q0, k0, v0, dict(causal=1)),
    "heads_not_divisible": (ValueError, "k", q0, torch.randn(B, S, 3, D), torch.randn(B, S, 3, D), {}),
    "more_kv_heads_than_q": (ValueError, "k", q0, torch.randn(B, S, 8, D), torch.randn(B, S, 8, D), {}),
    "k_v_shape_mismatch": (ValueError, "v", q0, k0, torch.randn(B, S + 1, HKV, D), {}),
    "k_batch_mismatch": (ValueError, "k", q0, torch.randn(B + 1, S, HKV, D), torch.randn(B + 1, S, HKV, D), {}),
    "k_head_dim_mismatch": (ValueError, "k", q0, torch.randn(B, S, HKV, D + 1), torch.randn(B, S, HKV, D + 1), {}),
    "q_head_dim_zero": (ValueError, "q", torch.randn(B, S, HQ, 0), torch.randn(B, S, HKV, 0),
                        torch.randn(B, S, HKV, 0), {}),
    "k_dtype_mismatch": (TypeError, "k", q0, k0.double(), v0, {}),
    "v_dtype_mismatch": (TypeError, "v", q0, k0, v0.half(), {}),
    "integer_q": (TypeError, "q", q0.long(), k0.long(), v0.long(), {}),
    "bool_q": (TypeError, "q", q0 > 0, k0 > 0, v0 > 0, {}),
    "k_on_meta": (ValueError, "k", q0, k0.to("meta"), v0, {}),
    "v_on_meta": (ValueError, "v", q0, k0, v0.to("meta"), {}),
    "window_float": (TypeError, "window", q0, k0, v0, dict(window=2.0)),
    "window_float_tensor": (TypeError, "window", q0, k0, v0, dict(window=torch.tensor([1.0, 2, 3, 4]))),
    "window_bool": (TypeError, "window", q0, k0, v0, dict(window=True)),
    "window_zero": (ValueError, "window", q0, k0, v0, dict(window=0)),
    "window_contains_zero": (ValueError, "window", q0, k0, v0, dict(window=long(1, 0, 3, -1))),
    "window_per_batch_zero": (ValueError, "window", q0, k0, v0, dict(window=torch.tensor([[1, 2, 3, 4], [5, 6, 0, 8]]))),
    "window_wrong_length": (ValueError, "window", q0, k0, v0, dict(window=long(1, 2, 3))),
    "sinks_negative": (ValueError, "sinks", q0, k0, v0, dict(sinks=-1)),
    "sinks_contains_negative": (ValueError, "sinks", q0, k0, v0, dict(sinks=long(0, 2, -3, 1))),
    "sinks_float": (TypeError, "sinks", q0, k0, v0, dict(sinks=1.5)),
    "alpha_above_one": (ValueError, "alpha", q0, k0, v0, dict(alpha=1.5)),
    "alpha_negative": (ValueError, "alpha", q0, k0, v0, dict(alpha=torch.tensor([0.5, -0.1, 0.2, 1.0]))),
    "alpha_nan": (ValueError, "alpha", q0, k0, v0, dict(alpha=float("nan"))),
    "alpha_tensor_nan": (ValueError, "alpha", q0, k0, v0, dict(alpha=torch.tensor([0.5, math.nan, 0.2, 1.0]))),
    "alpha_integer_tensor": (TypeError, "alpha", q0, k0, v0, dict(alpha=long(0, 1, 0, 1))),
    "gate_wrong_length": (ValueError, "gate", q0, k0, v0, dict(gate=ones(HQ + 1))),
    "gate_wrong_batch": (ValueError, "gate", q0, k0, v0, dict(gate=ones(B + 1, HQ))),
    "gate_rank3": (ValueError, "gate", q0, k0, v0, dict(gate=ones(1, B, HQ))),
    "gate_integer": (TypeError, "gate", q0, k0, v0, dict(gate=long(1, 0, 1, 1))),
    "gate_list": (TypeError, "gate", q0, k0, v0, dict(gate=[1.0] * HQ)),
    "softmax_scale_wrong_length": (ValueError, "softmax_scale", q0, k0, v0, dict(softmax_scale=ones(2))),
    "softmax_scale_nan": (ValueError, "softmax_scale", q0, k0, v0, dict(softmax_scale=float("nan"))),
    "softmax_scale_inf": (ValueError, "softmax_scale", q0, k0, v0, dict(softmax_scale=float("inf"))),
    "softmax_scale_string": (TypeError, "softmax_scale", q0, k0, v0, dict(softmax_scale="0.1")),
    "sink_logit_wrong_length": (ValueError, "sink_logit", q0, k0, v0, dict(sink_logit=ones(HQ * 2))),
    "sink_logit_integer_tensor": (TypeError, "sink_logit", q0, k0, v0, dict(sink_logit=long(0, 0, 0, 0))),
    "out_scale_1d": (ValueError, "out_scale", q0, k0, v0, dict(out_scale=ones(D))),
    "out_scale_wrong_D": (ValueError, "out_scale", q0, k0, v0, dict(out_scale=ones(HQ, D + 1))),
    "out_scale_wrong_batch": (ValueError, "out_scale", q0, k0, v0, dict(out_scale=ones(B + 1, HQ, D))),
    "out_scale_not_tensor": (TypeError, "out_scale", q0, k0, v0, dict(out_scale=2.0)),
    "out_bias_wrong_heads": (ValueError, "out_bias", q0, k0, v0, dict(out_bias=ones(HQ - 1, D))),
    "out_bias_integer": (TypeError, "out_bias", q0, k0, v0, dict(out_bias=ones(HQ, D, dtype=torch.int64))),
    "key_bias_not_broadcastable": (ValueError, "key_bias", q0, k0, v0, dict(key_bias=ones(S + 1))),
    "key_bias_wrong_heads": (ValueError, "key_bias", q0, k0, v0, dict(key_bias=ones(HQ + 1, S))),
    "key_bias_rank4": (ValueError, "key_bias", q0, k0, v0, dict(key_bias=ones(1, B, HQ, S))),
    "key_bias_integer": (TypeError, "key_bias", q0, k0, v0, dict(key_bias=ones(S, dtype=torch.int64))),
    "return_lse_with_alpha": (ValueError, "alpha", q0, k0, v0, dict(alpha=0.5, return_lse=True)),
}
# per-head values of a large batch (more than _args reads as Python numbers: checked by tensor ops)
_qb, _kb, _vb = (torch.randn(80, S, h, D) for h in (HQ, HKV, HKV))
_window_b, _sinks_b, _alpha_b = torch.ones(80, HQ, dtype=torch.int64), torch.zeros(80, HQ, dtype=torch.int64), ones(80, HQ) / 2
_window_b[71, 2], _sinks_b[79, 3], _alpha_b[40, 1] = 0, -2, math.nan
BAD_INPUTS["window_large_batch_zero"] = (ValueError, "window", _qb, _kb, _vb, dict(window=_window_b))
BAD_INPUTS["sinks_large_batch_negative"] = (ValueError, "sinks", _qb, _kb, _vb, dict(sinks=_sinks_b))
BAD_INPUTS["alpha_large_batch_nan"] = (ValueError, "alpha", _qb, _kb, _vb, dict(alpha=_alpha_b))
# per-head parameters on another device (meta tensors stand in for one)
for _name, _value in dict(gate=ones(HQ), softmax_scale=ones(HQ), alpha=ones(HQ) / 2, sink_logit=ones(HQ),
                          window=long(1, 2, 3, 4), sinks=long(0, 1, 0, 1), key_bias=ones(S),
                          out_scale=ones(HQ, D), out_bias=ones(HQ, D)).items():
    BAD_INPUTS[f"{_name}_on_meta"] = (ValueError, _name, q0, k0, v0, {_name: _value.to("meta")})


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_argument(case):
    exc, word, q, k, v, kw = BAD_INPUTS[case]
    with pytest.raises(exc) as info:
        headops.attention(q, k, v, **kw)
    message = str(info.value)
    # the message names the argument as a word of its own (not "k" inside "keys")
    assert re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", message), f"message does not name {word!r}: {message}"


def test_good_inputs_of_every_accepted_form_pass():
    q, k, v = qkv()
    headops.attention(q, k, v, window=3, sinks=0, alpha=0.0, gate=1, softmax_scale=0.5, sink_logit=-1.0)
    headops.attention(q, k, v, window=long(1, -1, 2, -5), sinks=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                      gate=ones(1, HQ), alpha=torch.tensor([[0.0, 1.0, 0.5, 0.5]] * B),
                      key_bias=torch.tensor(0.0), out_scale=ones(1, HQ, D), out_bias=ones(B, HQ, D, dtype=torch.float64))
    for shape in [(S,), (1, 1, S), (B, HQ, S), (HQ, 1), (B, 1, 1), (1, S), ()]:
        headops.attention(q, k, v, key_bias=torch.zeros(shape))


@pytest.mark.parametrize("argument", ["q", "k", "v", "gate", "softmax_scale", "alpha", "sink_logit",
                                      "key_bias", "out_scale", "out_bias"])
def test_requires_grad_gives_a_gradient_of_the_argument_shape(argument):
    q, k, v = qkv()
    kw = dict(gate=ones(HQ), softmax_scale=ones(HQ) / 3, alpha=ones(HQ) / 2, sink_logit=ones(HQ),
              key_bias=torch.zeros(S), out_scale=ones(HQ, D), out_bias=torch.zeros(HQ, D),
              window=2)  # a window, so that alpha's two branches differ
    tensors = dict(q=q, k=k, v=v, **kw)
    leaf = tensors[argument].requires_grad_(True)
    q, k, v = (tensors.pop(n) for n in "qkv")
    out = headops.attention(q, k, v, **tensors)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.square().sum(), leaf)
    assert grad.shape == leaf.shape and grad.dtype == leaf.dtype and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    with torch.no_grad():
        out = headops.attention(q, k, v, **tensors)
    assert out.shape == q.shape and torch.isfinite(out).all() and not out.requires_grad


def test_raw_forward_without_saving_refuses_a_backward():
    q, k, v = qkv()
    q.requires_grad_(True)
    out, *_ = OP(q, k, v, True, False, 1 / math.sqrt(D), None, None, None, None, None, None, None, None, None, True,
                 True, False)
    with pytest.raises(RuntimeError, match="save_for_backward"):
        out.sum().backward()


# --------------------------------------------------------------------------- the raw op

OP = torch.ops.headops.attention_fwd
ARG_NAMES = ["q", "k", "v", "causal", "heads_first", "default_scale", "softmax_scale", "window", "sinks", "alpha",
             "key_bias", "sink_logit", "out_scale", "out_bias", "gate", "skip_zero_gate", "skip_unused_branch",
             "save_for_backward"]


def raw_args(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, causal=True, heads_first=False, default_scale=1 / math.sqrt(D), softmax_scale=None,
                window=None, sinks=None, alpha=None, key_bias=None, sink_logit=None, out_scale=None, out_bias=None,
                gate=None, skip_zero_gate=True, skip_unused_branch=True, save_for_backward=False)
    args.update(overrides)
    return [args[n] for n in ARG_NAMES]


q1, k1, v1 = qkv()
RAW_BAD = {
    # name: (word the message must contain, overrides)
    "q_rank3": ("4-D", dict(q=q1[0])),
    "v_rank5": ("4-D", dict(v=v1[None])),
    "integer_q": ("q must be", dict(q=q1.long(), k=k1.long(), v=v1.long())),
    "k_dtype": ("k and v", dict(k=k1.double())),
    "v_dtype": ("k and v", dict(v=v1.half())),
    "k_v_shape": ("k and v", dict(v=torch.randn(B, S + 2, HKV, D))),
    "heads_not_divisible": ("heads", dict(k=torch.randn(B, S, 3, D), v=torch.randn(B, S, 3, D))),
    "k_batch": ("batch", dict(k=torch.randn(B + 1, S, HKV, D), v=torch.randn(B + 1, S, HKV, D))),
    "k_head_dim": ("head dim", dict(k=torch.randn(B, S, HKV, D * 2), v=torch.randn(B, S, HKV, D * 2))),
    "last_dim_strided": ("last dim", dict(q=torch.randn(B, S, HQ, 2 * D)[..., ::2])),
    "window_zero": ("window", dict(window=torch.zeros(B, HQ, dtype=torch.int64))),
    "window_one_zero": ("window", dict(window=torch.tensor([[1, 2, 3, 4], [1, 0, 1, 1]]))),
    "window_int32": ("window", dict(window=torch.ones(B, HQ, dtype=torch.int32))),
    "window_float": ("window", dict(window=ones(B, HQ))),
    "window_unbatched": ("window", dict(window=long(1, 2, 3, 4))),
    "sinks_negative": ("sinks", dict(sinks=-torch.ones(B, HQ, dtype=torch.int64))),
    "sinks_shape": ("sinks", dict(sinks=torch.ones(B, HQ + 1, dtype=torch.int64))),
    "alpha_above_one": ("alpha", dict(alpha=ones(B, HQ) * 1.5)),
    "alpha_negative": ("alpha", dict(alpha=-ones(B, HQ))),
    "alpha_nan": ("alpha", dict(alpha=ones(B, HQ) * math.nan)),
    # views (test_raw_op_reads_per_head_values_through_their_strides)
    "window_zero_expanded": ("window", dict(window=torch.tensor([1, 2, 0, 4]).expand(B, HQ))),
    "sinks_negative_every_other": ("sinks", dict(sinks=torch.tensor([[0] * 2 * HQ, [0] * 6 + [-1, 0]])[:, ::2])),
    "alpha_nan_every_other": ("alpha", dict(alpha=torch.tensor([[0.5] * 2 * HQ, [0.5] * 4 + [math.nan] + [0.5] * 3])[:, ::2])),
    "alpha_float64_with_float32_q": ("alpha", dict(alpha=ones(B, HQ, dtype=torch.float64) / 2)),
    "gate_shape": ("gate", dict(gate=ones(HQ))),
    "gate_float16": ("gate", dict(gate=ones(B, HQ, dtype=torch.float16))),
    "softmax_scale_shape": ("softmax_scale", dict(softmax_scale=ones(1, HQ))),
    "sink_logit_shape": ("sink_logit", dict(sink_logit=ones(B, HQ, 1))),
    "key_bias_broadcastable_but_not_exact": ("key_bias", dict(key_bias=ones(S))),
    "key_bias_wrong_Sk": ("key_bias", dict(key_bias=ones(B, HQ, S + 1))),
    "out_scale_unbatched": ("out_scale", dict(out_scale=ones(HQ, D))),
    "out_bias_dtype": ("out_bias", dict(out_bias=ones(B, HQ, D, dtype=torch.float64))),
    "out_bias_wrong_D": ("out_bias", dict(out_bias=ones(B, HQ, D - 1))),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_raw_op_checks(case):
    word, overrides = RAW_BAD[case]
    with pytest.raises(RuntimeError, match=word):
        OP(*raw_args(**overrides))


def test_raw_op_reads_per_head_values_through_their_strides():
    # every other column of [B, 2 * HQ]: the bad values in the columns left out are not the op's
    window = torch.tensor([[1, 0] * HQ, [2, 0] * HQ])[:, ::2]
    sinks = torch.tensor([[0, -1] * HQ] * B)[:, ::2]
    alpha = torch.tensor([[0.5, math.nan] * HQ] * B)[:, ::2]
    out, lse, *_ = OP(*raw_args(window=window, sinks=sinks, alpha=alpha))
    assert torch.isfinite(out).all()


def test_raw_op_accepts_exact_shapes():
    out, lse, *_ = OP(*raw_args(window=torch.tensor([[1, 2, 3, -1]] * B), gate=ones(B, HQ), alpha=ones(B, HQ) / 2,
                            key_bias=torch.zeros(B, HQ, S), out_scale=ones(B, HQ, D), out_bias=torch.zeros(B, HQ, D)))
    assert out.shape == (B, S, HQ, D) and lse.shape == (B, HQ, S) and torch.isfinite(out).all()


# a per-head tensor on the meta device sends the raw op to its fake kernel, which must check too
@pytest.mark.parametrize("name,value", [("softmax_scale", ones(B, HQ)), ("gate", ones(B, HQ)),
                                        ("window", torch.zeros(B, HQ, dtype=torch.int64))])
def test_raw_op_per_head_tensor_on_another_device(name, value):
    with pytest.raises(RuntimeError, match=name):
        OP(*raw_args(**{name: value.to("meta")}))
