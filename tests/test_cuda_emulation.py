"""The CUDA kernels' algorithms, checked on the CPU through their Python transcriptions
(tests/emulate_cuda_tc.py: the tensor-core forward lane by lane; tests/emulate_cuda_bwd.py: the
backward's three passes). Both call head_semantics.h and online_softmax.h through
headops._C.semantics, so they follow the headers the kernels include. They check index
arithmetic and algorithm, not the compiled kernels: tests/test_attention_cuda.py does that on a GPU."""

import pytest

import emulate_cuda_bwd
import emulate_cuda_tc


@pytest.mark.parametrize("case", range(6))
def test_emulated_tensor_core_forward_matches_reference(case):
    # small shapes (the emulation runs every lane in Python): still several query tiles' worth
    # of rows for the warp skips and both K/V buffers
    c = emulate_cuda_tc.random_case(case, max_q=140, max_k=200)
    err, lse_err = emulate_cuda_tc.compare(c)
    assert err < 1e-9 and lse_err < 1e-9, (err, lse_err, {n: c[n] for n in ("D", "Sq", "Sk", "window", "sinks")})


@pytest.mark.parametrize("case", range(len(emulate_cuda_bwd.CASES)))
def test_emulated_cuda_backward_matches_cpu(case):
    """The backward's transcription against the CPU backward op in float64."""
    emulate_cuda_bwd.compare(case, **emulate_cuda_bwd.CASES[case])
