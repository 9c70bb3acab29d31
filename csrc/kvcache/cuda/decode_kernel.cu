// CUDA decode attention over a head-sparse KV cache layer, all heads in one call
// (flash-decoding: split-K partials, then a combine pass).
//
// Tested on an NVIDIA H200 (tests/test_kvcache_cuda.py through bench/gpu_suite.sh, 2026-12-04):
// a step's kernels take ~0.13 ms at 32k (docs/cuda.md has the numbers and the profile). Since
// that run, NOT YET RUN ON A GPU: the staging copies walk their (row, chunk) pairs without a
// division (chunk_walk.h; tests/test_cuda_emulation.py checks it against i / chunks) and P·V runs one loop
// per set of planned branches (staged_pv): the same copies and the same products in the same
// order, from 132 to 23 SASS instructions per 16-byte copy and from 187 to 68 per 2 keys of P·V
// (sm_90, bf16, D = 128, one branch), which the profile said bound the kernel; and the combine
// reads the splits' (max, sum) 32 at a time and merges only those that saw the row (the same
// merges in the same order).
//
// 1. decode_key_split_kernel, one CTA per (key split, KV head, batch row): the keys its GQA group
//    walks (a full head: the union of what its active query heads see, decode_semantics.h, split
//    into ranges of split_keys; a streaming head: its sinks + ring slots, each slot's position
//    from RingLayout::position_of_slot; a budget head: all its slots, positions from slot_pos,
//    in split 0 only) are walked in tiles of 32 keys, each warp its own tiles (below), and used
//    by all G * Sq query rows of the group. Each row keeps an online softmax per branch
//    (online_softmax.h) with visibility from head_semantics.h, and the item writes its partial
//    (max, sum, accumulator). A budget head's CTA then has every row's final softmax and adds
//    each kept token's probability to its attention mass (the CPU's order).
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
#include <new>

#include "../../attention/head_semantics.h"
#include "../../attention/online_softmax.h"
#include "../decode_semantics.h"
#include "../kv_layout.h"
#include "chunk_walk.h"
#include "kv_cache_kernels.cuh"
#include "../../attention/cuda/async_copy.cuh"
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

// Merges a partial softmax of a row (its (max, sum), its accumulator at acc_in, D floats) into
// `row` and its accumulator (lane holds columns lane + 32 t); a partial that saw nothing of the
// row (sum 0) is skipped.
template <int NT>
__device__ __forceinline__ void merge_partial(OnlineSoftmax<float>& row, float (&acc)[NT],
                                              const OnlineSoftmax<float>& part, const float* acc_in, int64_t D,
                                              int lane) {
  if (part.sum == 0.f) return;
  const auto scales = row.merge(part, FastExp{});
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) acc[t] = acc[t] * scales.self + acc_in[d] * scales.other;
  }
}
// (the partial's (max, sum) at ms)
template <int NT>
__device__ __forceinline__ void merge_partial(OnlineSoftmax<float>& row, float (&acc)[NT], const float* ms,
                                              const float* acc_in, int64_t D, int lane) {
  merge_partial<NT>(row, acc, OnlineSoftmax<float>{ms[0], ms[1]}, acc_in, D, lane);
}

// The CTA's range [begin, end) of the walk. Split-K: full and streaming heads split their walk
// into ranges of split_keys; a budget head is walked whole by split 0 (its attention mass needs
// each row's final softmax).
struct WalkRange {
  int64_t begin = 0, end = 0;
};
__device__ WalkRange split_range(const DecodeParams& p, const HeadWalk& w, int64_t split) {
  WalkRange r;
  if (w.kind == kKvBudget) {
    r.end = split == 0 ? w.n : 0;
  } else if (split < w.n / p.split_keys + (w.n % p.split_keys != 0)) {
    r.begin = split * p.split_keys;
    r.end = r.begin + min64(p.split_keys, w.n - r.begin);
  }
  return r;
}

// Row r of the (b, kvh) group's R = G * Sq rows (query head kvh * G + r / Sq, new token r % Sq);
// a row past R is inactive.
__device__ RowInfo row_info(const AttentionParams& a, int64_t b, int64_t kvh, int64_t r, int64_t R, int64_t length) {
  RowInfo row;
  row.active = false;
  row.pos = 0;
  row.hs = HeadScalars<float>{};
  row.plan = BranchPlan{false, false};
  row.bias = nullptr;
  if (r < R) {
    const int64_t h = kvh * a.group() + r / a.seqlen_q;
    row.hs = read_head<float>(a, b, h);
    row.active = row.hs.gate != 0.f;
    row.plan = plan_branches(row.hs);
    row.pos = length - a.seqlen_q + r % a.seqlen_q;
    row.bias = a.key_bias.present() ? a.key_bias.row<float>(b, h) : nullptr;
  }
  return row;
}

__device__ __forceinline__ bool plans_branch(const RowInfo& row, int br) {
  return row.active && (br == 0 ? row.plan.full : row.plan.streaming);
}
__device__ __forceinline__ HeadVisibility branch_visibility(const AttentionParams& a, const RowInfo& row, int br) {
  return br == 0 ? full_visibility(a.causal) : streaming_visibility(a.causal, row.hs);
}

// One tile of 32 keys (a logit per lane, -inf where hidden) joins a row's softmax: returns this
// lane's exp(logit - reference), 0 while the row has seen nothing; `correction` is what the
// row's accumulator must be multiplied by first.
__device__ __forceinline__ float softmax_tile(OnlineSoftmax<float>& sm, float x, float& correction) {
  correction = sm.rescale(warp_max(x), FastExp{});
  if (sm.max == negative_infinity<float>()) return 0.f;  // nothing visible yet
  const float e = FastExp{}(x - sm.reference());
  sm.add(warp_sum(e), correction);
  return e;
}

// The key-split kernel. Its first version (the "tile" kernel, retired after the H200 run of
// 2026-12-04, where this one's steps took 0.14-0.26x its time and its kernel 0.10-0.12x) gave each
// warp its own query rows and shared one 32-key tile among the warps: at decode (Sq = 1, a GQA group of 4) one warp held all
// the rows while the others only loaded, and every tile passed three CTA barriers behind scalar
// 2-byte loads (latency-bound, 12.5 % occupancy). Here every warp holds the same
// kDecodeRowsPerWarp rows and walks its own tiles of the CTA's key range (tile n goes to warp
// n % warps): the tile's key and value rows are copied into the warp's own shared memory by
// 16-byte cp.async (the values still in flight while the scores are taken), with warp barriers
// only; at the end of the walk the warps' partial softmaxes are merged in warp order into the
// item's partial, which the combine kernel reads. A budget head's attention mass is added after
// the merge, each warp for the keys of its own tiles. A group of more than 4 rows (G * Sq: GQA 8,
// several new tokens) divides the warps into row groups that walk the same keys at once (tile n
// to warp g + groups * (n mod warps / groups) of row group g), so that a tile's second read comes
// from L2 rather than from a second pass over the split; a budget head keeps one row group (its
// mass is added in row order).

// The value columns a lane holds (adjacent in the key-split kernel, strided by 32 in the merges):
// the fewest that cover D in 32 lanes, one instantiation each (launch_dim).
__host__ __device__ constexpr int value_columns_per_lane(int64_t D) {
  return D <= 64 ? 2 : D <= 128 ? 4 : D <= 256 ? 8 : 16;
}

// The shared-memory layout of a key-split CTA of `warps` warps and up to `row_groups` row groups
// for head dim D and element size `elem` (host and device compute it alike).
struct KeySplitLayout {
  int64_t q_stride;    // floats per staged query row: D rounded up to 8, zeros past D
  int64_t k_stride;    // bytes per staged key row: the row rounded up to 32 bytes plus 16, so that
                       // the 16-byte reads of lanes j = 0..7 (each its own row) meet no bank twice
  int64_t v_stride;    // bytes per staged value row (lanes read one row together, each its slice
                       // of value_columns_per_lane columns: the row rounded up to a whole slice
                       // too, so that the last lane's read stays in the row; 64 bytes for float32
                       // past D = 256)
  int64_t q_bytes;     // [row_groups * kDecodeRowsPerWarp][q_stride] floats
  int64_t warp_bytes;  // one warp's staging: [32][k_stride] then [32][v_stride]
  int64_t total;       // q_bytes + the staging of every warp (which the end-of-walk merge reuses)
};
__host__ __device__ inline KeySplitLayout key_split_layout(int64_t D, int64_t elem, int64_t warps, int64_t row_groups) {
  KeySplitLayout L;
  const int64_t row_bytes = (D * elem + 31) / 32 * 32;
  L.q_stride = (D + 7) / 8 * 8;
  L.k_stride = row_bytes + 16;
  const int64_t slice_bytes = value_columns_per_lane(D) * elem;  // 4 to 64, a divisor of 32 up to 32
  const int64_t v_align = slice_bytes > 32 ? slice_bytes : 32;
  L.v_stride = (D * elem + v_align - 1) / v_align * v_align;
  L.q_bytes = row_groups * kDecodeRowsPerWarp * L.q_stride * 4;
  L.warp_bytes = kDecodeTile * (L.k_stride + L.v_stride);
  const int64_t merge_bytes = warps * kDecodeRowsPerWarp * 2 * (2 + D) * 4;
  L.total = L.q_bytes + (warps * L.warp_bytes > merge_bytes ? warps * L.warp_bytes : merge_bytes);
  return L;
}

// The row groups of a key-split CTA of `warps` warps over R rows: as many as its rows fill (4
// each), at most one per warp, and a divisor of `warps` (every group has as many warps).
__host__ __device__ inline int64_t key_split_row_groups(int64_t warps, int64_t R) {
  int64_t groups = (R + kDecodeRowsPerWarp - 1) / kDecodeRowsPerWarp;
  if (groups > warps) groups = warps;
  while (groups > 1 && warps % groups != 0) --groups;
  return groups < 1 ? 1 : groups;
}

// One warp's staged tile: lane j's key (position or -1, key and value rows).
struct StagedKeys {
  int64_t pos[kDecodeTile];
  const unsigned char* k[kDecodeTile];
  const unsigned char* v[kDecodeTile];
};

// Lane `lane`'s key of the tile starting at walk index t0: its position (-1 past t1 or where the
// walk has none) and key and value rows.
template <typename T>
struct LaneKey {
  int64_t pos = -1;
  const T* k = nullptr;
  const T* v = nullptr;
};
template <typename T>
__device__ LaneKey<T> lane_key(const DecodeParams& p, const HeadWalk& w, int64_t b, int64_t length, int64_t t0,
                               int64_t t1, int lane) {
  LaneKey<T> key;
  const int64_t t = t0 + lane;
  if (t < t1) key.pos = walk_key<T>(p, w, b, length, t, key.k, key.v);
  return key;
}

// A warp's tiles of the CTA's range: tile first, first + stride, ... (of `count`), staged in turn
// in the warp's shared memory by stage(), the next one's keys walked while the current one's
// copies are in flight.
template <typename T>
struct WarpTiles {
  const DecodeParams& p;
  const HeadWalk& w;
  int64_t b, length;
  WalkRange range;
  const KeySplitLayout& L;
  bool aligned_rows, values;
  StagedKeys& st;
  unsigned char* sK;
  unsigned char* sV;
  int lane;
  int64_t n, stride, count;
  LaneKey<T> key;
  int64_t staged_t0 = 0;  // the first walk index of the tile stage() staged last

  __device__ void start() { key = lane_key<T>(p, w, b, length, range.begin + n * kDecodeTile, range.end, lane); }
  __device__ bool more() const { return n < count; }

  // Stages tile n (walk indices [t0, t0 + 32) ∩ the range, whose keys the lanes hold) and moves
  // on: positions and row pointers in `st`, the key rows in sK and, with `values`, the value rows
  // in sV. Keys without a position are not copied (nothing reads their rows). Rows copy by
  // 16-byte cp.async where every row starts on 16 bytes (`aligned_rows`: the host checked
  // D * elem and the storages), element by element otherwise, the key rows then with zeros up to
  // the 16-byte chunk the scores read. While the copies are in flight the lanes walk to the next
  // tile (its positions' table reads overlap the copies). Returns whether any key of the tile has
  // a position (the same in every lane); then the keys have landed and the values may still be
  // in flight (cp_async_wait<0> and a warp barrier before reading them).
  __device__ bool stage() {
    staged_t0 = range.begin + n * kDecodeTile;
    n += stride;
    const int64_t next_t0 = range.begin + n * kDecodeTile;
    __syncwarp();  // every lane is done with the previous tile
    st.pos[lane] = key.pos;
    st.k[lane] = reinterpret_cast<const unsigned char*>(key.k);
    st.v[lane] = reinterpret_cast<const unsigned char*>(key.v);
    const bool any = __any_sync(0xffffffffu, key.pos >= 0);
    __syncwarp();
    if (!any) {
      key = lane_key<T>(p, w, b, length, next_t0, range.end, lane);
      return false;
    }
    const int D = static_cast<int>(p.attn.head_dim);
    if (aligned_rows) {
      const int chunks = D * static_cast<int>(sizeof(T)) / 16;
      const int k_stride = static_cast<int>(L.k_stride), v_stride = static_cast<int>(L.v_stride);
      const uint32_t k_smem = smem_u32(sK), v_smem = smem_u32(sV);
      for (ChunkWalk at(lane, chunks, kDecodeTile); at.more(); at.next()) {
        if (st.pos[at.row] >= 0)
          cp_async_16(k_smem + at.row * k_stride + at.chunk * 16, st.k[at.row] + at.chunk * 16, 16);
      }
      cp_async_commit();
      if (values) {
        for (ChunkWalk at(lane, chunks, kDecodeTile); at.more(); at.next()) {
          if (st.pos[at.row] >= 0)
            cp_async_16(v_smem + at.row * v_stride + at.chunk * 16, st.v[at.row] + at.chunk * 16, 16);
        }
      }
      cp_async_commit();
    } else {
      constexpr int E = 16 / static_cast<int>(sizeof(T));
      const int padded = (D + E - 1) / E * E;
      for (int i = lane; i < kDecodeTile * padded; i += 32) {
        const int j = i / padded, d = i - j * padded;
        if (st.pos[j] < 0) continue;
        reinterpret_cast<T*>(sK + j * L.k_stride)[d] =
            d < D ? reinterpret_cast<const T*>(st.k[j])[d] : TypeOps<T>::from_float(0.f);
        if (values && d < D) reinterpret_cast<T*>(sV + j * L.v_stride)[d] = reinterpret_cast<const T*>(st.v[j])[d];
      }
    }
    key = lane_key<T>(p, w, b, length, next_t0, range.end, lane);
    cp_async_wait<1>();  // the keys (the values' group may still be in flight)
    __syncwarp();
    return true;
  }
};

// The floats of `kWords` 32-bit words read from shared memory at `src` (16-byte aligned when
// kWords >= 4, 8-byte when 2).
template <typename T, int kWords>
__device__ __forceinline__ void staged_floats(const unsigned char* src, float* out) {
  uint32_t words[kWords];
  if constexpr (kWords >= 4) {
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 x = reinterpret_cast<const uint4*>(src)[i];
      words[4 * i] = x.x;
      words[4 * i + 1] = x.y;
      words[4 * i + 2] = x.z;
      words[4 * i + 3] = x.w;
    }
  } else if constexpr (kWords == 2) {
    const uint2 x = *reinterpret_cast<const uint2*>(src);
    words[0] = x.x;
    words[1] = x.y;
  } else {
    words[0] = *reinterpret_cast<const uint32_t*>(src);
  }
#pragma unroll
  for (int i = 0; i < kWords; ++i) WordFloats<T>::unpack(words[i], out + i * WordFloats<T>::kPerWord);
}

// q . k of this lane's staged key row for each of the RW staged query rows (16 bytes of the key
// at a time, each chunk used by every row).
template <typename T, int RW>
__device__ __forceinline__ void staged_scores(const float* sQ, int64_t q_stride, const unsigned char* k_row,
                                              int64_t D, float (&s)[RW]) {
  constexpr int E = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int k = 0; k < RW; ++k) s[k] = 0.f;
  const int chunks = static_cast<int>((D + E - 1) / E);
#pragma unroll 2
  for (int c = 0; c < chunks; ++c) {
    float kf[E];
    staged_floats<T, 4>(k_row + c * 16, kf);
#pragma unroll
    for (int k = 0; k < RW; ++k) {
      const float* q = sQ + k * q_stride + c * E;
#pragma unroll
      for (int e = 0; e < E; ++e) s[k] = fmaf(q[e], kf[e], s[k]);
    }
  }
}

// A warp's staged tile: key rows (over which each lane wrote its key's probabilities, float4
// [branch][row] x 2) and value rows, with their strides in bytes.
struct StagedTile {
  const unsigned char* k;
  const unsigned char* v;
  int k_stride, v_stride;
};
constexpr int kFullBranch = 1, kStreamingBranch = 2;

// P·V of a staged tile for the branches in kBranches (kFullBranch, kStreamingBranch or both):
// each value row read once for the 4 rows, a key's probabilities by one broadcast 16-byte read
// per branch, the lane's NT adjacent columns. A (row, branch) pair the row does not plan has
// probability 0 throughout (its accumulator stays 0). A key with no position, or hidden from a
// row, has probability 0 there and adds nothing, whatever its value row holds (stale, or inf / NaN).
template <typename T, int NT, int kBranches>
__device__ __forceinline__ void staged_pv(const StagedTile& tile, int lane, bool lane_in_row,
                                          float (&acc)[2][kDecodeRowsPerWarp][NT]) {
  constexpr int RW = kDecodeRowsPerWarp;
  constexpr int kSliceWords = NT * static_cast<int>(sizeof(T)) / 4;  // a lane's NT values of a row
  const unsigned char* v_row = tile.v + lane * NT * static_cast<int>(sizeof(T));
#pragma unroll 2
  for (int j = 0; j < kDecodeTile; ++j) {
    float v[NT];
    if (lane_in_row) {
      staged_floats<T, kSliceWords>(v_row + j * tile.v_stride, v);
    } else {
#pragma unroll
      for (int t = 0; t < NT; ++t) v[t] = 0.f;
    }
    const float4* pj4 = reinterpret_cast<const float4*>(tile.k + j * tile.k_stride);
    const float4 p0 = pj4[0], p1 = pj4[1];
    const float pj[2][RW] = {{p0.x, p0.y, p0.z, p0.w}, {p1.x, p1.y, p1.z, p1.w}};
#pragma unroll
    for (int br = 0; br < 2; ++br) {
      if (!(kBranches & (br == 0 ? kFullBranch : kStreamingBranch))) continue;  // (compile time)
#pragma unroll
      for (int k = 0; k < RW; ++k) {
        const bool adds = pj[br][k] != 0.f;
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[br][k][t] = adds ? fmaf(pj[br][k], v[t], acc[br][k][t]) : acc[br][k][t];
      }
    }
  }
}

// 3 CTAs an SM where a value row of the widest head dim fits 256 bytes (bf16/fp16 to D = 128,
// float32 to D = 64; their shared memory allows 3 where the group has at most 4 rows), which caps
// the registers at 168 (sm_90: a 16-byte spill at D <= 128); wider rows leave shared memory for
// 1 CTA, so no cap.
template <typename T, int NT>
constexpr int key_split_min_blocks() {
  return NT * 32 * static_cast<int>(sizeof(T)) <= 256 ? 3 : 1;
}
static_assert(sizeof(StagedKeys) * kDecodeWarps + 2 * kDecodeRowsPerWarp * 4 + sizeof(HeadWalk) +
                      sizeof(RowInfo) * kDecodeWarps * kDecodeRowsPerWarp + 2 * 128 <=
                  kKeySplitStaticSmem,
              "kKeySplitStaticSmem must bound the key-split kernel's static shared memory");

template <typename T, int NT>
__global__ void __launch_bounds__(kDecodeThreads, key_split_min_blocks<T, NT>())
    decode_key_split_kernel(const DecodeParams p, const int64_t splits, const int64_t row_groups,
                            const bool aligned_rows, float* __restrict__ part_ms, float* __restrict__ part_acc) {
  constexpr int RW = kDecodeRowsPerWarp;
  static_assert(RW == 4, "a lane's probabilities are one float4 per branch");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ StagedKeys staged[kDecodeWarps];
  __shared__ float s_lse[RW];
  __shared__ int s_adds[RW];
  __shared__ RowInfo s_rows[kDecodeWarps * RW];
  const AttentionParams& a = p.attn;
  const int64_t D = a.head_dim, G = a.group(), Sq = a.seqlen_q, R = G * Sq;
  const int64_t split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const KeySplitLayout L = key_split_layout(D, sizeof(T), warps, row_groups);
  float* sQ = reinterpret_cast<float*>(smem_raw);                   // [row_groups * RW][q_stride]
  unsigned char* sK = smem_raw + L.q_bytes + warp * L.warp_bytes;  // this warp's [32][k_stride]
  unsigned char* sV = sK + kDecodeTile * L.k_stride;                // and [32][v_stride]
  float* sMergeMs = reinterpret_cast<float*>(smem_raw + L.q_bytes);  // after the walk: [warps][RW][2][2]
  float* sMergeAcc = sMergeMs + warps * RW * 4;                       // [warps][RW][2][D]
  StagedKeys& st = staged[warp];
  const int64_t item = (b * a.heads_kv + kvh) * splits + split;  // partials [item][R][2 branches]
  float* ms = part_ms + item * R * 4;
  float* acc_out = part_acc + item * R * 2 * D;

  const int64_t length = p.lengths[b];
  // the walk in shared memory, read where a lane walks a tile (in registers it would hold ~20)
  __shared__ alignas(HeadWalk) unsigned char s_walk[sizeof(HeadWalk)];
  if (threadIdx.x == 0) new (s_walk) HeadWalk(head_walk(p, b, kvh, length, group_keys<float>(a, b, kvh, length)));
  __syncthreads();
  const HeadWalk& w = *reinterpret_cast<const HeadWalk*>(s_walk);
  const WalkRange range = split_range(p, w, split);
  if (range.begin >= range.end) {  // nothing to walk (past the row's length, gated off, empty head): empty partials
    for (int64_t i = threadIdx.x; i < R * 2; i += blockDim.x) {
      ms[2 * i] = negative_infinity<float>();
      ms[2 * i + 1] = 0.f;
    }
    return;
  }
  const int64_t tiles = (range.end - range.begin + kDecodeTile - 1) / kDecodeTile;
  // this warp's row group and its share of the tiles (a budget head: one group, every warp)
  const int groups = w.kind == kKvBudget ? 1 : static_cast<int>(row_groups);
  const int row_group = warp % groups, group_warps = warps / groups, first_tile = warp / groups;
  const float* wQ = sQ + row_group * RW * L.q_stride;

  for (int64_t c0 = 0; c0 < R; c0 += groups * RW) {
    __syncthreads();  // the previous chunk's merge and budget pass are done with shared memory
    for (int64_t i = threadIdx.x; i < groups * RW * L.q_stride; i += blockDim.x) {
      const int64_t k = i / L.q_stride, d = i - k * L.q_stride, r = c0 + k;
      sQ[i] = r < R && d < D ? TypeOps<T>::to_float(a.q.row<T>(b, r % Sq, kvh * G + r / Sq)[d]) : 0.f;
    }
    // the pass's rows in shared memory too, read where a tile's logits are taken (in registers
    // they would hold ~50)
    if (threadIdx.x < groups * RW) s_rows[threadIdx.x] = row_info(a, b, kvh, c0 + threadIdx.x, R, length);
    __syncthreads();
    const RowInfo* rows = s_rows + row_group * RW;
    bool planned[2][RW];
    OnlineSoftmax<float> sm[2][RW];
    float acc[2][RW][NT];
    // the branches any of the warp's rows plans: P·V runs the loop of that set (no test of a row's
    // plan for each key), and a warp whose rows are all past R or gated off (none) walks nothing
    int branch_set = 0;
#pragma unroll
    for (int k = 0; k < RW; ++k) {
#pragma unroll
      for (int br = 0; br < 2; ++br) {
        planned[br][k] = plans_branch(rows[k], br);
        if (planned[br][k]) branch_set |= br == 0 ? kFullBranch : kStreamingBranch;
        sm[br][k] = OnlineSoftmax<float>::start(false, 0.f);  // the sink logit joins once, in the combine
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[br][k][t] = 0.f;
      }
    }
    const bool lane_in_row = lane * NT < D;  // the lane's NT value columns start inside the row
    WarpTiles<T> walk{p, w, b, length, range, L, aligned_rows, true, st, sK, sV,
                      lane, first_tile, group_warps, branch_set != 0 ? tiles : 0};
    for (walk.start(); walk.more();) {
      if (!walk.stage()) continue;
      const int64_t key_pos = st.pos[lane];
      float s[RW];
      if (key_pos >= 0) {
        staged_scores<T, RW>(wQ, L.q_stride, sK + lane * L.k_stride, D, s);
      } else {
#pragma unroll
        for (int k = 0; k < RW; ++k) s[k] = 0.f;
      }
      float e[2][RW];
#pragma unroll
      for (int k = 0; k < RW; ++k) {
#pragma unroll
        for (int br = 0; br < 2; ++br) {
          e[br][k] = 0.f;
          if (!planned[br][k]) continue;  // warp-uniform
          float correction;
          e[br][k] = softmax_tile(sm[br][k], key_logit(a, rows[k], branch_visibility(a, rows[k], br), key_pos, s[k]),
                                  correction);
          if (correction != 1.f) {
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[br][k][t] *= correction;
          }
        }
      }
      // the lane's probabilities over its own key row, which only it has read: [branch][row]
      float4* probs = reinterpret_cast<float4*>(sK + lane * L.k_stride);
      probs[0] = make_float4(e[0][0], e[0][1], e[0][2], e[0][3]);
      probs[1] = make_float4(e[1][0], e[1][1], e[1][2], e[1][3]);
      cp_async_wait<0>();
      __syncwarp();  // every lane's value rows have landed and its probabilities are written
      const StagedTile tile{sK, sV, static_cast<int>(L.k_stride), static_cast<int>(L.v_stride)};
      if (branch_set == kFullBranch)
        staged_pv<T, NT, kFullBranch>(tile, lane, lane_in_row, acc);
      else if (branch_set == kStreamingBranch)
        staged_pv<T, NT, kStreamingBranch>(tile, lane, lane_in_row, acc);
      else
        staged_pv<T, NT, kFullBranch | kStreamingBranch>(tile, lane, lane_in_row, acc);
    }

    // the warps' partials merged in warp order into the item's partial (the merge area is the
    // staging's memory: every warp must be done with its tiles)
    __syncthreads();
#pragma unroll
    for (int k = 0; k < RW; ++k) {
#pragma unroll
      for (int br = 0; br < 2; ++br) {
        const int64_t at = (warp * RW + k) * 2 + br;
        if (lane == 0) {
          sMergeMs[2 * at] = sm[br][k].max;
          sMergeMs[2 * at + 1] = sm[br][k].sum;
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int64_t d = lane * NT + t;
          if (d < D) sMergeAcc[at * D + d] = acc[br][k][t];
        }
      }
    }
    __syncthreads();
    // pair (row group g, row k, branch br): the warps g, g + groups, ... in order
    for (int pair = warp; pair < groups * RW * 2; pair += warps) {
      const int g = pair / (RW * 2), k = (pair / 2) % RW, br = pair % 2;
      const int64_t r = c0 + g * RW + k;
      const bool budget_row = w.kind == kKvBudget && br == 1 && lane == 0;  // (groups == 1)
      if (r >= R) {
        if (budget_row) s_adds[k] = 0;
        continue;
      }
      OnlineSoftmax<float> merged{negative_infinity<float>(), 0.f};
      float o[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) o[t] = 0.f;
      for (int src = g; src < warps; src += groups) {
        const int64_t at = (src * RW + k) * 2 + br;
        merge_partial<NT>(merged, o, sMergeMs + 2 * at, sMergeAcc + at * D, D, lane);
      }
      const int64_t at = r * 2 + br;
      if (lane == 0) {
        ms[2 * at] = merged.max;
        ms[2 * at + 1] = merged.sum;
      }
      if (merged.sum != 0.f) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int64_t d = lane + 32 * t;
          if (d < D) acc_out[at * D + d] = o[t];
        }
      }
      if (budget_row) {
        // a budget head's row: its final softmax with the sink logit, for the attention mass
        const RowInfo& row = s_rows[g * RW + k];
        const bool adds = row.active && row.plan.streaming && merged.max != negative_infinity<float>();
        OnlineSoftmax<float> with_sink = OnlineSoftmax<float>::start(row.hs.has_sink_logit, row.hs.sink_logit);
        if (adds) with_sink.merge(merged, FastExp{});
        s_adds[k] = adds;
        s_lse[k] = adds ? with_sink.lse(FastLog{}) : 0.f;
      }
    }

    if (w.kind == kKvBudget && p.slot_mass != nullptr) {
      // each kept token's probability under each row's final softmax, added to its attention
      // mass in row order (as the CPU kernel does); a token is in one warp's tiles only
      __syncthreads();  // s_lse and s_adds are written, the merge area is read
      float lse[RW];
      bool adds[RW];
#pragma unroll
      for (int k = 0; k < RW; ++k) {
        adds[k] = s_adds[k] != 0;
        lse[k] = s_lse[k];
      }
      // (one row group: first_tile = warp, group_warps = warps)
      WarpTiles<T> walk{p, w, b, length, range, L, aligned_rows, false, st, sK, sV,
                        lane, first_tile, group_warps, tiles};
      for (walk.start(); walk.more();) {
        if (!walk.stage()) continue;
        const int64_t key_pos = st.pos[lane];
        if (key_pos >= 0) {
          float s[RW];
          staged_scores<T, RW>(wQ, L.q_stride, sK + lane * L.k_stride, D, s);
          const int64_t slot = w.base + walk.staged_t0 + lane;  // (streaming storage row, slot_mass index)
          float m = p.slot_mass[slot];
#pragma unroll
          for (int k = 0; k < RW; ++k) {
            if (!adds[k]) continue;
            const float x = key_logit(a, rows[k], streaming_visibility(a.causal, rows[k].hs), key_pos, s[k]);
            m += x == negative_infinity<float>() ? 0.f : FastExp{}(x - lse[k]);
          }
          p.slot_mass[slot] = m;
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
    // the splits in order; their (max, sum) read 32 at a time, a split a lane, and only the splits
    // that saw the row merged (most are empty where the splits come from a capacity far above the
    // row's walk, e.g. every streaming head's ring counted in one head's), the same merges as one
    // split at a time, without a dependent load for each empty one
    const auto partial_at = [&](int64_t s) { return (((b * a.heads_kv + kvh) * splits + s) * R + r) * 2 + br; };
    for (int64_t base = 0; base < splits; base += 32) {
      float s_max = negative_infinity<float>(), s_sum = 0.f;
      if (base + lane < splits) {
        const int64_t at = partial_at(base + lane);
        s_max = part_ms[2 * at];
        s_sum = part_ms[2 * at + 1];
      }
      for (unsigned live = __ballot_sync(0xffffffffu, s_sum != 0.f); live != 0; live &= live - 1) {
        const int src = __ffs(live) - 1;
        const OnlineSoftmax<float> part{__shfl_sync(0xffffffffu, s_max, src), __shfl_sync(0xffffffffu, s_sum, src)};
        merge_partial<NT>(row, merged[br], part, part_acc + partial_at(base + src) * D, D, lane);
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
cudaError_t launch_combine(const DecodeParams& p, int64_t splits, float* part_ms, float* part_acc, cudaStream_t stream) {
  const int64_t rows = p.attn.batch * p.attn.heads_q * p.attn.seqlen_q;
  const unsigned blocks = static_cast<unsigned>((rows + kDecodeWarps - 1) / kDecodeWarps);
  decode_combine_kernel<T, NT><<<blocks, kDecodeThreads, 0, stream>>>(p, splits, part_ms, part_acc);
  return cudaGetLastError();
}

// The warps of a key-split CTA over R rows whose splits walk at most split_keys keys (a full or
// streaming head): of the counts 1..kDecodeWarps whose layout fits `limit` bytes of dynamic
// shared memory, the one with the fewest tile steps per warp (passes over the rows times tiles a
// warp of a row group walks), the fewer warps on a tie; 0 when not even one warp fits.
int key_split_warps(int64_t head_dim, int64_t elem, int64_t split_keys, int64_t R, int64_t limit) {
  const int64_t tiles = (split_keys + kDecodeTile - 1) / kDecodeTile;
  const int64_t chunks = (R + kDecodeRowsPerWarp - 1) / kDecodeRowsPerWarp;
  int best = 0;
  int64_t best_steps = 0;
  for (int warps = 1; warps <= kDecodeWarps; ++warps) {
    const int64_t groups = key_split_row_groups(warps, R);
    if (key_split_layout(head_dim, elem, warps, groups).total > limit) continue;
    const int64_t group_warps = warps / groups;
    const int64_t steps = (chunks + groups - 1) / groups * ((tiles + group_warps - 1) / group_warps);
    if (best == 0 || steps < best_steps) {
      best = warps;
      best_steps = steps;
    }
  }
  return best;
}

template <typename T, int NT>
cudaError_t launch_typed(const DecodeParams& p, const DecodeLaunch& launch, float* part_ms, float* part_acc,
                         cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(decode_key_split_kernel<T, NT>);
  const int64_t R = p.attn.group() * p.attn.seqlen_q, splits = launch.splits;
  const int warps =
      key_split_warps(p.attn.head_dim, sizeof(T), p.split_keys, R, launch.shared_optin_bytes - kKeySplitStaticSmem);
  if (warps == 0) return cudaErrorInvalidValue;  // (the host checked decode_smem_bytes first)
  const int64_t row_groups = key_split_row_groups(warps, R);
  const int smem = static_cast<int>(key_split_layout(p.attn.head_dim, sizeof(T), warps, row_groups).total);
  cudaError_t err = headops::cuda::opt_in_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.attn.heads_kv), static_cast<unsigned>(p.attn.batch));
  decode_key_split_kernel<T, NT><<<grid, 32 * warps, smem, stream>>>(p, splits, row_groups, launch.aligned_rows,
                                                                     part_ms, part_acc);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_combine<T, NT>(p, splits, part_ms, part_acc, stream);
}

template <typename T>
cudaError_t launch_dim(const DecodeParams& p, const DecodeLaunch& launch, float* part_ms, float* part_acc,
                       cudaStream_t stream) {
  switch (value_columns_per_lane(p.attn.head_dim)) {
    case 2: return launch_typed<T, 2>(p, launch, part_ms, part_acc, stream);
    case 4: return launch_typed<T, 4>(p, launch, part_ms, part_acc, stream);
    case 8: return launch_typed<T, 8>(p, launch, part_ms, part_acc, stream);
    default: return launch_typed<T, 16>(p, launch, part_ms, part_acc, stream);
  }
}

}  // namespace

int64_t decode_smem_bytes(int64_t head_dim, int64_t elem_bytes) {
  return key_split_layout(head_dim, elem_bytes, 1, 1).total + kKeySplitStaticSmem;
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

cudaError_t launch_decode(const DecodeParams& p, DType dtype, const DecodeLaunch& launch, float* part_ms,
                          float* part_acc, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_dim<float>(p, launch, part_ms, part_acc, stream);
    case DType::kBFloat16: return launch_dim<__nv_bfloat16>(p, launch, part_ms, part_acc, stream);
    case DType::kFloat16: return launch_dim<__half>(p, launch, part_ms, part_acc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace headops
