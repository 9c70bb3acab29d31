"""headops.HeadSpec as a validated dataclass: checked when made, ``to(device)``, ``slice_heads``."""

import dataclasses
import types

import pytest
import torch

import headops


def full_spec():
    """L=2, Hq=6, Hkv=3 (groups of 2), D=4, with every field set and per-batch gates."""
    config = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, head_dim=4)
    spec = headops.HeadSpec.streaming(config, {0: [1], 1: [2]}, window=3, sinks=1)
    spec.cache_kind[1][0] = "budget"
    spec.cache_budget[1][0] = 9
    L, Hq, D = 2, 6, 4
    spec.gate = torch.arange(3 * L * Hq, dtype=torch.float32).view(3, L, Hq)
    spec.softmax_scale = torch.rand(L, Hq) + 0.1
    spec.alpha = torch.zeros(L, Hq)
    spec.sink_logit = torch.randn(L, Hq)
    spec.out_scale = torch.randn(L, Hq, D)
    spec.out_bias = torch.randn(L, Hq, D)
    spec.key_bias = torch.randn(L, Hq, 2)
    spec.validate()
    return spec


def test_a_spec_is_a_dataclass_checked_when_made():
    spec = headops.HeadSpec(2, 4, 2, 8)
    assert [f.name for f in dataclasses.fields(spec)][:4] == ["num_layers", "num_heads", "num_kv_heads", "head_dim"]
    assert spec.window.tolist() == [[-1] * 4] * 2 and spec.sinks.tolist() == [[0] * 4] * 2
    assert spec.cache_kind == [["full", "full"]] * 2 and spec.cache_budget == [[None, None]] * 2
    with pytest.raises(ValueError, match=r"^headops\.HeadSpec: window must be >= 1"):
        headops.HeadSpec(2, 4, 2, 8, window=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"^headops\.HeadSpec: alpha must be in \[0, 1\]"):
        headops.HeadSpec(2, 4, 2, 8, alpha=torch.full((2, 4), 1.5))
    with pytest.raises(ValueError, match=r"^headops\.HeadSpec: sink_logit must be a number"):
        headops.HeadSpec(2, 4, 2, 8, sink_logit=torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match=r"^headops\.HeadSpec: cache_kind"):
        headops.HeadSpec(2, 4, 2, 8, cache_kind=[["full"]] * 2)
    # fields may be set after construction; validate() checks them again
    spec.softmax_scale = torch.full((2, 4), float("inf"))
    with pytest.raises(ValueError, match=r"^headops\.HeadSpec: softmax_scale must be finite"):
        spec.validate()


def test_constructors_copy_repr_and_save_load_still_work(tmp_path):
    spec = full_spec()
    assert repr(spec).startswith("HeadSpec(layers=2, heads=6, kv_heads=3, head_dim=4")
    copy = spec.copy()
    assert copy is not spec and copy.to_dict() == spec.to_dict()
    spec.save(tmp_path / "spec.json")
    assert headops.HeadSpec.load(tmp_path / "spec.json").to_dict() == spec.to_dict()


def test_to_moves_every_tensor_field_and_returns_a_new_spec():
    spec = full_spec()
    moved = spec.to("meta")
    assert moved is not spec and isinstance(moved, headops.HeadSpec)
    for name, t in spec.tensors().items():
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(moved, name).shape == t.shape and t.device.type == "cpu", name
    assert set(spec.tensors()) == {"gate", "softmax_scale", "alpha", "sink_logit", "out_scale", "out_bias",
                                   "key_bias", "window", "sinks"}
    assert moved.cache_kind == spec.cache_kind and moved.cache_kind is not spec.cache_kind
    # on the device already: the same tensors (a gate that requires grad stays the leaf it was)
    spec.gate.requires_grad_(True)
    same = spec.to("cpu")
    assert same is not spec and same.gate is spec.gate
    with pytest.raises(ValueError, match="device"):
        spec.to("no such device")


@pytest.mark.parametrize("block", [range(2, 6), slice(0, 2), slice(4, None), range(0, 6)])
def test_slice_heads_keeps_a_block_of_query_heads_and_their_kv_heads(block):
    spec = full_spec()
    first, stop, _ = (block.start, block.stop, 1) if isinstance(block, range) else block.indices(6)
    part = spec.slice_heads(block)
    assert (part.num_layers, part.num_heads, part.num_kv_heads, part.head_dim) == (2, stop - first,
                                                                                   (stop - first) // 2, 4)
    assert torch.equal(part.gate, spec.gate[..., first:stop])
    for name in ("softmax_scale", "alpha", "sink_logit", "window", "sinks", "out_scale", "out_bias", "key_bias"):
        assert torch.equal(getattr(part, name), getattr(spec, name)[:, first:stop]), name
    assert part.cache_kind == [row[first // 2:stop // 2] for row in spec.cache_kind]
    assert part.cache_budget == [row[first // 2:stop // 2] for row in spec.cache_budget]
    # the block's layer arguments are the whole spec's, restricted to the block's heads
    for layer in range(2):
        whole, mine = spec.layer_args(layer, 5), part.layer_args(layer, 5)
        assert set(whole) == set(mine)
        for name, t in mine.items():
            head_axis = -2 if name in ("out_scale", "out_bias", "key_bias") else -1
            assert torch.equal(t, whole[name].narrow(head_axis, first, stop - first)), name
        # a HeadSparseCache's call: the same without window and sinks (the cache's own)
        cached = spec.layer_args(layer, 5, visibility=False)
        assert set(cached) == set(whole) - {"window", "sinks"}
        assert all(torch.equal(t, whole[name]) for name, t in cached.items())
    before = spec.window.clone()
    part.window.fill_(7)  # a copy: the whole spec is unchanged
    assert torch.equal(spec.window, before)


@pytest.mark.parametrize("block, error, word", [
    (range(1, 3), ValueError, "GQA group"),
    (range(0, 3), ValueError, "GQA group"),
    (range(0, 6, 2), ValueError, "consecutive"),
    (range(4, 4), ValueError, "non-empty"),
    (range(4, 8), ValueError, "q_heads"),
    ([0, 1], TypeError, "q_heads"),
    (slice(0, 2.0), TypeError, "q_heads"),
])
def test_slice_heads_refuses_a_block_that_cuts_a_group(block, error, word):
    with pytest.raises(error, match=word) as info:
        full_spec().slice_heads(block)
    assert str(info.value).startswith("headops.HeadSpec.slice_heads: q_heads must be")
