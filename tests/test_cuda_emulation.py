"""The CUDA kernels' algorithms, checked on the CPU through their Python transcriptions
(tests/emulate_cuda_tc.py: the tensor-core forward lane by lane; tests/emulate_cuda_bwd.py: the
backward's three passes). Both call head_semantics.h and online_softmax.h through
headops._C.semantics, so they follow the headers the kernels include. They check index
arithmetic and algorithm, not the compiled kernels: tests/test_attention_cuda.py does that on a GPU."""

import pytest

import headops
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


@pytest.mark.parametrize("rows", [32, 7, 1])
def test_decode_staging_walks_each_chunk_once_in_order(rows):
    """chunk_walk.h (the CUDA decode's cp.async staging, division-free): lane l copies the chunks
    l, l + 32, ... of the tile's row-major order, for every chunk count a row can have (1 to 64:
    D * element size / 16 for head dims to 256) and beyond."""
    for chunks in range(1, 130):
        for lane in range(32):
            want = [divmod(i, chunks) for i in range(lane, rows * chunks, 32)]
            assert headops._C.semantics.staging_chunks(lane, chunks, rows) == want, (chunks, lane)
