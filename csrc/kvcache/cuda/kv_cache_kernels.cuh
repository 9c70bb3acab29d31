// The CUDA kernels of the head-sparse KV cache (kv_append, decode_attention): launch
// declarations and the sizes the host and the kernels share.
//
// Plain header: no torch/ATen. Included by decode_kernel.cu / append_kernel.cu (nvcc) and by
// kv_cache_cuda.cpp (the host compiler).
//
// Tested on an NVIDIA H200 (tests/test_kvcache_cuda.py, bench/gpu_suite.sh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../../attention/cuda/forward_kernel.cuh"  // DType
#include "../decode_params.h"

namespace headops {
namespace cuda {

// Decode: one CTA per (key split, KV head, batch row) of up to kDecodeWarps warps, each holding
// kDecodeRowsPerWarp query rows (of the G * Sq rows of the GQA group) and walking its own tiles
// of kDecodeTile keys (one per lane for the scores); a group with more rows divides the warps
// into row groups, and walks its keys once per chunk of rows beyond what the row groups hold.
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeRowsPerWarp = 4;
constexpr int kDecodeTile = 32;
constexpr int kDecodeMaxHeadDim = 512;

// The key-split kernel's static shared memory (its warps' staged positions and rows, the head's
// walk, the query rows' scalars), an upper bound.
constexpr int64_t kKeySplitStaticSmem = kDecodeWarps * kDecodeTile * 24 + 2048;

// Shared memory a decode CTA needs at least for head dim D and element size elem_bytes (bytes;
// one warp, static memory included).
int64_t decode_smem_bytes(int64_t head_dim, int64_t elem_bytes);

// The full segments' table on the device, int64 [3 * S + 1]: the S key pointers, the S value
// pointers, then the S + 1 segment starts (positions). Written by launch_write_table from values
// passed by value in kernel parameters (no host memory is read at replay: graph-capturable).
constexpr int kTableChunk = 256;
struct TableChunk {
  int64_t values[kTableChunk];
};
cudaError_t launch_write_table(int64_t* dst, const int64_t* values, int64_t count, cudaStream_t stream);

// p: DecodeParams with device pointers (full_k / full_v / full_starts point into the device
// table above). Scratch: part_ms float [B, Hkv, splits, G * Sq, 2 branches, 2 (max, sum)] and
// part_acc float [same, D]. Writes p.attn.out (and adds budget heads' attention mass).
// aligned_rows: every key and value row of the storages starts on 16 bytes (16-byte copies;
// element copies otherwise); shared_optin_bytes: the device's opt-in shared memory per block
// (a CTA's warps are chosen among those that fit it).
struct DecodeLaunch {
  int64_t splits = 1;
  bool aligned_rows = false;
  int64_t shared_optin_bytes = 0;
};
cudaError_t launch_decode(const DecodeParams& p, DType dtype, const DecodeLaunch& launch, float* part_ms,
                          float* part_acc, cudaStream_t stream);

// Append: new keys/values [B, Sq, Hkv, D] (element strides, contiguous last dim) written into
// the layer's storages (DecodeParams' storage fields; its attn is unused but for batch, heads_kv
// and head_dim), folding evicted tokens into compensation sums and choosing budget slots on the
// device. The storages' pointers are written through const casts.
struct AppendParams {
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  int64_t seqlen = 0;  // new tokens per row
  bool write_budget = true;
  DecodeParams layer;
};
cudaError_t launch_append(const AppendParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace headops
