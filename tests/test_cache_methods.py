"""The head-level compression methods of the cache (docs/DESIGN.md section 6): full prefill,
RazorAttention's compensation token, SnapKV / AdaKV / HeadKV budgets, the HeadSpec constructors
of each method, and building a cache from a dense prefill.

Oracles: ``headops.attention`` and ``headops.reference.attention`` over what each head keeps;
plain-PyTorch transcriptions of the allocation formulas in this file.
"""

import math

import pytest
import torch

import headops
from headops import reference

from conftest import assert_close, make_qkv

F64 = torch.float64


def keyword_cache(Hq=4, Hkv=2, D=8, *, kinds, window=None, sinks=None, B=2, L=1, max_step=2, **options):
    return headops.HeadSparseCache(num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds=kinds,
                                   window=window, sinks=sinks, batch_size=B, dtype=F64, max_step=max_step, **options)


# ------------------------------------------------------------------------------ prefill="full"


@pytest.mark.parametrize("lengths", [None, [9, 5]])
def test_full_prefill_reads_the_whole_prompt_then_keeps_each_kind(lengths):
    B, S, Hq, Hkv, D = 2, 9, 6, 3, 8
    window, sinks = [2, 3, -1, 4, 1, 2], [1, 0, 0, 2, 0, 1]
    cache = keyword_cache(Hq, Hkv, D, kinds=["streaming", "full", "streaming"], window=window, sinks=sinks, B=B,
                          max_step=1, prefill="full")
    assert cache.options["prefill"] == "full"
    steps = 7
    q, k, v = make_qkv(B, S + steps, S + steps, Hq, Hkv, D, F64)
    gate = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, -1.0], dtype=F64)
    out = cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, gate=gate)
    rows = lengths or [S] * B
    for b, n in enumerate(rows):
        # every head: full causal attention over the prompt (window and sinks do not apply)
        want = reference.attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], gate=gate)
        assert_close(out[b:b + 1, :n], want, 1e-12, 1e-12)
        assert bool((out[b, n:] == 0).all())
    # then decode: each head sees what its kind keeps, exactly as after a "spec" prefill
    spec_cache = keyword_cache(Hq, Hkv, D, kinds=["streaming", "full", "streaming"], window=window, sinks=sinks, B=B,
                               max_step=1)
    spec_cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, gate=gate)
    for i in range(steps):
        new = [torch.stack([t[b, n + i:n + i + 1] for b, n in enumerate(rows)]) for t in (q, k, v)]
        got = cache.attention(0, *new, gate=gate)
        assert torch.equal(got, spec_cache.attention(0, *new, gate=gate))
        for b, n in enumerate(rows):
            p = n + i + 1
            want = headops.attention(q[b:b + 1, :p], k[b:b + 1, :p], v[b:b + 1, :p], gate=gate,
                                     window=torch.tensor(window), sinks=torch.tensor(sinks))[:, -1:]
            assert_close(got[b:b + 1], want, 1e-12, 1e-12)
    for b, n in enumerate(rows):
        layer = cache._layers[0]
        p = n + steps
        assert layer.kept_positions(b, 1).tolist() == list(range(p))  # the full KV head
        assert layer.kept_positions(b, 0).tolist() == [0] + list(range(p - 3, p))  # sinks 1 + ring 3
    assert cache.ideal_nbytes() == spec_cache.ideal_nbytes()


def test_prefill_option_from_the_spec_and_overridden():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    spec = headops.HeadSpec.streaming(model, {0: [1]}, window=3, sinks=1)
    assert headops.HeadSparseCache(model, spec).options["prefill"] == "spec"
    spec.cache_options = {"prefill": "full"}
    spec.validate()
    assert headops.HeadSparseCache(model, spec).options["prefill"] == "full"
    assert headops.HeadSparseCache(model, spec, prefill="spec").options["prefill"] == "spec"
    again = headops.HeadSpec.from_dict(spec.to_dict())
    assert again.cache_options == {"prefill": "full"}
    assert spec.slice_heads(range(0, 2)).cache_options == {"prefill": "full"}
    assert spec.to("cpu").cache_options == {"prefill": "full"}


@pytest.mark.parametrize("bad, word", [
    (dict(prefill="dense"), "prefill"),
    (dict(prefill=None), "prefill"),
])
def test_bad_cache_options(bad, word):
    with pytest.raises(ValueError, match=word):
        keyword_cache(kinds="full", **bad)


def test_bad_spec_cache_options():
    spec = headops.HeadSpec(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    spec.cache_options = {"prefil": "full"}
    with pytest.raises(ValueError, match="prefil"):
        spec.validate()
    spec.cache_options = {"prefill": "everything"}
    with pytest.raises(ValueError, match="prefill"):
        spec.validate()
    spec.cache_options = ["prefill"]
    with pytest.raises(TypeError, match="cache_options"):
        spec.validate()


def test_full_prefill_generation_through_a_patched_model():
    """A patched model generating through a cache with prefill="full": the prompt's logits are
    the dense model's (every head reads the whole prompt); each later token equals recomputing
    the whole sequence with full attention on the prompt rows and each head's own window and
    sinks on the generated rows."""
    from transformers import AttentionInterface

    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    S, new = 12, 6
    ids = torch.randint(0, 97, (1, S))
    dense_logits = model(ids).logits.double()
    spec = headops.HeadSpec.streaming(model, {0: [1], 1: [0, 1]}, window=3, sinks=1)

    def oracle(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        args = spec.layer_args(module.layer_idx)
        out = headops.attention(q, k, v, layout="bhsd", softmax_scale=scaling)
        if q.shape[2] > S:  # the generated rows see what their heads keep
            out[:, :, S:] = headops.attention(q[:, :, S:], k, v, layout="bhsd", softmax_scale=scaling, **args)[:, :, :]
        return out.transpose(1, 2), None

    AttentionInterface.register("headops_full_prefill_oracle", oracle)
    model.set_attn_implementation("headops_full_prefill_oracle")
    want = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=False)
    model.set_attn_implementation("sdpa")
    headops.patch(model, spec)
    try:
        cache = headops.HeadSparseCache(model, spec, prefill="full", max_step=1)
        assert_close(model(ids, cache=cache, use_cache=True).logits.double(), dense_logits, 1e-5, 1e-5)
        spec_cache = headops.HeadSparseCache(model, spec, max_step=1)
        assert not torch.allclose(model(ids, cache=spec_cache, use_cache=True).logits.double(), dense_logits,
                                  atol=1e-3)  # (the windows do change the prompt's outputs)
        got = model.generate(ids, max_new_tokens=new, do_sample=False,
                             cache=headops.HeadSparseCache(model, spec, prefill="full", max_step=1))
        assert torch.equal(got, want)
    finally:
        headops.unpatch(model)


# ------------------------------------------------------------------------------ constructors


def test_streaming_llm_makes_every_kv_head_streaming():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    spec = headops.HeadSpec.streaming_llm(model, window=16, sinks=2)
    assert all(k == "streaming" for row in spec.cache_kind for k in row)
    assert bool((spec.window == 16).all()) and bool((spec.sinks == 2).all())
    cache = headops.HeadSparseCache(model, spec)
    assert cache.kinds == spec.cache_kind
    with pytest.raises(ValueError, match="window"):
        headops.HeadSpec.streaming_llm(model, window=0)
    with pytest.raises(ValueError, match="sinks"):
        headops.HeadSpec.streaming_llm(model, window=4, sinks=-1)
