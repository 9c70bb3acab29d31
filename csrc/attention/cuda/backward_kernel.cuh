// The CUDA backward of headops.attention: launch declaration (no torch headers).
//
// Tested on an NVIDIA H200; see backward_kernel.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../attention_params.h"

namespace headops {
namespace cuda {

// Scratch the backward needs besides its outputs, float32, allocated by the caller:
//   d_o          [B, Hq, Sq, D]  dL/do of the mixed average (times the single branch's weight)
//   delta_stream [B, Hq, Sq]     per row and branch: weight * do . o - dlse
//   delta_full   [B, Hq, Sq]
//   dscale_rows  [B, Hq, Sq]     per row q_i . (dS K)_i, summed per head in a fixed order;
//                                zero-filled (rows of heads that are skipped stay 0)
struct BackwardScratch {
  float* d_o = nullptr;
  float* delta_stream = nullptr;
  float* delta_full = nullptr;
  float* dscale_rows = nullptr;
};

// Warps per block of the row, dq and dkv passes (a block takes kBackwardWarps rows or keys).
constexpr int kBackwardWarps = 4;

// The largest dynamic shared memory a block asks for: the dkv pass's two rows of D floats a warp.
constexpr int64_t backward_smem_bytes(int64_t head_dim) {
  return 2 * kBackwardWarps * head_dim * static_cast<int64_t>(sizeof(float));
}

// Every gradient BackwardParams asks for (null pointer / want_* false: not computed), for
// float32 inputs (the dispatcher converts bfloat16/float16 to float32 first). The outputs are
// zero-filled by the caller. Asynchronous on `stream`; returns the first launch error.
cudaError_t launch_generic_backward(const BackwardParams& p, const BackwardScratch& scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace headops
