"""Probes on a GPU. CUDA tensors take the row-block path (headops._probe_rows: the statistics
recomputed on the device from the fused forward's lse, a block of query rows at a time); the
CPU probe kernel, itself checked against the reference (test_probes.py), is the check here.
`HEADOPS_TEST_CUDA_DEVICE=cpu` dry-runs this file on the CPU with the row-block path forced."""

import pytest
import torch

import headops
from headops import discover, probes, tasks

from conftest import ALL_FEATURES, CUDA_DRY_RUN, CUDA_TEST_DEVICE, head_params, make_qkv, needs_cuda, \
    tiny_llama_twins
from test_probes import all_statistics, probe_op

pytestmark = needs_cuda
DEVICE = torch.device(CUDA_TEST_DEVICE)
STAT_ATOL = {torch.float32: 5e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4}


@pytest.fixture(autouse=True)
def row_blocks_in_a_dry_run(monkeypatch):
    if CUDA_DRY_RUN:
        monkeypatch.setattr(probes, "kernel_probes", lambda device: False)


def on_device(kw):
    """The per-head arguments as a GPU user passes them: window and sinks on the host (planning),
    the others on the device."""
    return {n: t if n in ("window", "sinks") else t.to(DEVICE) for n, t in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Sq,Sk,Hq,Hkv,D", [(2, 37, 37, 4, 2, 64), (1, 9, 300, 6, 3, 128), (2, 70, 20, 4, 4, 64),
                                             (1, 1, 513, 8, 2, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_statistics_on_the_device_equal_the_cpu_kernel(dtype, B, Sq, Sk, Hq, Hkv, D, causal):
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    kw = head_params(B, Hq, Sk, D, ALL_FEATURES)
    stats = all_statistics(Sq, Sk)
    want = probe_op(q, k, v, causal=causal, **kw, **stats)
    out, lse, got = headops.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=causal, return_lse=True,
                                      probe=headops.Probe(**stats, pattern_rows=[0, -1]), **on_device(kw))
    _, cpu = headops.attention(q, k, v, causal=causal, probe=headops.Probe(pattern_rows=[0, -1]), **kw)
    assert got.pattern.device == DEVICE
    torch.testing.assert_close(got.pattern.cpu(), cpu.pattern, atol=STAT_ATOL[dtype], rtol=1e-4, equal_nan=True)
    for name, w in want.items():
        if name in ("out", "lse"):
            continue
        g = getattr(got, name)
        assert g.device == DEVICE, name
        if name == "topk_index":
            assert torch.equal(g.cpu(), w), name
        else:
            torch.testing.assert_close(g.cpu(), w, atol=STAT_ATOL[dtype], rtol=1e-4, equal_nan=True, msg=name)
    # out and lse are the device's plain forward
    plain_out, plain_lse = headops.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=causal,
                                             return_lse=True, **on_device(kw))
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)


def test_no_device_to_host_copy_of_the_keys():
    """The row-block path reads nothing back: a probe at 8,192 keys under sync-debug 'error' (a
    GPU run; the dry run only checks the statistics' device)."""
    q, k, v = (torch.randn(1, 8192, 4, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    window, sinks = torch.tensor([-1, 256, 64, -1]), torch.tensor([0, 4, 4, 0])  # host planning
    if not CUDA_DRY_RUN:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        probe = headops.Probe(spans=[[0, 1]], topk=2, entropy=True, key_mass_rows=(8192 - 32, 8192))
        _, stats = headops.attention(q, k, v, window=window, sinks=sinks, probe=probe)
    finally:
        if not CUDA_DRY_RUN:
            torch.cuda.set_sync_debug_mode("default")
    assert stats.topk_index.device == DEVICE and stats.key_mass.shape == (1, 4, 8192)
    # head 2 (window 64, 4 sinks) attends only within reach
    top = stats.topk_index[0, 2, :, 0].cpu()
    position = torch.arange(8192)
    assert bool(((top < 4) | ((top > position - 64) & (top <= position))).all())


def test_discovery_on_the_device_equals_the_cpu(monkeypatch):
    """headops.discover's probe methods on a patched model on the device, against the same model
    on the CPU: echo and induction, sink, retrieval and retrieval-reasoning scores (every test
    counted: the random model's answers match nothing)."""
    from headops.testing import CharTokenizer

    tok = CharTokenizer()
    cpu_model, dev_model = tiny_llama_twins(DEVICE)
    for model in (cpu_model, dev_model):
        headops.patch(model, headops.HeadSpec.dense(model))
    period = 7
    ids = discover.repeated_tokens(cpu_model, tok, period=period, rows=3, seed=5)
    text = discover.text_rows(tok, rows=2, tokens=60)
    samples = [tasks.make_sample(tok, "niah_single", 400, depth, 0, haystack="repeat") for depth in (0.0, 1.0)]
    found = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        echo, induction = discover.echo_induction_scores(model, ids, period)
        retrieval = discover.retrieval_scores(model, samples, min_recall=0.0, max_new_tokens=4)
        with monkeypatch.context() as m:
            m.setattr(discover, "answer_f1", lambda expected, answer: 1.0)
            reasoning = discover.retrieval_reasoning_scores(model, samples, max_new_tokens=4)
        assert reasoning.info["counted"] == len(samples) and float(reasoning.values.sum()) > 0
        found[name] = (echo, induction, discover.sink_scores(model, text), retrieval, reasoning)
    for want, got in zip(found["cpu"], found["device"]):
        assert got.values.device.type == "cpu" and got.info == want.info
        torch.testing.assert_close(got.values, want.values, atol=1e-4, rtol=1e-4, msg=want.method)


def test_generation_through_a_device_cache_is_probed_as_on_the_cpu():
    """headops.probe while a StreamingLLM-patched model generates through a HeadSparseCache on the
    device: the prefill and every decode step report what the CPU run reports, at original
    positions."""
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    cache_kwarg = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    cpu_model, dev_model = tiny_llama_twins(DEVICE)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    request = headops.Probe(spans=[[0, 1]], distances=[[1, 2]], topk=2, entropy=True, pattern_rows=[0, -1])
    recordings = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        spec = headops.HeadSpec.streaming_llm(model, window=6, sinks=2)
        headops.patch(model, spec)
        cache = headops.HeadSparseCache(model, spec, max_step=1)
        with torch.no_grad(), headops.probe(model, request) as recording:
            model.generate(ids.to(model.device), max_new_tokens=4, do_sample=False, **{cache_kwarg: cache})
        recordings[name] = recording
    want, got = recordings["cpu"], recordings["device"]
    assert [len(c) for c in got.layers] == [len(c) for c in want.layers] == [4, 4]
    for layer in range(2):
        for a, b in zip(want[layer], got[layer]):
            assert torch.equal(b.topk_index.cpu(), a.topk_index)
            for name in ("span_mass", "distance_mass", "entropy", "topk_prob", "pattern"):
                torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), atol=1e-4, rtol=1e-4, msg=name)
