"""The op schemas have one table (csrc/bindings.cpp); everything else is derived from it and
checked against it here: the fake kernels (torch.library.opcheck: schema, fake tensor and
dynamic-shape tracing against the real kernel), the autograd glue's gradient placement, and the
arguments Python binds by name."""

import pytest
import torch

import headops
from headops import _C, _ops

from conftest import ALL_FEATURES, head_params, make_qkv

def _attention_args(save_for_backward=True, alpha=False, packed=False, key_lengths=False):
    S = 9 if packed else 5  # (packed rows: self-attention)
    q, k, v = make_qkv(2, S, 9, 4, 2, 8, torch.float32)
    kw = head_params(2, 4, 9, 8, ALL_FEATURES, per_batch=True)
    kw = {n: (t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)) for n, t in kw.items()}
    if not alpha:
        kw.pop("alpha", None)
    else:
        kw["alpha"] = torch.rand(2, 4)
    return dict(q=q, k=k, v=v, causal=True, heads_first=False, default_scale=0.3, softmax_scale=kw.get("softmax_scale"),
                window=kw.get("window"), sinks=kw.get("sinks"), alpha=kw.get("alpha"), key_bias=kw.get("key_bias"),
                sink_logit=kw.get("sink_logit"), out_scale=kw.get("out_scale"), out_bias=kw.get("out_bias"),
                gate=kw.get("gate"), skip_zero_gate=True, skip_unused_branch=True,
                save_for_backward=save_for_backward,
                sequence_ids=torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9]) if packed else None,
                key_lengths=torch.tensor([6, 9]) if key_lengths else None)


@pytest.mark.parametrize("split", ["rows", "packed", "key_lengths"])
@pytest.mark.parametrize("alpha", [False, True], ids=["plain", "alpha"])
def test_attention_fwd_fake_matches_the_kernel(alpha, split):
    args = _attention_args(alpha=alpha, packed=split == "packed", key_lengths=split == "key_lengths")
    # by keyword: the names are the schema's
    torch.library.opcheck(torch.ops.headops.attention_fwd.default, (), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("split", ["rows", "packed", "key_lengths"])
@pytest.mark.parametrize("alpha", [False, True], ids=["plain", "alpha"])
def test_attention_bwd_fake_matches_the_kernel(alpha, split):
    fwd = _attention_args(alpha=alpha, packed=split == "packed", key_lengths=split == "key_lengths")
    out, lse, o_stream, o_full, lse_full = torch.ops.headops.attention_fwd(**fwd)
    shared = {n: fwd[n] for n in _ops.argument_names("attention_bwd") if n in fwd}
    args = dict(shared, dout=torch.randn_like(out), dlse=None if alpha else torch.randn_like(lse), o_stream=o_stream,
                lse=lse, o_full=o_full if alpha else None, lse_full=lse_full if alpha else None,
                needs_grad=[1] * len(_C.attention_grad_inputs()))
    torch.library.opcheck(torch.ops.headops.attention_bwd.default, (), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_gradient_names_are_forward_arguments():
    """attention_bwd's gradients are placed by these names (C++ kBackwardGradNames)."""
    names = _C.attention_grad_inputs()
    schema = {a.name: str(a.type) for a in _ops.schema("attention_fwd").arguments}
    assert len(names) == len(set(names)) == 10
    for name in names:
        assert name in schema and "Tensor" in schema[name], name
    # every floating tensor input of the forward has a gradient; window, sinks, sequence_ids and
    # key_lengths are integers
    tensors = {n for n, t in schema.items() if "Tensor" in t}
    assert tensors - set(names) == {"window", "sinks", "sequence_ids", "key_lengths"}


def test_bind_fills_defaults_and_refuses_unknown_names():
    bound = _ops.bind("kv_append", (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12))
    assert bound.budget_table is None and bound.write_budget is True and bound.k_new == 1
    with pytest.raises(TypeError, match="unexpected argument"):
        _ops.bind("kv_append", (), {"k_new": 1, "nonsense": 2})
    with pytest.raises(TypeError, match="missing argument"):
        _ops.bind("kv_append", (1,))


def test_cache_ops_under_fake_tensors():
    """kv_append and decode_attention trace with fake tensors (the cache path under torch.compile)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache = headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["full", "streaming"],
                                    window=[-1, -1, 3, 3], sinks=[0, 0, 1, 1], batch_size=1, max_step=2)
    q, k, v = make_qkv(1, 6, 6, 4, 2, 8, torch.float32)
    cache.attention(0, q, k, v)
    st = cache._layers[0]
    q1, k1, v1 = make_qkv(1, 1, 1, 4, 2, 8, torch.float32)
    st.reserve(int(st.lengths.max()) + 1)
    real_append = dict(k_new=k1, v_new=v1, full_k=st.full_k, full_v=st.full_v, ring_k=st.ring_k, ring_v=st.ring_v,
                       lengths=st.lengths, kv_kind=st.kv_kind, kv_index=st.kv_index, ring_offset=st.ring_offset,
                       ring_sinks=st.ring_sinks, ring_size=st.ring_size)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {n: (mode.from_tensor(t) if isinstance(t, torch.Tensor) else
                    [mode.from_tensor(x) for x in t] if isinstance(t, list) else t) for n, t in real_append.items()}
        assert torch.ops.headops.kv_append(**fake) is None
        decode = {n: fake[n] for n in ("full_k", "full_v", "ring_k", "ring_v", "lengths", "kv_kind", "kv_index",
                                       "ring_offset", "ring_sinks", "ring_size")}
        out = torch.ops.headops.decode_attention(q=mode.from_tensor(q1), causal=True, default_scale=0.3,
                                                 softmax_scale=None, window=None, sinks=None, alpha=None,
                                                 key_bias=None, sink_logit=None, out_scale=None, out_bias=None,
                                                 gate=None, split_keys=64, **decode)
        assert out.shape == q1.shape and out.dtype == q1.dtype
