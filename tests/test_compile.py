"""torch.compile(fullgraph=True) traces headops.attention (with per-head tensors) without a graph
break, through the op's fake kernel, and gives eager's results."""

import time

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import headops
from headops.testing import tiny_llama

from conftest import ALL_FEATURES, head_params, make_qkv


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def layer(q, k, v, gate, window, sinks, softmax_scale, key_bias, sink_logit, out_scale, out_bias):
    # something around the op, so the graph is more than the op alone
    out = headops.attention(q * 1.0, k, v, gate=gate, window=window, sinks=sinks, softmax_scale=softmax_scale,
                            key_bias=key_bias, sink_logit=sink_logit, out_scale=out_scale, out_bias=out_bias)
    return out.sum(dim=2) + 1


def _inputs(dtype=torch.float32, per_batch=False, B=2, Sq=33, Sk=70):
    q, k, v = make_qkv(B, Sq, Sk, 4, 2, 32, dtype)
    kw = head_params(B, 4, Sk, 32, ALL_FEATURES, per_batch=per_batch)
    kw = {n: (t.to(torch.float32) if t.is_floating_point() else t) for n, t in kw.items()}
    return (q, k, v), kw


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["per_head", "per_batch"])
def test_fullgraph_matches_eager(backend, per_batch):
    (q, k, v), kw = _inputs(per_batch=per_batch)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(q, k, v, **kw), layer(q, k, v, **kw), atol=0, rtol=0)
    # new values of the per-head tensors (same shapes) need no retrace and are used
    w = kw["window"]
    kw2 = dict(kw, gate=kw["gate"].flip(-1), window=torch.where(w > 0, w + 1, w))
    torch.testing.assert_close(compiled(q, k, v, **kw2), layer(q, k, v, **kw2), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_value_checks_still_apply_when_compiled():
    # Python skips data-dependent checks while tracing; the op itself re-checks them
    (q, k, v), kw = _inputs()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(q, k, v, **kw)
    bad = dict(kw, window=torch.tensor([1, 0, 2, 3]))
    with pytest.raises((RuntimeError, ValueError), match="window"):
        compiled(q, k, v, **bad)


def test_no_graph_break():
    (q, k, v), kw = _inputs()
    explanation = torch._dynamo.explain(layer)(q, k, v, **kw)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    ops = [n.target for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.headops.attention_fwd.default in ops or torch.ops.headops.attention_fwd in ops


def test_dynamic_shapes():
    compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=True)
    for Sq, Sk in [(33, 70), (5, 9), (64, 200)]:
        (q, k, v), kw = _inputs(Sq=Sq, Sk=Sk)
        torch.testing.assert_close(compiled(q, k, v, **kw), layer(q, k, v, **kw), atol=0, rtol=0)


def test_python_scalars_and_return_lse():
    def fn(q, k, v):
        return headops.attention(q, k, v, window=4, sinks=1, gate=0.5, softmax_scale=0.2, sink_logit=0.0,
                                 return_lse=True)

    (q, k, v), _ = _inputs(torch.bfloat16)
    out, lse = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    want, want_lse = fn(q, k, v)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)


def test_inductor():
    (q, k, v), kw = _inputs()
    start = time.monotonic()
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, k, v, **kw)
    print(f"inductor compile + first call: {time.monotonic() - start:.1f} s")
    torch.testing.assert_close(got, layer(q, k, v, **kw), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ the cache's decode step

# KV head 0 full (query heads 0, 1), 1 streaming (window 3 / 4, sinks 1 / 2), 2 budget (12 tokens)
CACHE = dict(num_layers=1, num_heads=6, num_kv_heads=3, head_dim=16, kinds=["full", "streaming", "budget"],
             window=[-1, 5, 3, 4, -1, -1], sinks=[0, 2, 1, 2, 1, 0], budget=[None, None, 12], budget_recent=2,
             max_step=2, dtype=torch.float32)


def _decode_inputs(B=2, S=20, steps=2):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, S + steps, 6, 16, generator=gen)
    k, v = torch.randn(2, B, S + steps, 3, 16, generator=gen)
    kw = dict(gate=torch.tensor([[1.0, 0.0, -0.7, 0.5, 1.6, 0.4], [0.3, 1.0, 1.0, 2.0, 0.0, 1.0]]),
              softmax_scale=torch.rand(6, generator=gen) + 0.1, sink_logit=torch.randn(6, generator=gen),
              out_scale=torch.randn(6, 16, generator=gen), out_bias=torch.randn(B, 6, 16, generator=gen),
              alpha=torch.tensor([0.3, 1.0, 0.0, 0.0, 0.0, 0.0]))
    key_bias = torch.randn(B, 6, S + steps, generator=gen)
    return (q, k, v), kw, key_bias


def _state(cache):
    """Internal: what a step changes (the full storage up to the tokens held; past them it is uninitialised)."""
    st = cache._layers[0]
    held = max(st.held)
    full = [torch.cat(segments, dim=2)[:, :, :held] for segments in (st.full_k, st.full_v)]
    return [st.lengths, st.ring_k, st.ring_v, st.slot_pos, st.slot_mass] + full


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_cache_decode_step_matches_eager(backend):
    (q, k, v), kw, key_bias = _decode_inputs()
    S = 20
    eager, compiled_cache = headops.HeadSparseCache(**CACHE), headops.HeadSparseCache(**CACHE)
    for cache in (eager, compiled_cache):
        cache.attention(0, q[:, :S], k[:, :S], v[:, :S], key_bias=key_bias[..., :S], **kw)

    def step(cache, q, k, v, key_bias, kw):
        return cache.attention(0, q, k, v, key_bias=key_bias, **kw) * 1.0

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    new = (q[:, S:S + 1], k[:, S:S + 1], v[:, S:S + 1], key_bias[..., :S + 1])
    got = compiled(compiled_cache, *new, kw)
    want = step(eager, *new, kw)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(_state(compiled_cache), _state(eager)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert compiled_cache.seq_lengths(0).tolist() == [S + 1] * 2
    # the next step (one more token held) is right too
    new = (q[:, S + 1:], k[:, S + 1:], v[:, S + 1:], key_bias)
    torch.testing.assert_close(compiled(compiled_cache, *new, kw), step(eager, *new, kw), atol=0, rtol=0)
    for a, b in zip(_state(compiled_cache), _state(eager)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------- a patched transformers model


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padding"])
def test_fullgraph_patched_model_forward_matches_eager(backend, padded):
    pytest.importorskip("transformers")
    model, _ = tiny_llama()
    spec = headops.HeadSpec.streaming(model, {0: [1]}, window=4, sinks=1).mask_heads({1: [2]})
    spec.out_scale = torch.rand(2, 4, 16) + 0.5
    headops.patch(model, spec)
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, :5] = 0

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    with torch.no_grad():
        want = forward(ids, mask)
        got = torch.compile(forward, fullgraph=True, backend=backend)(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_patched_model_keeps_packed_sequences_apart(backend):
    """Sequences packed into a row (position_ids restarting, no mask: DataCollatorWithFlattening)
    in a compiled model: transformers cannot tell packed from plain rows while tracing, so the
    sequence ids go to the op, which finds the sequences when it runs. Logits as each sequence
    alone, in one graph, and the unpacked row as the uncompiled model (before 2026-12-06 the
    compiled model attended across the sequences)."""
    pytest.importorskip("transformers")
    model, _ = tiny_llama()
    headops.patch(model, headops.HeadSpec.streaming(model, {0: [1]}, window=3, sinks=1))
    ids = torch.randint(1, 97, (1, 12))
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])

    def forward(ids, position_ids):
        return model(input_ids=ids, position_ids=position_ids, use_cache=False).logits

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(forward, fullgraph=True, backend=counter)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in ((0, 5), (5, 8), (8, 12))],
                          dim=1)
        torch.testing.assert_close(compiled(ids, packed), alone, atol=1e-5, rtol=1e-5)
        plain = torch.arange(12)[None]
        torch.testing.assert_close(compiled(ids, plain), forward(ids, plain), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def _shared_gemma4():
    from headops.testing import tiny_per_layer_shapes

    return tiny_per_layer_shapes(False, num_hidden_layers=8, num_kv_shared_layers=4,
                                 layer_types=["sliding_attention", "full_attention"] * 4)[0]


def _steps_as_recomputed(step, model, ids, mask, cache, prompt):
    """A compiled step function fed a prompt and then one token at a time through `cache`: each
    step's logits as the uncompiled model recomputing the whole (left-padded) sequence."""
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        got = step(ids[:, :prompt], mask[:, :prompt], cache)
        torch.testing.assert_close(got[:, -1], want[:, prompt - 1], atol=2e-5, rtol=1e-5)
        for t in range(prompt, ids.shape[1]):
            got = step(ids[:, t:t + 1], mask[:, :t + 1], cache)
            torch.testing.assert_close(got[:, -1], want[:, t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma4_shared_kv"])
def test_compiled_model_generates_a_left_padded_batch_through_a_head_sparse_cache(family):
    """torch.compile over a patched model stepping through a HeadSparseCache (whose host work
    breaks the graph) with a left-padded batch: before 2026-12-07 refused ("takes padded prompts
    padded on the left"), as the traced mask's padding was not read; also Gemma 4's layers that
    read earlier layers' keys, which find the cache by those keys."""
    pytest.importorskip("transformers")
    model = tiny_llama()[0] if family == "llama" else _shared_gemma4()
    spec = headops.HeadSpec.streaming(model, {1 if family == "llama" else 5: [0]}, window=4, sinks=1)
    headops.patch(model, spec)
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    step = torch.compile(lambda i, m, c: model(i, attention_mask=m, cache=c, use_cache=True).logits,
                         backend="aot_eager")
    _steps_as_recomputed(step, model, ids, mask, headops.HeadSparseCache(model, spec), prompt=10)


def test_model_with_shared_kv_layers_compiles_in_one_graph_through_a_static_cache():
    """Gemma 4's layers that read earlier layers' keys look a HeadSparseCache up by those keys, a
    lookup torch.compile cannot trace; through transformers' StaticCache, with no such
    HeadSparseCache alive, they make none, so the compiled model holds in one graph
    (fullgraph=True; before 2026-12-07 dynamo refused the lookup)."""
    import gc

    transformers = pytest.importorskip("transformers")
    from headops.cache import keys_may_be_handed_out

    gc.collect()
    assert not keys_may_be_handed_out(), "a HeadSparseCache that handed keys out outlived its test"
    model = _shared_gemma4()
    headops.patch(model, headops.HeadSpec.streaming(model, {5: [0]}, window=4, sinks=1))
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda i, m, c: model(i, attention_mask=m, cache=c, use_cache=True).logits,
                         fullgraph=True, backend=counter)
    _steps_as_recomputed(step, model, ids, mask, transformers.StaticCache(config=model.config, max_cache_len=20),
                         prompt=9)
    assert counter.frame_count >= 1
