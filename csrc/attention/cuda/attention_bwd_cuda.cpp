// Host side of the CUDA backward: device guard, scratch buffers, launch on the current stream.
//
// Tested on an NVIDIA H200; see backward_kernel.cu.
#ifdef HEADOPS_WITH_CUDA

#include "attention_bwd_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

#include "backward_kernel.cuh"

namespace headops::cuda {

void attention_backward(const BackwardParams& p, const at::Tensor& q) {
  const char* op = "headops.attention_bwd: ";
  TORCH_CHECK(q.scalar_type() == at::kFloat, op, "the CUDA backward runs in float32 (bfloat16/float16 are converted "
              "first), got ", q.scalar_type(), "; float64 is CPU only");
  c10::cuda::CUDAGuard guard(q.device());
  const AttentionParams& f = p.fwd;
  const int64_t n_heads = f.batch * f.heads_q;
  if (n_heads == 0 || f.seqlen_q == 0 || f.head_dim == 0) return;
  // one block per head (row pass) and per kBackwardWarps rows or keys of a head (key passes)
  const int64_t max_grid = std::numeric_limits<int32_t>::max();
  const int64_t most_rows = std::max(f.seqlen_q, f.seqlen_k);
  TORCH_CHECK(n_heads * ((most_rows + kBackwardWarps - 1) / kBackwardWarps) <= max_grid, op,
              "too many (batch, head, rows) for one CUDA launch");
  const int64_t optin = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  TORCH_CHECK(backward_smem_bytes(f.head_dim) <= optin, op, "head dim ", f.head_dim,
              " is too large for the CUDA backward (its accumulators take ", backward_smem_bytes(f.head_dim),
              " bytes of shared memory per block, the device has ", optin, ")");
  const auto options = q.options().dtype(at::kFloat);
  const int64_t rows = n_heads * f.seqlen_q;
  at::Tensor d_o = at::empty({rows * f.head_dim}, options);
  at::Tensor deltas = at::empty({2 * rows}, options);
  at::Tensor dscale_rows = p.dsoftmax_scale ? at::zeros({rows}, options) : at::Tensor();
  BackwardScratch scratch;
  scratch.d_o = d_o.data_ptr<float>();
  scratch.delta_stream = deltas.data_ptr<float>();
  scratch.delta_full = scratch.delta_stream + rows;
  scratch.dscale_rows = dscale_rows.defined() ? dscale_rows.data_ptr<float>() : nullptr;
  const cudaError_t err = launch_generic_backward(p, scratch, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, "CUDA backward launch failed: ", cudaGetErrorString(err));
}

}  // namespace headops::cuda

#endif  // HEADOPS_WITH_CUDA
