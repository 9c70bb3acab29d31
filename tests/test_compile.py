"""torch.compile(fullgraph=True) traces headops.attention (with per-head tensors) without a graph
break, through the op's fake kernel, and gives eager's results."""

import time

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import headops

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


# ------------------------------------------------------------- a patched transformers model

def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padding"])
def test_fullgraph_patched_model_forward_matches_eager(backend, padded):
    model = _tiny_llama()
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
