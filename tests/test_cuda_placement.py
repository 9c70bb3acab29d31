"""Where the tensors of a spec, a patched model and the research studies live, for a model on a GPU.

On a CUDA device a HeadSpec keeps its planning fields (window, sinks; gate and alpha unless they
require grad) on the host, where headops.attention reads them without a device-to-host sync
(docs/cuda.md); everything else follows the model's device. The placement rules are pure
functions, tested here without a GPU; the GPU-only tests run a tiny patched Llama on CUDA
(importance, pruning curve, Shapley values) against the same model on the CPU.
"""

import pytest
import torch

import headops
from headops import research
from headops.patching import _attention_modules
from headops.spec import placement

pytest.importorskip("transformers")
from headops.testing import tiny_llama  # noqa: E402

from conftest import tiny_llama_twins  # noqa: E402

CUDA_OK = torch.cuda.is_available() and getattr(headops._C, "cuda_compiled", False)
gpu_only = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a build with the CUDA kernels")

CUDA = torch.device("cuda", 0)


def test_planning_fields_stay_on_the_host_for_a_cuda_device():
    spec = headops.HeadSpec(2, 4, 2, 8).mask_heads({0: [1]})
    spec.softmax_scale = torch.ones(2, 4)
    for name in ("window", "sinks", "gate"):
        assert placement(name, getattr(spec, name), CUDA) == torch.device("cpu")
    assert placement("softmax_scale", spec.softmax_scale, CUDA) == CUDA
    assert placement("alpha", torch.zeros(2, 4), CUDA) == torch.device("cpu")
    # a gate (alpha) whose gradient is wanted lives where it is computed
    assert placement("gate", torch.ones(2, 4, requires_grad=True), CUDA) == CUDA
    assert placement("alpha", torch.zeros(2, 4, requires_grad=True), CUDA) == CUDA
    # other devices: everything moves (the rule is for the CUDA forward's host planning)
    meta = torch.device("meta")
    assert all(placement(n, t, meta) == meta for n, t in spec.tensors().items())
    moved = spec.to("meta")
    assert all(t.device == meta for t in moved.tensors().values())
    assert moved.is_on("meta") and not spec.is_on("meta") and spec.is_on("cpu")


def test_is_on_a_cuda_device_ignores_the_host_fields():
    spec = headops.HeadSpec(1, 2, 1, 8)
    assert spec.is_on("cuda:0")  # window and sinks only: both belong on the host
    spec.softmax_scale = torch.ones(1, 2)
    assert not spec.is_on("cuda:0")


def test_studies_create_their_tensors_on_the_model_device():
    model = tiny_llama()[0]
    assert research.model_device(model) == torch.device("cpu")
    assert research.model_device(torch.nn.Module()) == torch.device("cpu")
    meta = torch.nn.Linear(2, 2, device="meta")
    assert research.model_device(meta) == torch.device("meta")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    scores = research.importance(model, [ids])
    assert scores.device == torch.device("cpu") and scores.shape == (model.config.num_hidden_layers,
                                                                   model.config.num_attention_heads)


# ------------------------------------------------------------------------------ on a GPU


def _pair():
    cpu_model, gpu_model = tiny_llama_twins("cuda")
    ids = torch.randint(0, cpu_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return cpu_model, gpu_model, ids


@gpu_only
def test_patched_cuda_model_keeps_planning_on_the_host_and_matches_the_cpu():
    cpu_model, gpu_model, ids = _pair()
    spec = headops.HeadSpec.dense(cpu_model).mask_heads({0: [1]})
    headops.patch(cpu_model, spec)
    headops.patch(gpu_model, spec)
    module = _attention_modules(gpu_model)[0]
    local = module._headops_spec
    assert local.window.device.type == "cpu" and local.gate.device.type == "cpu"
    with torch.no_grad():
        want = cpu_model(ids).logits
        got = gpu_model(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@gpu_only
def test_importance_pruning_curve_and_shapley_on_a_cuda_model():
    cpu_model, gpu_model, ids = _pair()
    want = research.importance(cpu_model, [ids])
    got = research.importance(gpu_model, [ids.cuda()])
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)
    L, H = want.shape
    order = [(layer, h) for layer in range(L) for h in range(H)]
    curve_cpu = research.pruning_curve(cpu_model, ids, order, [0.0, 0.5], repeats=1, group=False)
    curve_gpu = research.pruning_curve(gpu_model, ids.cuda(), order, [0.0, 0.5], repeats=1, group=False)
    torch.testing.assert_close(torch.tensor(curve_gpu["metric"]), torch.tensor(curve_cpu["metric"]), atol=1e-3,
                               rtol=1e-3)
    phi_cpu = research.shapley(cpu_model, ids, permutations=2, group=False)
    phi_gpu = research.shapley(gpu_model, ids.cuda(), permutations=2, group=False)
    assert phi_gpu.device.type == "cuda"
    torch.testing.assert_close(phi_gpu.cpu(), phi_cpu, atol=1e-3, rtol=1e-3)
