// The CUDA forward of headops.attention: launch declarations and the work-item helpers that
// the host (work list, counters) and the kernels (key walk) share.
//
// Plain header: no torch/ATen. Included by forward_kernel.cu (nvcc) and by
// attention_fwd_cuda.cpp (the host compiler), so that both walk exactly the same keys.
//
// NOTHING IN THIS DIRECTORY HAS RUN ON A GPU YET: it is compiled and inspected (ptxas, SASS)
// on a machine without one. tests/test_attention_cuda.py and bench/gpu_suite.sh are the checks
// to run on the first GPU machine.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../attention_params.h"
#include "../head_semantics.h"

namespace headops {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One work item: query rows [q_tile * block_q, min(Sq, (q_tile + 1) * block_q)) of query head h
// in batch row b. Heads gated off exactly never become items (see launch_skipped_heads).
struct WorkItem {
  int32_t b, h, q_tile, unused;
};

// Tensor-core kernel (bf16/fp16, head dims 64 and 128): 8 warps x 16 query rows, 64-key blocks.
constexpr int kTcBlockQ = 128;
constexpr int kTcBlockK = 64;
constexpr int kTcThreads = 256;
// Generic kernel (float32/bf16/fp16, any head dim <= 512; plain FMA): 4 warps x 4 query rows,
// 32-key blocks.
constexpr int kGenericBlockQ = 16;
constexpr int kGenericBlockK = 32;
constexpr int kGenericThreads = 128;
constexpr int kGenericMaxHeadDim = 512;

HEADOPS_HD int64_t blocks_in(const KeyRange& r, int64_t block_k) { return (r.size() + block_k - 1) / block_k; }

HEADOPS_HD int64_t walk_blocks(const VisibleKeys& walk, int64_t block_k) {
  return blocks_in(walk.sinks, block_k) + blocks_in(walk.window, block_k);
}

// An item's keys are head_semantics.h's tile_walk; key block t of a walk: keys [lo, lo + block_k) of which [lo, hi) are real (hi - lo <= block_k);
// the sinks range's blocks come first, then the window's.
HEADOPS_HD KeyRange walk_block(const VisibleKeys& walk, int64_t t, int64_t block_k) {
  const int64_t n0 = blocks_in(walk.sinks, block_k);
  const KeyRange& r = t < n0 ? walk.sinks : walk.window;
  const int64_t lo = r.lo + (t < n0 ? t : t - n0) * block_k;
  return {lo, min64(lo + block_k, r.hi)};
}

// Under alpha the item walks the full branch's keys; the streaming branch is updated only on
// the blocks that meet its own ranges for the tile.
HEADOPS_HD bool meets(const VisibleKeys& keys, const KeyRange& block) {
  return !keys.sinks.clip(block.lo, block.hi).empty() || !keys.window.clip(block.lo, block.hi).empty();
}

// Launches (asynchronous on `stream`; they return the launch error, if any). Pointers in `p`
// and `items` are device pointers. `max_smem_optin`: the device's opt-in shared memory per
// block, to refuse a configuration that would not launch.
bool tensor_core_supported(DType dtype, int64_t head_dim);
int64_t tensor_core_smem_bytes(int64_t head_dim, bool alpha);
int64_t generic_smem_bytes(int64_t head_dim);
// The host's kernel choice as a pure function (no device query; tests call it through
// headops._C.cuda_forward_choice): the tensor-core kernel when the dtype and head dim have one,
// the rows are 16-byte aligned, the GPU is sm_80 or newer and the variant's shared memory fits
// the device's opt-in limit. The D = 128 variant with alpha needs more than sm_86/sm_89 offer
// (99 KiB), so those GPUs run alpha calls at D = 128 on the generic kernel.
bool tensor_core_choice(DType dtype, int64_t head_dim, bool alpha, bool rows_aligned, int major,
                        int64_t smem_optin, bool force_generic);
// Copies `n` 32-bit words from host memory to `dst` on `stream` through kernel parameters (a
// chunk of words per launch): legal during CUDA-graph capture, and a replay reads nothing from
// host memory (the words are part of the captured launches).
cudaError_t launch_upload_words(int32_t* dst, const int32_t* src, int64_t n, cudaStream_t stream);
cudaError_t launch_tensor_core_forward(const AttentionParams& p, DType dtype, const WorkItem* items, int64_t n_items,
                                       cudaStream_t stream);
cudaError_t launch_generic_forward(const AttentionParams& p, DType dtype, const WorkItem* items, int64_t n_items,
                                   cudaStream_t stream);
// Heads gated off exactly: out rows 0 and lse -inf. `heads`: (b, h) pairs, int32.
cudaError_t launch_skipped_heads(const AttentionParams& p, DType dtype, const int32_t* heads, int64_t n_heads,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace headops
