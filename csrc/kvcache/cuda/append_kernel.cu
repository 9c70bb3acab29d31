// CUDA kv_append: writes a step's new keys and values into every KV head's storage of a
// head-sparse cache layer, as the CPU op does (csrc/kvcache/kv_append.cpp).
//
// Tested on an NVIDIA H200 (tests/test_kvcache_cuda.py through bench/gpu_suite.sh, 2026-12-04).
//
// One CTA per (KV head, batch row):
//   - a full head copies each new token to its segment (segment table on the device);
//   - a streaming head first folds the tokens this call evicts (RingLayout::evicted_between, from
//     its ring or straight from the input) into its compensation sums, in float64 and position
//     order per column (the CPU's order: the same sums bit for bit), then writes the tokens its
//     ring keeps (a long append skips the ones it would overwrite within the call);
//   - a budget head places the tokens one after another: the first empty slot, else the
//     evictable token (not a sink, not among the `recent` latest) with the least attention mass,
//     the oldest on ties; a block-wide reduction per token.
// Nothing is read back to the host. Table values are not checked on the host for CUDA inputs:
// every index taken from a table is range-guarded here, and a token an out-of-range entry
// would place (or a budget head with no evictable token, which the Python layer's
// budget > sinks + recent excludes) is not written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kv_layout.h"
#include "kv_cache_kernels.cuh"

namespace headops {
namespace cuda {
namespace {

constexpr int kAppendThreads = 256;
constexpr int kAppendWarps = kAppendThreads / 32;

template <typename T>
__device__ __forceinline__ double to_double(T x);
template <>
__device__ __forceinline__ double to_double<float>(float x) { return x; }
template <>
__device__ __forceinline__ double to_double<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ double to_double<__half>(__half x) { return __half2float(x); }

// Budget slot choice: an empty slot (lowest index) beats any occupied one; among the evictable
// ones the least mass, then the oldest position. `slot` < 0: no candidate.
struct Candidate {
  int64_t slot;
  int64_t pos;
  float mass;
  bool empty;
};

__device__ __forceinline__ bool better(const Candidate& x, const Candidate& y) {
  if (x.slot < 0) return false;
  if (y.slot < 0) return true;
  if (x.empty != y.empty) return x.empty;
  if (x.empty) return x.slot < y.slot;
  return x.mass < y.mass || (x.mass == y.mass && x.pos < y.pos);
}

template <typename T>
__global__ void __launch_bounds__(kAppendThreads) kv_append_kernel(const AppendParams ap) {
  __shared__ Candidate reduce[kAppendWarps];
  __shared__ int64_t chosen;
  const DecodeParams& p = ap.layer;
  const int64_t D = p.attn.head_dim, Sq = ap.seqlen;
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = p.lengths[b];
  if (first < 0) return;
  const int64_t last = first + Sq;  // positions [first, last) are new
  const int64_t kind = p.kv_kind[h], index = p.kv_index[h];
  auto new_k = [&](int64_t i) {
    return static_cast<const T*>(ap.k_new) + b * ap.k_stride_b + i * ap.k_stride_s + h * ap.k_stride_h;
  };
  auto new_v = [&](int64_t i) {
    return static_cast<const T*>(ap.v_new) + b * ap.v_stride_b + i * ap.v_stride_s + h * ap.v_stride_h;
  };
  T* ring_k = static_cast<T*>(const_cast<void*>(p.ring_k));
  T* ring_v = static_cast<T*>(const_cast<void*>(p.ring_v));
  // new token i to the rows k_dst / v_dst (the lanes of one warp)
  auto copy_row = [&](int64_t i, T* k_dst, T* v_dst) {
    const T* ks = new_k(i);
    const T* vs = new_v(i);
    for (int64_t d = lane; d < D; d += 32) {
      k_dst[d] = ks[d];
      v_dst[d] = vs[d];
    }
  };

  if (kind == kKvFull) {
    if (index < 0 || index >= p.full_heads || p.full_segments < 1) return;
    const int64_t S = p.full_segments, capacity = p.full_starts[S];
    for (int64_t i = warp; i < Sq; i += kAppendWarps) {
      const int64_t pos = first + i;
      if (pos >= capacity) continue;
      int64_t lo = 0, hi = S;  // the segment holding pos
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (p.full_starts[mid] <= pos) lo = mid; else hi = mid;
      }
      const int64_t n = p.full_starts[lo + 1] - p.full_starts[lo];
      const int64_t row = (b * p.full_heads + index) * n + (pos - p.full_starts[lo]);
      copy_row(i, static_cast<T*>(const_cast<void*>(p.full_k[lo])) + row * D,
               static_cast<T*>(const_cast<void*>(p.full_v[lo])) + row * D);
    }
    return;
  }

  if (kind == kKvStreaming) {
    if (index < 0 || index >= p.ring_heads) return;
    const RingLayout ring{p.ring_offset[index], p.ring_sinks[index], p.ring_size[index]};
    if (ring.offset < 0 || ring.sinks < 0 || ring.ring < 1 || ring.offset > p.ring_slots ||
        ring.sinks > p.ring_slots - ring.offset || ring.ring > p.ring_slots - ring.offset - ring.sinks)
      return;
    const int64_t base = b * p.ring_slots + ring.offset;
    const Compensation comp = compensation_of(p.comp_table, index);
    if (comp.index >= 0 && comp.index < p.comp_heads) {
      // fold what this call evicts, before the ring slots are overwritten
      const KeyRange gone = ring.evicted_between(first, last);
      const int64_t c = b * p.comp_heads + comp.index;
      double* k_sum = const_cast<double*>(p.comp_k) + c * D;
      double* v_sum = const_cast<double*>(p.comp_v) + c * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        double sk = k_sum[d], sv = v_sum[d];
        for (int64_t pos = gone.lo; pos < gone.hi; ++pos) {
          const T* kr = pos < first ? ring_k + (base + ring.slot_of(pos)) * D : new_k(pos - first);
          const T* vr = pos < first ? ring_v + (base + ring.slot_of(pos)) * D : new_v(pos - first);
          sk += to_double<T>(kr[d]);
          sv += to_double<T>(vr[d]);
        }
        k_sum[d] = sk;
        v_sum[d] = sv;
      }
      if (threadIdx.x == 0) const_cast<int64_t*>(p.comp_n)[c] += gone.size();
      __syncthreads();
    }
    for (int64_t i = warp; i < Sq; i += kAppendWarps) {
      const int64_t pos = first + i;
      if (pos >= ring.sinks && pos < last - ring.ring) continue;  // overwritten before this call returns
      const int64_t row = base + ring.slot_of(pos);
      copy_row(i, ring_k + row * D, ring_v + row * D);
    }
    return;
  }

  if (kind != kKvBudget || !ap.write_budget || p.budget_table == nullptr || index < 0 || index >= p.budget_heads)
    return;
  const BudgetLayout bl = budget_layout_of(p.budget_table, p.budget_heads, b, index);
  if (bl.offset < 0 || bl.size < 1 || bl.offset > p.ring_slots || bl.size > p.ring_slots - bl.offset) return;
  const int64_t base = b * p.ring_slots + bl.offset;
  int64_t* slot_pos = const_cast<int64_t*>(p.slot_pos) + base;
  float* slot_mass = p.slot_mass + base;
  for (int64_t i = 0; i < Sq; ++i) {
    const int64_t pos = first + i;
    Candidate best{-1, 0, 0.f, false};
    for (int64_t j = threadIdx.x; j < bl.size; j += blockDim.x) {
      const int64_t q = slot_pos[j];
      Candidate c{j, q, slot_mass[j], q < 0};
      if (!c.empty && (q < bl.sinks || q > pos - bl.recent)) continue;  // a sink or among the latest
      if (better(c, best)) best = c;
    }
    for (int o = 16; o > 0; o >>= 1) {
      Candidate other;
      other.slot = __shfl_xor_sync(0xffffffffu, best.slot, o);
      other.pos = __shfl_xor_sync(0xffffffffu, best.pos, o);
      other.mass = __shfl_xor_sync(0xffffffffu, best.mass, o);
      other.empty = __shfl_xor_sync(0xffffffffu, static_cast<int>(best.empty), o) != 0;
      if (better(other, best)) best = other;
    }
    if (lane == 0) reduce[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      Candidate c = reduce[0];
      for (int w = 1; w < kAppendWarps; ++w)
        if (better(reduce[w], c)) c = reduce[w];
      chosen = c.slot;
      if (c.slot >= 0) {
        slot_pos[c.slot] = pos;
        slot_mass[c.slot] = 0.f;
      }
    }
    __syncthreads();
    const int64_t slot = chosen;
    if (slot >= 0 && warp == 0) copy_row(i, ring_k + (base + slot) * D, ring_v + (base + slot) * D);
    __syncthreads();  // `chosen` and `reduce` are rewritten by the next token
  }
}

template <typename T>
cudaError_t launch_typed(const AppendParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.layer.attn.heads_kv), static_cast<unsigned>(p.layer.attn.batch));
  kv_append_kernel<T><<<grid, kAppendThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_append(const AppendParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(p, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace headops
