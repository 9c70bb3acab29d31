// CUDA decode attention over a head-sparse KV cache layer, all heads in one call
// (flash-decoding: split-K partials, then a combine pass).
//
// Tested on an NVIDIA H200 (tests/test_kvcache_cuda.py through bench/gpu_suite.sh, 2026-12-04);
// correct there but latency-bound (~1.1 ms a step at 32k: docs/cuda.md has the profile).
//
// 1. decode_partial_kernel, one CTA per (key split, KV head, batch row): the keys its GQA group
//    walks (a full head: the union of what its active query heads see, decode_semantics.h, split
//    into ranges of split_keys; a streaming head: its sinks + ring slots, each slot's position
//    from RingLayout::position_of_slot; a budget head: all its slots, positions from slot_pos,
//    in split 0 only) are loaded once per tile of 32 keys into shared memory and used by all
//    G * Sq query rows of the group (a chunk of 16 rows at a time). Each row keeps an online
//    softmax per branch (online_softmax.h) with visibility from head_semantics.h, and the item
//    writes its partial (max, sum, accumulator). A budget head's CTA then has every row's final
//    softmax and adds each kept token's probability to its attention mass (the CPU's order).
// 2. decode_combine_kernel, a warp per (batch row, query head, new token): merges the splits'
//    partials in order after the sink logit, merges a compensated streaming head's compensation
//    key (kv_layout.h), mixes alpha and applies the epilogue (head_semantics.h).
// Every per-head value is read at run time (read_head); heads gated to exactly 0 are never
// computed (a CTA whose whole group is gated off reads no K/V) and write zeros.
// Launch sizes come from shapes only; rows shorter than a split exit early. Table values are not
// checked on the host for CUDA inputs (that would read device memory): every index the kernels
// take from a table is range-guarded here instead, and an out-of-range entry reads as "no key".
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "../../attention/head_semantics.h"
#include "../../attention/online_softmax.h"
#include "../decode_semantics.h"
#include "../kv_layout.h"
#include "kv_cache_kernels.cuh"
#include "../../attention/cuda/device_math.cuh"
#include "../../attention/cuda/smem_opt_in.h"

namespace headops {
namespace cuda {
namespace {

// xor butterflies: every lane ends with the same value (a + b == b + a exactly)
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

constexpr int kPad = kDecodeTile + 1;  // the transposed key tile's row stride (no bank conflicts)

// The slots one CTA walks for its (b, KV head) and how a walk index maps to a position and a
// storage row. Built identically by every thread from the tables (range-guarded).
struct HeadWalk {
  int64_t kind = -1;
  int64_t n = 0;        // walk indices [0, n)
  VisibleKeys keys{};   // full heads: the group's keys (walk index -> position)
  RingLayout ring{};    // streaming heads
  int64_t base = 0;     // streaming / budget heads: the storage row of slot 0 ([B * ring_slots] rows)
  int64_t index = 0;    // full heads: the index among the full heads
};

__device__ HeadWalk head_walk(const DecodeParams& p, int64_t b, int64_t kvh, int64_t length, const GroupKeys& group) {
  HeadWalk w;
  if (!group.any) return w;
  const int64_t kind = p.kv_kind[kvh], index = p.kv_index[kvh];
  if (kind == kKvFull) {
    if (index < 0 || index >= p.full_heads || p.full_segments < 1) return w;
    w.kind = kind;
    w.keys = group.keys;
    w.n = group.keys.count();
    w.index = index;
  } else if (kind == kKvStreaming) {
    if (index < 0 || index >= p.ring_heads) return w;
    const RingLayout ring{p.ring_offset[index], p.ring_sinks[index], p.ring_size[index]};
    if (ring.offset < 0 || ring.sinks < 0 || ring.ring < 1 || ring.offset > p.ring_slots ||
        ring.sinks > p.ring_slots - ring.offset || ring.ring > p.ring_slots - ring.offset - ring.sinks)
      return w;
    w.kind = kind;
    w.ring = ring;
    w.n = ring.sinks + ring.ring;
    w.base = b * p.ring_slots + ring.offset;
  } else if (kind == kKvBudget) {
    if (p.budget_table == nullptr || index < 0 || index >= p.budget_heads) return w;
    const BudgetLayout bl = budget_layout_of(p.budget_table, p.budget_heads, b, index);
    if (bl.offset < 0 || bl.size < 0 || bl.offset > p.ring_slots || bl.size > p.ring_slots - bl.offset) return w;
    w.kind = kind;
    w.n = bl.size;
    w.base = b * p.ring_slots + bl.offset;
  }
  return w;
}

// Position of walk index `t` (or -1) and its key/value rows.
template <typename T>
__device__ int64_t walk_key(const DecodeParams& p, const HeadWalk& w, int64_t b, int64_t length, int64_t t,
                            const T*& k_row, const T*& v_row) {
  const int64_t D = p.attn.head_dim;
  k_row = v_row = nullptr;
  if (w.kind == kKvFull) {
    const int64_t ns = w.keys.sinks.size();
    const int64_t pos = t < ns ? w.keys.sinks.lo + t : w.keys.window.lo + (t - ns);
    const int64_t S = p.full_segments;
    if (pos < 0 || pos >= p.full_starts[S]) return -1;
    int64_t lo = 0, hi = S;  // the segment s with full_starts[s] <= pos < full_starts[s + 1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.full_starts[mid] <= pos) lo = mid; else hi = mid;
    }
    const int64_t n = p.full_starts[lo + 1] - p.full_starts[lo];
    const int64_t row = (b * p.full_heads + w.index) * n + (pos - p.full_starts[lo]);
    k_row = static_cast<const T*>(p.full_k[lo]) + row * D;
    v_row = static_cast<const T*>(p.full_v[lo]) + row * D;
    return pos;
  }
  const int64_t row = w.base + t;
  const int64_t pos = w.kind == kKvStreaming ? w.ring.position_of_slot(t, length) : p.slot_pos[row];
  if (pos < 0) return -1;
  k_row = static_cast<const T*>(p.ring_k) + row * D;
  v_row = static_cast<const T*>(p.ring_v) + row * D;
  return pos;
}

struct KeyTile {
  int64_t pos[kDecodeTile];
  int64_t row[kDecodeTile];  // streaming / budget: the storage row (slot_mass index)
  const void* k[kDecodeTile];
  const void* v[kDecodeTile];
};

// Loads walk indices [t0, t0 + 32) ∩ [t0, t1) into the tile: positions, keys transposed
// (sK[d * kPad + j]) and values (sV[j * D + d]) in float; keys without a position read as 0.
// Returns whether any key of the tile holds a position (the same in every thread).
template <typename T>
__device__ bool load_tile(const DecodeParams& p, const HeadWalk& w, int64_t b, int64_t length, int64_t t0, int64_t t1,
                          KeyTile& tile, float* sK, float* sV) {
  const int64_t D = p.attn.head_dim;
  __syncthreads();  // the previous tile is consumed
  if (threadIdx.x < kDecodeTile) {
    const int64_t t = t0 + threadIdx.x;
    const T* kr = nullptr;
    const T* vr = nullptr;
    const int64_t pos = t < t1 ? walk_key<T>(p, w, b, length, t, kr, vr) : -1;
    tile.pos[threadIdx.x] = pos;
    tile.row[threadIdx.x] = w.base + t;
    tile.k[threadIdx.x] = kr;
    tile.v[threadIdx.x] = vr;
  }
  __syncthreads();
  bool any = false;
  for (int64_t idx = threadIdx.x; idx < kDecodeTile * D; idx += blockDim.x) {
    const int64_t j = idx / D, d = idx - j * D;
    float kv = 0.f, vv = 0.f;
    if (tile.pos[j] >= 0) {
      kv = TypeOps<T>::to_float(static_cast<const T*>(tile.k[j])[d]);
      vv = TypeOps<T>::to_float(static_cast<const T*>(tile.v[j])[d]);
      any = true;
    }
    sK[d * kPad + j] = kv;
    sV[j * D + d] = vv;
  }
  return __syncthreads_or(any) != 0;
}

// One query row of the CTA (a row of the GQA group: query head kvh * G + g, new token i).
struct RowInfo {
  bool active;  // a row of the group whose head is not gated off
  int64_t pos;  // its position
  HeadScalars<float> hs;
  BranchPlan plan;
  const float* bias;
};

// The logit of this lane's key for a row and branch, -inf where the key is not visible.
__device__ __forceinline__ float key_logit(const AttentionParams& a, const RowInfo& row, const HeadVisibility& vis,
                                           int64_t key_pos, float score) {
  if (key_pos < 0 || !vis.visible(row.pos, key_pos)) return negative_infinity<float>();
  const float bias = row.bias != nullptr && key_pos < a.seqlen_k ? row.bias[key_pos * a.key_bias.stride_n] : 0.f;
  return score * row.hs.softmax_scale + bias;
}

// q . k for this lane's key (q broadcast from shared memory, the key transposed).
__device__ __forceinline__ float row_score(const float* q, const float* sK, int64_t D, int lane) {
  float s = 0.f;
#pragma unroll 4
  for (int64_t d = 0; d < D; ++d) s = fmaf(q[d], sK[d * kPad + lane], s);
  return s;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_partial_kernel(const DecodeParams p, const int64_t splits, float* __restrict__ part_ms,
                          float* __restrict__ part_acc) {
  constexpr int RW = kDecodeRowsPerWarp;
  extern __shared__ float smem[];
  __shared__ KeyTile tile;
  const AttentionParams& a = p.attn;
  const int64_t D = a.head_dim, G = a.group(), Sq = a.seqlen_q, R = G * Sq;
  const int64_t split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sQ = smem;                         // [kDecodeRowsPerPass][D]
  float* sK = sQ + kDecodeRowsPerPass * D;  // [D][kPad]
  float* sV = sK + D * kPad;                // [kDecodeTile][D]
  float* sMass = sV + kDecodeTile * D;      // [kDecodeRowsPerPass][kDecodeTile]
  const int64_t item = (b * a.heads_kv + kvh) * splits + split;  // partials [item][R][2 branches]
  float* ms = part_ms + item * R * 4;
  float* acc_out = part_acc + item * R * 2 * D;

  const int64_t length = p.lengths[b];
  const GroupKeys group = group_keys<float>(a, b, kvh, length);
  const HeadWalk w = head_walk(p, b, kvh, length, group);
  // split-K: full and streaming heads split their walk into ranges of split_keys; a budget head
  // is walked whole by split 0 (its attention mass needs each row's final softmax)
  int64_t t_begin = 0, t_end = 0;
  if (w.kind == kKvBudget) {
    t_end = split == 0 ? w.n : 0;
  } else if (split < w.n / p.split_keys + (w.n % p.split_keys != 0)) {
    t_begin = split * p.split_keys;
    t_end = t_begin + min64(p.split_keys, w.n - t_begin);
  }
  if (t_begin >= t_end) {  // nothing to walk (past the row's length, gated off, empty head): empty partials
    for (int64_t i = threadIdx.x; i < R * 2; i += blockDim.x) {
      ms[2 * i] = negative_infinity<float>();
      ms[2 * i + 1] = 0.f;
    }
    return;
  }

  for (int64_t c0 = 0; c0 < R; c0 += kDecodeRowsPerPass) {
    // the chunk's query rows in shared memory (float)
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kDecodeRowsPerPass * D; idx += blockDim.x) {
      const int64_t rr = idx / D, d = idx - rr * D, r = c0 + rr;
      float x = 0.f;
      if (r < R) x = TypeOps<T>::to_float(a.q.row<T>(b, r % Sq, kvh * G + r / Sq)[d]);
      sQ[idx] = x;
    }
    RowInfo rows[RW];
    OnlineSoftmax<float> st[2][RW];
    float acc[2][RW][NT];
#pragma unroll
    for (int k = 0; k < RW; ++k) {
      const int64_t r = c0 + warp * RW + k;
      RowInfo& row = rows[k];
      row.active = false;
      row.pos = 0;
      row.hs = HeadScalars<float>{};
      row.plan = BranchPlan{false, false};
      row.bias = nullptr;
      if (r < R) {
        const int64_t h = kvh * G + r / Sq;
        row.hs = read_head<float>(a, b, h);
        row.active = row.hs.gate != 0.f;
        row.plan = plan_branches(row.hs);
        row.pos = length - Sq + r % Sq;
        row.bias = a.key_bias.present() ? a.key_bias.row<float>(b, h) : nullptr;
      }
#pragma unroll
      for (int br = 0; br < 2; ++br) {
        st[br][k] = OnlineSoftmax<float>::start(false, 0.f);  // the sink logit joins once, in the combine
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[br][k][t] = 0.f;
      }
    }

    for (int64_t t0 = t_begin; t0 < t_end; t0 += kDecodeTile) {
      if (!load_tile<T>(p, w, b, length, t0, t_end, tile, sK, sV)) continue;
      const int64_t key_pos = tile.pos[lane];
#pragma unroll
      for (int k = 0; k < RW; ++k) {
        const RowInfo& row = rows[k];
        if (!row.active) continue;  // warp-uniform
        const float s = row_score(sQ + (warp * RW + k) * D, sK, D, lane);
#pragma unroll
        for (int br = 0; br < 2; ++br) {
          if (!(br == 0 ? row.plan.full : row.plan.streaming)) continue;
          const HeadVisibility vis = br == 0 ? full_visibility(a.causal) : streaming_visibility(a.causal, row.hs);
          const float x = key_logit(a, row, vis, key_pos, s);
          OnlineSoftmax<float>& sm = st[br][k];
          const float correction = sm.rescale(warp_max(x), FastExp{});
          if (sm.max == negative_infinity<float>()) continue;  // nothing visible yet
          const float e = FastExp{}(x - sm.reference());
          sm.add(warp_sum(e), correction);
          if (correction != 1.f) {
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[br][k][t] *= correction;
          }
          for (int j = 0; j < kDecodeTile; ++j) {
            const float pj = __shfl_sync(0xffffffffu, e, j);
            if (pj == 0.f) continue;  // (uniform: every lane holds the same pj)
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              const int64_t d = lane + 32 * t;
              if (d < D) acc[br][k][t] = fmaf(pj, sV[j * D + d], acc[br][k][t]);
            }
          }
        }
      }
    }

    if (w.kind == kKvBudget && p.slot_mass != nullptr) {
      // each kept token's probability under each row's final softmax (the sink logit included),
      // added to its attention mass row by row in row order, as the CPU kernel does
      float lse[RW];
      bool adds[RW];
#pragma unroll
      for (int k = 0; k < RW; ++k) {
        adds[k] = rows[k].active && rows[k].plan.streaming && st[1][k].max != negative_infinity<float>();
        OnlineSoftmax<float> with_sink = OnlineSoftmax<float>::start(rows[k].hs.has_sink_logit, rows[k].hs.sink_logit);
        if (adds[k]) with_sink.merge(st[1][k], FastExp{});
        lse[k] = adds[k] ? with_sink.lse(FastLog{}) : 0.f;
      }
      for (int64_t t0 = t_begin; t0 < t_end; t0 += kDecodeTile) {
        const bool any = load_tile<T>(p, w, b, length, t0, t_end, tile, sK, sV);
        const int64_t key_pos = tile.pos[lane];
#pragma unroll
        for (int k = 0; k < RW; ++k) {
          float e = 0.f;
          if (any && adds[k]) {
            const RowInfo& row = rows[k];
            const float s = row_score(sQ + (warp * RW + k) * D, sK, D, lane);
            const float x = key_logit(a, row, streaming_visibility(a.causal, row.hs), key_pos, s);
            e = x == negative_infinity<float>() ? 0.f : FastExp{}(x - lse[k]);
          }
          sMass[(warp * RW + k) * kDecodeTile + lane] = e;
        }
        __syncthreads();
        if (threadIdx.x < kDecodeTile && tile.pos[threadIdx.x] >= 0) {
          float m = p.slot_mass[tile.row[threadIdx.x]];
          for (int rr = 0; rr < kDecodeRowsPerPass; ++rr) m += sMass[rr * kDecodeTile + threadIdx.x];
          p.slot_mass[tile.row[threadIdx.x]] = m;
        }
      }
    }

    // this chunk's partials: (max, sum) per row and branch, the accumulator where the sum is not 0
#pragma unroll
    for (int k = 0; k < RW; ++k) {
      const int64_t r = c0 + warp * RW + k;
      if (r >= R) continue;
#pragma unroll
      for (int br = 0; br < 2; ++br) {
        const int64_t at = r * 2 + br;
        if (lane == 0) {
          ms[2 * at] = st[br][k].max;
          ms[2 * at + 1] = st[br][k].sum;
        }
        if (st[br][k].sum != 0.f) {
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            const int64_t d = lane + 32 * t;
            if (d < D) acc_out[at * D + d] = acc[br][k][t];
          }
        }
      }
    }
  }
}

// A compensated streaming head's compensation key (kv_layout.h) merged into a row's softmax.
template <typename T, int NT>
__device__ void merge_compensation(const DecodeParams& p, int64_t b, int64_t kvh, const T* q, float softmax_scale,
                                   OnlineSoftmax<float>& row, float (&acc)[NT], int lane) {
  if (p.kv_kind[kvh] != kKvStreaming || p.comp_table == nullptr) return;
  const int64_t index = p.kv_index[kvh];
  if (index < 0 || index >= p.ring_heads) return;
  const Compensation comp = compensation_of(p.comp_table, index);
  if (comp.index < 0 || comp.index >= p.comp_heads) return;
  const int64_t c = b * p.comp_heads + comp.index, n = p.comp_n[c], D = p.attn.head_dim;
  if (n <= 0) return;
  const double* k_sum = p.comp_k + c * D;
  const double* v_sum = p.comp_v + c * D;
  float dot = 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) dot += TypeOps<T>::to_float(q[d]) * static_cast<float>(k_sum[d] / static_cast<double>(n));
  }
  dot = warp_sum(dot);
  const OnlineSoftmax<float> key{compensation_logit(softmax_scale * dot, n, comp.weighted, FastLog{}), 1.f};
  const auto scales = row.merge(key, FastExp{});
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) acc[t] = acc[t] * scales.self + static_cast<float>(v_sum[d] / static_cast<double>(n)) * scales.other;
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_combine_kernel(const DecodeParams p, const int64_t splits, const float* __restrict__ part_ms,
                          const float* __restrict__ part_acc) {
  const AttentionParams& a = p.attn;
  const int64_t D = a.head_dim, G = a.group(), Sq = a.seqlen_q, R = G * Sq;
  const int lane = threadIdx.x % 32;
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + threadIdx.x / 32;
  if (row_id >= a.batch * a.heads_q * Sq) return;
  const int64_t i = row_id % Sq, h = (row_id / Sq) % a.heads_q, b = row_id / (Sq * a.heads_q);
  const int64_t kvh = h / G, r = (h % G) * Sq + i;
  const HeadScalars<float> hs = read_head<float>(a, b, h);
  T* out = const_cast<T*>(a.out.row<T>(b, i, h));
  if (hs.gate == 0.f) {
    for (int64_t d = lane; d < D; d += 32) out[d] = TypeOps<T>::from_float(0.f);
    return;
  }
  const BranchPlan plan = plan_branches(hs);
  float merged[2][NT];
  float inv[2] = {0.f, 0.f};
#pragma unroll
  for (int br = 0; br < 2; ++br) {
#pragma unroll
    for (int t = 0; t < NT; ++t) merged[br][t] = 0.f;
    if (!(br == 0 ? plan.full : plan.streaming)) continue;
    OnlineSoftmax<float> row = OnlineSoftmax<float>::start(hs.has_sink_logit, hs.sink_logit);
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t at = (((b * a.heads_kv + kvh) * splits + s) * R + r) * 2 + br;
      const OnlineSoftmax<float> part{part_ms[2 * at], part_ms[2 * at + 1]};
      if (part.sum == 0.f) continue;  // the split saw nothing of this row
      const auto scales = row.merge(part, FastExp{});
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) merged[br][t] = merged[br][t] * scales.self + part_acc[at * D + d] * scales.other;
      }
    }
    // the streaming branch (a head served by a streaming KV head has no other)
    if (br == 1) merge_compensation<T, NT>(p, b, kvh, a.q.row<T>(b, i, h), hs.softmax_scale, row, merged[1], lane);
    inv[br] = row.inverse_sum();
  }
  const float* os = a.out_scale.present() ? a.out_scale.row<float>(b, h) : nullptr;
  const float* ob = a.out_bias.present() ? a.out_bias.row<float>(b, h) : nullptr;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t d = lane + 32 * t;
    if (d >= D) continue;
    const float full = merged[0][t] * inv[0], stream = merged[1][t] * inv[1];
    const float o = plan.full && plan.streaming ? mix_alpha(hs.alpha, full, stream) : (plan.full ? full : stream);
    out[d] = TypeOps<T>::from_float(epilogue(o, os ? os[d * a.out_scale.stride_n] : 1.f,
                                            ob ? ob[d * a.out_bias.stride_n] : 0.f, hs.gate));
  }
}

__global__ void write_table_kernel(const TableChunk chunk, const int count, int64_t* __restrict__ dst) {
  if (static_cast<int>(threadIdx.x) < count) dst[threadIdx.x] = chunk.values[threadIdx.x];
}

template <typename T, int NT>
cudaError_t launch_typed(const DecodeParams& p, int64_t splits, float* part_ms, float* part_acc, cudaStream_t stream) {
  const int smem = static_cast<int>(decode_smem_bytes(p.attn.head_dim));
  // once per (kernel, device), and only past 48 KiB (smem_opt_in.h)
  cudaError_t err = headops::cuda::opt_in_dynamic_smem(reinterpret_cast<const void*>(decode_partial_kernel<T, NT>), smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.attn.heads_kv), static_cast<unsigned>(p.attn.batch));
  decode_partial_kernel<T, NT><<<grid, kDecodeThreads, smem, stream>>>(p, splits, part_ms, part_acc);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows = p.attn.batch * p.attn.heads_q * p.attn.seqlen_q;
  const unsigned blocks = static_cast<unsigned>((rows + kDecodeWarps - 1) / kDecodeWarps);
  decode_combine_kernel<T, NT><<<blocks, kDecodeThreads, 0, stream>>>(p, splits, part_ms, part_acc);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const DecodeParams& p, int64_t splits, float* part_ms, float* part_acc, cudaStream_t stream) {
  const int64_t D = p.attn.head_dim;
  if (D <= 64) return launch_typed<T, 2>(p, splits, part_ms, part_acc, stream);
  if (D <= 128) return launch_typed<T, 4>(p, splits, part_ms, part_acc, stream);
  return launch_typed<T, 8>(p, splits, part_ms, part_acc, stream);
}

}  // namespace

int64_t decode_smem_bytes(int64_t head_dim) {
  const int64_t D = head_dim;
  return static_cast<int64_t>(sizeof(float)) *
         (kDecodeRowsPerPass * D + D * kPad + kDecodeTile * D + kDecodeRowsPerPass * kDecodeTile);
}

cudaError_t launch_write_table(int64_t* dst, const int64_t* values, int64_t count, cudaStream_t stream) {
  for (int64_t off = 0; off < count; off += kTableChunk) {
    TableChunk chunk;
    const int n = static_cast<int>(count - off < kTableChunk ? count - off : kTableChunk);
    std::memcpy(chunk.values, values + off, sizeof(int64_t) * n);
    write_table_kernel<<<1, kTableChunk, 0, stream>>>(chunk, n, dst + off);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_decode(const DecodeParams& p, DType dtype, int64_t splits, float* part_ms, float* part_acc,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_dim<float>(p, splits, part_ms, part_acc, stream);
    case DType::kBFloat16: return launch_dim<__nv_bfloat16>(p, splits, part_ms, part_acc, stream);
    case DType::kFloat16: return launch_dim<__half>(p, splits, part_ms, part_acc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace headops
