// Decode attention over a head-sparse KV cache layer, all heads in one call (CPU).
//
// Work items are (batch row, KV head, slot range): a full KV head's visible keys are split
// into ranges of split_keys slots (split-K, so one long head does not serialise the step), a
// streaming KV head's ring into its runs of consecutive positions (at most three), a budget KV
// head is one item over its slots (explicit positions). An item reads its K/V slots once for
// all the query heads of its GQA group and all new query tokens (one tile product), keeps an
// online softmax per (row, branch), and writes a partial (max, sum, accumulator). A combine
// pass merges each row's partials, adds the sink logit and a compensated streaming head's
// compensation key (RazorAttention), mixes alpha and applies the epilogue.
// Visibility and the epilogue come from head_semantics.h; slot positions from kv_layout.h.
#pragma once

#ifndef CPU_CAPABILITY
#error "include decode_kernel.h from a decode_<isa>.cpp that defines CPU_CAPABILITY"
#endif
#define HEADOPS_ISA_NAMESPACE CPU_CAPABILITY

#include "decode_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../attention/head_semantics.h"
#include "../../attention/online_softmax.h"
#include "../../attention/work_counters.h"
#include "../../cpu/cache_line_vector.h"
#include "../../cpu/parallel.h"
#include "../../cpu/row_ops.h"
#include "../decode_semantics.h"
#include "../kv_layout.h"

namespace headops::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kDecodeBlock = 256;  // slots per tile product

// The decode step's two products stream each kept K and V row from memory once, straight from
// the cache (no packed or converted copy of a block is written: a BLAS sgemm with the few rows
// of a decode step spends most of its time packing the block, ~4x its multiply on the AVX2
// EPYC). Rows of 16-bit storage are converted in registers as they stream in.

// bfloat16 rows widen to float by placing each element in the upper half of a 32-bit lane. On
// AVX2 and AVX-512 one unpack of the loaded row against zero does that for half the elements
// (one instruction per vector, where a widening move plus a shift is two; the products are
// compute-bound on the 2-core AVX2 EPYC), at the price of an order of their own: within each
// 128-bit lane of 8 stored elements the first vector takes elements 0-3, the second 4-7. The
// products use the row in that order: the queries of the score product are permuted to match
// (pair_permuted_queries), and the PV accumulators hold their columns in it until the item's
// partials are written (unpermute_columns).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <typename acc_t, typename scalar_t>
constexpr bool kInterleavedPair = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>;
#else
template <typename acc_t, typename scalar_t>
constexpr bool kInterleavedPair = false;
#endif

// Keeps a loaded vector in a register: the compiler would otherwise fold the load into each of
// the two unpacks that use it, reading the row twice.
template <typename V>
__attribute__((always_inline)) inline void in_register(V& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  asm("" : "+v"(x));
#else
  (void)x;
#endif
}

// Two accumulator vectors' worth of a stored row from `row` on (16-bit elements converted; in
// the interleaved order above where kInterleavedPair).
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline std::pair<Vectorized<acc_t>, Vectorized<acc_t>> load_pair(const scalar_t* row) {
  using V = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {V::loadu(row), V::loadu(row + V::size())};
  } else if constexpr (kInterleavedPair<acc_t, scalar_t>) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512i x = _mm512_loadu_si512(row);
    in_register(x);
    const __m512i zero = _mm512_setzero_si512();
    return {V(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, x))), V(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, x)))};
#elif defined(CPU_CAPABILITY_AVX2)
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    in_register(x);
    const __m256i zero = _mm256_setzero_si256();
    return {V(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x))), V(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x)))};
#endif
  } else {
    static_assert(Vectorized<scalar_t>::size() == 2 * V::size());
    auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(row));
    return {x0, x1};
  }
}

template <typename acc_t>
constexpr int64_t pair_width() {
  return 2 * Vectorized<acc_t>::size();
}

// The stored element (within its pair) that lane i of load_pair's two vectors holds.
template <typename acc_t, typename scalar_t>
constexpr int64_t pair_element(int64_t i) {
  if constexpr (!kInterleavedPair<acc_t, scalar_t>) {
    return i;
  } else {
    constexpr int64_t n = Vectorized<acc_t>::size();
    const int64_t half = i / n, lane = i % n;
    return lane / 4 * 8 + half * 4 + lane % 4;
  }
}

// A query row (stored like the keys) into `out` in load_pair's order over the whole pairs of a
// row (the rest as is): load_pair itself, so the two orders agree by construction. Once per row
// and item, but an item may hold only a few keys (a streaming head's sinks, a short ring), where
// an element-by-element permutation was most of the item's time.
template <typename acc_t, typename scalar_t>
void pair_permuted_queries(acc_t* out, const scalar_t* q, int64_t D) {
  constexpr int64_t W = pair_width<acc_t>(), n = Vectorized<acc_t>::size();
  const int64_t Dv = D / W * W;
  for (int64_t d0 = 0; d0 < Dv; d0 += W) {
    const auto [x0, x1] = load_pair<acc_t, scalar_t>(q + d0);
    x0.store(out + d0);
    x1.store(out + d0 + n);
  }
  for (int64_t d = Dv; d < D; ++d) out[d] = static_cast<acc_t>(q[d]);
}

// Asks for a stored row's cache lines ahead of their use, into L2 (prefetcht1), not L1: a
// block's value rows (128 KB in float32) would not stay in L1 until the PV product reads them
// anyway, and asking for L1 made the whole step slower. On the Zen 4 EPYC (2 threads, 5
// interleaved pairs) prefetcht1 read 22.8-24.6 GB/s of float32 K/V at 65k keys against
// 18.3-20.6 with prefetcht0, and bfloat16 at 131k keys 17.7-18.9 against 15.6-17.3; the AVX2
// variant gained as much.
__attribute__((always_inline)) inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

// How many rows ahead a product asks for: the rows of the next 4 KB (8 rows of D = 128 in
// float32, 16 in bfloat16). With a fixed 8 rows, bfloat16 keys read 18-19 GB/s where 16 rows
// read 19-21 (Zen 4 EPYC, 131k keys, 2 threads); float32 read as fast 4, 8 or 16 rows ahead.
inline int64_t rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(row_bytes, 1));
}

// Whether the score product asks for key rows ahead (the value rows it always asks for: the PV
// product reads them by columns, which no hardware prefetcher follows). The key rows are read
// in order, row after row: on the AVX2-only Zen 3 EPYC the hardware prefetcher keeps that
// stream ahead better alone; the software prefetches seemed only to compete for miss buffers
// with the value rows' (in one process, variant switched call by call, 11 rounds, 256 MiB
// copied between calls: 2 threads, float32 32k keys all KV heads full 17.0-19.0 -> 19.8-23.4
// GB/s, bfloat16 13.8-18.0 -> 15.8-21.4, bfloat16 131k 25 % full 14.0-17.9 -> 14.7-20.0; one
// thread float32 10.4-10.9 -> 13.2-15.6). float16 rows, widened by conversion instructions,
// lost 1-5 % without them and keep them. With AVX-512 (Zen 4/5 EPYC, the AMX Xeon) the keys are
// still asked for 4 KB ahead: measured there against other distances, not yet against none.
template <typename scalar_t>
constexpr bool prefetch_keys() {
#if defined(CPU_CAPABILITY_AVX2)
  return std::is_same_v<scalar_t, c10::Half>;
#else
  return true;
#endif
}

// s[r, j] = q_r . k_j for NR rows of q (acc_t, [NR, D], in load_pair's order) and the nk stored
// rows of k. `v` (or null): the block's value rows, fetched into cache here so that the PV
// product that follows reads them from L2 rather than waiting on memory row by row.
template <int NR, typename acc_t, typename scalar_t>
void score_rows(acc_t* s, int64_t lds, const acc_t* q, const scalar_t* k, const scalar_t* v, int64_t nk,
                int64_t D) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = pair_width<acc_t>();
  const int64_t Dv = D / W * W;
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t)), ahead = rows_ahead(row_bytes);
  for (int64_t j = 0; j < nk; ++j) {
    // the rows `ahead` are on their way from memory while this one is multiplied (or, where
    // prefetch_keys is false, on the hardware prefetcher's way)
    if (prefetch_keys<scalar_t>() && j + ahead < nk) prefetch_row(k + (j + ahead) * D, row_bytes);
    if (v) prefetch_row(v + j * D, row_bytes);
    const scalar_t* kr = k + j * D;
    V a[NR], b[NR];  // two chains per row: half the FMA latency each
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) a[r] = b[r] = V(acc_t(0));
    for (int64_t d = 0; d < Dv; d += W) {
      const auto [x0, x1] = load_pair<acc_t>(kr + d);
      #pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        a[r] = at::vec::fmadd(V::loadu(q + r * D + d), x0, a[r]);
        b[r] = at::vec::fmadd(V::loadu(q + r * D + d + V::size()), x1, b[r]);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      acc_t sum = at::vec::vec_reduce_all<acc_t>([](V x, V y) { return x + y; }, a[r] + b[r]);
      for (int64_t d = Dv; d < D; ++d) sum += q[r * D + d] * static_cast<acc_t>(kr[d]);
      s[r * lds + j] = sum;
    }
  }
}

#if defined(__AVX512BF16__)
// score_rows for bfloat16 keys and bfloat16 queries as stored (an overload: the template above
// cannot take float scores from 16-bit queries), where the CPU has AVX512-BF16: vdpbf16ps multiplies
// pairs of stored elements straight into float sums, so neither side is widened (the queries
// are bfloat16 already: nothing is rounded) and a row costs one instruction per 32 elements and
// query row, where widening and two FMAs cost three. D a multiple of 32.
template <int NR>
void score_rows(float* s, int64_t lds, const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v,
                int64_t nk, int64_t D) {
  const int64_t row_bytes = D * int64_t(sizeof(c10::BFloat16)), ahead = rows_ahead(row_bytes);
  auto pairs = [](const c10::BFloat16* at) { return (__m512bh)_mm512_loadu_si512(at); };
  for (int64_t j = 0; j < nk; ++j) {
    if (prefetch_keys<c10::BFloat16>() && j + ahead < nk) prefetch_row(k + (j + ahead) * D, row_bytes);
    if (v) prefetch_row(v + j * D, row_bytes);
    const c10::BFloat16* kr = k + j * D;
    __m512 a[NR], b[NR];  // two chains per row, as in score_rows
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) a[r] = b[r] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
      const __m512bh x0 = pairs(kr + d), x1 = pairs(kr + d + 32);
      #pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        a[r] = _mm512_dpbf16_ps(a[r], pairs(q + r * D + d), x0);
        b[r] = _mm512_dpbf16_ps(b[r], pairs(q + r * D + d + 32), x1);
      }
    }
    if (d < D) {
      const __m512bh x0 = pairs(kr + d);
      #pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) a[r] = _mm512_dpbf16_ps(a[r], pairs(q + r * D + d), x0);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) s[r * lds + j] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
  }
}
#endif

// q: the R query rows as score_rows reads them (acc_t in load_pair's order, or bfloat16 as
// stored for the AVX512-BF16 overload)
template <typename acc_t, typename q_t, typename scalar_t>
void block_scores_direct(acc_t* s, int64_t lds, const q_t* q, int64_t R, const scalar_t* k, const scalar_t* v,
                         int64_t nk, int64_t D) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    acc_t* out = s + r0 * lds;
    const q_t* qr = q + r0 * D;
    const scalar_t* fetch = r0 == 0 ? v : nullptr;  // once per block
    switch (std::min<int64_t>(4, R - r0)) {
      case 4: score_rows<4>(out, lds, qr, k, fetch, nk, D); break;
      case 3: score_rows<3>(out, lds, qr, k, fetch, nk, D); break;
      case 2: score_rows<2>(out, lds, qr, k, fetch, nk, D); break;
      default: score_rows<1>(out, lds, qr, k, fetch, nk, D); break;
    }
  }
}

// Vector pairs of columns a PV pass keeps in registers for 4 rows: 4 x 2 pairs = 16 accumulators
// fit AVX-512's 32 registers; AVX2 has 16, so one pair (8 accumulators, no spills).
#ifdef CPU_CAPABILITY_AVX512
constexpr int kPvPairs = 2;
#else
constexpr int kPvPairs = 1;
#endif

// acc[r, :] += sum_j prob[r, j] * v[j, :] for NR rows, over columns [d0, d0 + kPvPairs * 2W).
// The score product fetched the value rows into cache (score_rows).
template <int NR, typename acc_t, typename scalar_t>
void accumulate_rows(acc_t* acc, const acc_t* prob, int64_t ldp, const scalar_t* v, int64_t nk, int64_t D,
                     int64_t d0) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = pair_width<acc_t>();
  constexpr int C = 2 * kPvPairs;
  V a[NR][C];
  #pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[r][c] = V::loadu(acc + r * D + d0 + c * V::size());
  for (int64_t j = 0; j < nk; ++j) {
    const scalar_t* row = v + j * D + d0;
    V x[C];
    #pragma GCC unroll 8
    for (int c = 0; c < C; c += 2) {
      const auto pair = load_pair<acc_t>(row + c / 2 * W);
      x[c] = pair.first;
      x[c + 1] = pair.second;
    }
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const V pr(prob[r * ldp + j]);
      #pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[r][c] = at::vec::fmadd(pr, x[c], a[r][c]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[r][c].store(acc + r * D + d0 + c * V::size());
}

// acc[r, :] += prob[r, :] V. The columns of acc's whole chunks (kPvPairs pairs) are in
// load_pair's order; unpermute_columns restores the stored order.
template <typename acc_t, typename scalar_t>
void accumulate_pv(acc_t* acc, int64_t R, const acc_t* prob, int64_t ldp, const scalar_t* v, int64_t nk,
                   int64_t D) {
  constexpr int64_t kChunk = kPvPairs * pair_width<acc_t>();
  int64_t d0 = 0;
  for (; d0 + kChunk <= D; d0 += kChunk) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      acc_t* a = acc + r0 * D;
      const acc_t* p = prob + r0 * ldp;
      switch (std::min<int64_t>(4, R - r0)) {
        case 4: accumulate_rows<4>(a, p, ldp, v, nk, D, d0); break;
        case 3: accumulate_rows<3>(a, p, ldp, v, nk, D, d0); break;
        case 2: accumulate_rows<2>(a, p, ldp, v, nk, D, d0); break;
        default: accumulate_rows<1>(a, p, ldp, v, nk, D, d0); break;
      }
    }
  }
  for (; d0 < D; ++d0)  // head dims that are not a multiple of the chunk
    for (int64_t r = 0; r < R; ++r) {
      acc_t sum = 0;
      for (int64_t j = 0; j < nk; ++j) sum += prob[r * ldp + j] * static_cast<acc_t>(v[j * D + d0]);
      acc[r * D + d0] += sum;
    }
}

// One pair of accumulate_pv's columns (two vectors in load_pair's order) back in the stored
// order: within each 128-bit lane the first vector holds elements 0-3 of 8, the second 4-7.
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void unpermute_pair(acc_t* out, const acc_t* acc) {
  constexpr int64_t W = pair_width<acc_t>();
  if constexpr (kInterleavedPair<acc_t, scalar_t>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 lo = _mm512_loadu_ps(acc), hi = _mm512_loadu_ps(acc + 16);
    // stored element e of the pair sits at permuted index (e % 8 < 4 ? 0 : 16) + e / 8 * 4 + e % 4
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
    return;
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 lo = _mm256_loadu_ps(acc), hi = _mm256_loadu_ps(acc + 8);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    return;
#endif
  }
  for (int64_t i = 0; i < W; ++i) out[pair_element<acc_t, scalar_t>(i)] = acc[i];
}

// One row of accumulate_pv's columns (acc) in the stored order (out).
template <typename acc_t, typename scalar_t>
void unpermute_columns(acc_t* out, const acc_t* acc, int64_t D) {
  constexpr int64_t W = pair_width<acc_t>();
  const int64_t whole = D / (kPvPairs * W) * (kPvPairs * W);
  for (int64_t d0 = 0; d0 < whole; d0 += W) unpermute_pair<acc_t, scalar_t>(out + d0, acc + d0);
  std::copy(acc + whole, acc + D, out + whole);
}

struct DecodeItem {
  int64_t b, kvh, j0, j1;  // slot range [j0, j1) of one KV head's storage ...
  int64_t pos_offset;      // ... holding positions j0 + pos_offset .. j1 - 1 + pos_offset
};

// Where the slots of one (b, KV head) live and which position each holds: for a full head, the
// segment of its storage that holds slot `first`. Items and key blocks span segments (a cache
// grown one token at a time has a segment per 64 tokens up to 4096 and per 1/64 of its capacity
// beyond; blocks cut at every segment were as small as 64 keys).
template <typename scalar_t>
struct HeadStorage {
  const scalar_t* k;
  const scalar_t* v;
  int64_t length;
  int64_t first_slot;  // the slot k and v point at
  int64_t end_slot = std::numeric_limits<int64_t>::max();  // full heads: the end of the segment
  const int64_t* positions = nullptr;  // budget heads: the position of each slot (-1 empty)
  float* mass = nullptr;               // budget heads: accumulated attention mass per slot

  static HeadStorage of(const DecodeParams& p, int64_t b, int64_t kvh, int64_t first) {
    HeadStorage s;
    const int64_t D = p.attn.head_dim, index = p.kv_index[kvh];
    s.length = p.lengths[b];
    if (p.kv_kind[kvh] == kKvFull) {
      const int64_t seg = std::upper_bound(p.full_starts, p.full_starts + p.full_segments + 1, first) - p.full_starts - 1;
      const int64_t n = p.full_starts[seg + 1] - p.full_starts[seg];
      const int64_t base = (b * p.full_heads + index) * n * D;
      s.k = static_cast<const scalar_t*>(p.full_k[seg]) + base;
      s.v = static_cast<const scalar_t*>(p.full_v[seg]) + base;
      s.first_slot = p.full_starts[seg];
      s.end_slot = p.full_starts[seg + 1];
    } else if (p.kv_kind[kvh] == kKvBudget) {
      const int64_t offset = budget_layout_of(p.budget_table, p.budget_heads, b, index).offset;
      const int64_t base = b * p.ring_slots + offset;
      s.k = static_cast<const scalar_t*>(p.ring_k) + base * D;
      s.v = static_cast<const scalar_t*>(p.ring_v) + base * D;
      s.positions = p.slot_pos + base;
      s.mass = p.slot_mass + base;
      s.first_slot = 0;
    } else {
      const int64_t base = (b * p.ring_slots + p.ring_offset[index]) * D;
      s.k = static_cast<const scalar_t*>(p.ring_k) + base;
      s.v = static_cast<const scalar_t*>(p.ring_v) + base;
      s.first_slot = 0;
    }
    return s;
  }
  const scalar_t* k_row(int64_t j, int64_t D) const { return k + (j - first_slot) * D; }
  const scalar_t* v_row(int64_t j, int64_t D) const { return v + (j - first_slot) * D; }
};

// Per (row, branch) partial softmax of one item (max, sum) and its D accumulator values.
template <typename acc_t>
struct PartialBuffer {
  std::vector<OnlineSoftmax<acc_t>> softmax;
  std::vector<acc_t> acc;
  int64_t rows, D;
  void resize(int64_t items) {
    softmax.resize(items * rows * 2);
    acc.resize(items * rows * 2 * D);
  }
  int64_t index(int64_t item, int64_t row, int64_t branch) const { return (item * rows + row) * 2 + branch; }
};

template <typename scalar_t>
class DecodeWorker {
  using acc_t = acc_type<scalar_t>;

 public:
  DecodeWorker(const DecodeParams& p, const std::vector<DecodeItem>& items, PartialBuffer<acc_t>& partials)
      : p_(p), a_(p.attn), items_(items), partials_(partials), D_(p.attn.head_dim), G_(p.attn.group()),
        Sq_(p.attn.seqlen_q), R_(G_ * Sq_), q_(R_ * D_), scores_(R_ * kDecodeBlock), logits_(kDecodeBlock),
        probs_{CacheLineVector<acc_t>(R_ * kDecodeBlock), CacheLineVector<acc_t>(R_ * kDecodeBlock)},
        acc_{CacheLineVector<acc_t>(R_ * D_), CacheLineVector<acc_t>(R_ * D_)},
        rows_{std::vector<OnlineSoftmax<acc_t>>(R_), std::vector<OnlineSoftmax<acc_t>>(R_)}, heads_(G_) {
    if (bf16_pairs()) q_pairs_.resize(R_ * D_);
  }

  void run(int64_t n) {
    const DecodeItem& item = items_[n];
    const int64_t b = item.b, D = D_;
    HeadStorage<scalar_t> st = HeadStorage<scalar_t>::of(p_, b, item.kvh, item.j0);
    const int64_t pos0 = st.length - Sq_;
    for (int64_t g = 0; g < G_; ++g) {
      heads_[g] = read_head<acc_t>(a_, b, item.kvh * G_ + g);
      for (int64_t i = 0; i < Sq_; ++i) {
        const int64_t r = g * Sq_ + i;
        const scalar_t* qrow = a_.q.row<scalar_t>(b, i, item.kvh * G_ + g);
        if (bf16_pairs()) {
          std::copy(qrow, qrow + D, q_pairs_.data() + r * D);
        } else {
          pair_permuted_queries<acc_t, scalar_t>(q_.data() + r * D, qrow, D);
        }
      }
    }
    // an item is a partial softmax over some keys: the sink logit joins once, in combine()
    for (int br = 0; br < 2; ++br) {
      std::fill(rows_[br].begin(), rows_[br].end(), OnlineSoftmax<acc_t>::start(false, acc_t(0)));
      std::fill(acc_[br].begin(), acc_[br].end(), acc_t(0));
    }
    counts_.add(kWorkItems, 1);
    kept_logits_.clear();
    if (st.mass) {
      kept_stride_ = item.j1;
      kept_logits_.assign(R_ * kept_stride_, -std::numeric_limits<acc_t>::infinity());
    }
    for (int64_t j0 = item.j0; j0 < item.j1; j0 += kDecodeBlock) {
      const int64_t nk = std::min(kDecodeBlock, item.j1 - j0);
      // the block's rows, in pieces that each lie in one segment of a full head's storage
      pieces_.clear();
      for (int64_t j = j0, n; j < j0 + nk; j += n) {
        if (j >= st.end_slot) st = HeadStorage<scalar_t>::of(p_, b, item.kvh, j);
        n = std::min(j0 + nk, st.end_slot) - j;
        pieces_.push_back({st.k_row(j, D), st.v_row(j, D), j - j0, n});
      }
      for (const BlockPiece& piece : pieces_) block_scores(piece.k, piece.v, piece.offset, piece.n);
      counts_.add(kKeyBlocks, 1);
      counts_.add(kScoreElements, R_ * nk);
      bool used[2] = {false, false};
      for (int64_t g = 0; g < G_; ++g) {
        const HeadScalars<acc_t>& hs = heads_[g];
        if (hs.gate == acc_t(0)) continue;
        const BranchPlan plan = plan_branches(hs);
        const acc_t* bias = a_.key_bias.present() ? a_.key_bias.row<acc_t>(b, item.kvh * G_ + g) : nullptr;
        for (int br = 0; br < 2; ++br) {
          const bool wanted = br == 0 ? plan.full : plan.streaming;
          if (!wanted) continue;
          used[br] = true;
          const HeadVisibility vis = br == 0 ? full_visibility(a_.causal) : streaming_visibility(a_.causal, hs);
          for (int64_t i = 0; i < Sq_; ++i)
            update_row(g * Sq_ + i, br, vis, pos0 + i, hs, bias, st, j0, nk, item.pos_offset);
        }
      }
      for (int br = 0; br < 2; ++br) {
        if (!used[br]) continue;
        for (const BlockPiece& piece : pieces_)
          accumulate_pv(acc_[br].data(), R_, probs_[br].data() + piece.offset, kDecodeBlock, piece.v, piece.n, D);
        counts_.add(kValueBlocks, 1);
      }
    }
    if (st.mass) add_attention_mass(st, item);
    for (int64_t r = 0; r < R_; ++r) {
      for (int br = 0; br < 2; ++br) {
        const int64_t at = partials_.index(n, r, br);
        partials_.softmax[at] = rows_[br][r];
        unpermute_columns<acc_t, scalar_t>(partials_.acc.data() + at * D, acc_[br].data() + r * D, D);
      }
    }
  }

  void finish() { counts_.publish(); }

 private:
  // A budget head's item covers all its slots: its rows' softmax is final here (with the
  // sink logit added), so each kept token's probability, summed over the group's rows, is
  // added to its attention mass (the eviction score).
  void add_attention_mass(const HeadStorage<scalar_t>& st, const DecodeItem& item) {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t g = 0; g < G_; ++g) {
      const HeadScalars<acc_t>& hs = heads_[g];
      if (hs.gate == acc_t(0)) continue;
      for (int64_t i = 0; i < Sq_; ++i) {
        const int64_t r = g * Sq_ + i;
        if (rows_[1][r].max == neg_inf) continue;
        OnlineSoftmax<acc_t> with_sink = OnlineSoftmax<acc_t>::start(hs.has_sink_logit, hs.sink_logit);
        with_sink.merge(rows_[1][r], StdExp{});
        const acc_t lse = with_sink.lse(StdLog{});
        const acc_t* x = kept_logits_.data() + r * kept_stride_;
        for (int64_t j = item.j0; j < item.j1; ++j)
          if (x[j] != neg_inf) st.mass[j] += static_cast<float>(std::exp(x[j] - lse));
      }
    }
  }

  // scores_[r, offset + j] = q_r . k_j for nk keys of the block, fetching their value rows `v`
  // into cache meanwhile. In registers straight from the stored rows on every CPU: a brgemm
  // product (S^T = K Q^T, the queries packed as its VNNI operand) made a bf16 step 1.2-1.9x
  // slower on the AVX512-BF16 EPYC and on the Zen 5, and on the AMX Xeon read the kept K/V at
  // 59-69 % of the copy bandwidth against 67-84 % here (2 threads, 32k and 131k keys; its
  // per-block tile configuration, packing and transpose of a 4-row product cost more than the
  // product saved), so it was removed on 2026-12-05.
  void block_scores(const scalar_t* k, const scalar_t* v, int64_t offset, int64_t nk) {
    const int64_t D = D_;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_pairs()) {
        block_scores_direct(scores_.data() + offset, kDecodeBlock, q_pairs_.data(), R_, k, v, nk, D);
        return;
      }
    }
#endif
    block_scores_direct(scores_.data() + offset, kDecodeBlock, q_.data(), R_, k, v, nk, D);
  }

  // Whether the scores take score_rows' bfloat16-pairs overload (AVX512-BF16, D a multiple of 32)
  bool bf16_pairs() const {
#if defined(__AVX512BF16__)
    return std::is_same_v<scalar_t, c10::BFloat16> && D_ % 32 == 0;
#else
    return false;
#endif
  }

  // Online-softmax update of row r, branch br, with the slots [j0, j0 + nk).
  void update_row(int64_t r, int br, const HeadVisibility& vis, int64_t pos, const HeadScalars<acc_t>& hs,
                  const acc_t* bias, const HeadStorage<scalar_t>& st, int64_t j0, int64_t nk, int64_t pos_offset) {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    const acc_t* s = scores_.data() + r * kDecodeBlock;
    acc_t* prob = probs_[br].data() + r * kDecodeBlock;
    acc_t* x = logits_.data();
    const int64_t bias_stride = a_.key_bias.stride_n;
    acc_t block_max;
    const int64_t p0 = j0 + pos_offset;  // an item's slots hold consecutive positions (but budget heads')
    if (st.positions) {
      block_max = neg_inf;
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t q = st.positions[j0 + j];
        if (q < 0 || !vis.visible(pos, q)) {
          x[j] = neg_inf;
          continue;
        }
        x[j] = s[j] * hs.softmax_scale + (bias ? bias[q * bias_stride] : acc_t(0));
        block_max = nan_max(block_max, x[j]);
      }
      if (!kept_logits_.empty()) std::copy(x, x + nk, kept_logits_.data() + r * kept_stride_ + j0);
    } else if (vis.block_fully_visible(pos, pos, p0, p0 + nk)) {
      std::copy(s, s + nk, x);
      block_max = scale_bias_max(x, nk, hs.softmax_scale, bias ? bias + p0 * bias_stride : nullptr, bias_stride);
    } else {
      block_max = neg_inf;
      KeyRange parts[2];
      vis.visible_in_block(pos, st.length, p0, nk, false, parts);
      int64_t cursor = 0;
      for (const KeyRange& part : parts) {
        if (part.empty()) continue;
        std::fill(x + cursor, x + part.lo, neg_inf);
        std::copy(s + part.lo, s + part.hi, x + part.lo);
        const acc_t m = scale_bias_max(x + part.lo, part.size(), hs.softmax_scale,
                                       bias ? bias + (p0 + part.lo) * bias_stride : nullptr, bias_stride);
        block_max = nan_max(block_max, m);
        cursor = part.hi;
      }
      std::fill(x + cursor, x + nk, neg_inf);
    }
    OnlineSoftmax<acc_t>& row = rows_[br][r];
    const acc_t correction = row.rescale(block_max, StdExp{});
    if (row.max == neg_inf) {  // nothing visible here (or every visible logit is -inf)
      fill_zero(prob, 0, nk);
      return;
    }
    row.add(exp_and_sum(x, prob, 0, nk, row.reference()), correction);
    if (correction != acc_t(1)) scale_row(acc_[br].data() + r * D_, D_, correction);
  }

  // rows [offset, offset + n) of the current key block, held at k and v
  struct BlockPiece {
    const scalar_t* k;
    const scalar_t* v;
    int64_t offset, n;
  };

  const DecodeParams& p_;
  const AttentionParams& a_;
  const std::vector<DecodeItem>& items_;
  PartialBuffer<acc_t>& partials_;
  int64_t D_, G_, Sq_, R_;
  CacheLineVector<acc_t> q_, scores_, logits_;
  CacheLineVector<scalar_t> q_pairs_;  // (bf16_pairs) the item's query rows as stored
  CacheLineVector<acc_t> probs_[2], acc_[2];
  std::vector<OnlineSoftmax<acc_t>> rows_[2];
  std::vector<HeadScalars<acc_t>> heads_;
  LocalWorkCounts counts_;
  std::vector<BlockPiece> pieces_;
  std::vector<acc_t> kept_logits_;  // budget items: [R, slots] logits, for the attention mass
  int64_t kept_stride_ = 0;
};

// The items of one call: per (b, KV head) with an active query head, the union of the slot
// ranges its query heads can see, split into ranges of split_keys slots.
template <typename acc_t>
std::vector<DecodeItem> decode_items(const DecodeParams& p, std::vector<int64_t>& first_item) {
  const AttentionParams& a = p.attn;
  std::vector<DecodeItem> items;
  first_item.assign(a.batch * a.heads_kv + 1, 0);
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t L = p.lengths[b];
    for (int64_t kvh = 0; kvh < a.heads_kv; ++kvh) {
      first_item[b * a.heads_kv + kvh] = static_cast<int64_t>(items.size());
      const GroupKeys group = group_keys<acc_t>(a, b, kvh, L);  // decode_semantics.h (the CUDA decode's too)
      if (!group.any) continue;
      const KeyRange sinks = group.keys.sinks, window = group.keys.window;
      if (p.kv_kind[kvh] == kKvBudget) {
        // one item: all its slots
        items.push_back({b, kvh, 0, budget_layout_of(p.budget_table, p.budget_heads, b, p.kv_index[kvh]).size, 0});
        continue;
      }
      if (p.kv_kind[kvh] != kKvFull) {
        // a streaming head's slots are up to three runs of consecutive positions: the sinks,
        // and the ring from its oldest token to the end of the ring, then from its start
        const int64_t index = p.kv_index[kvh];
        const RingLayout ring{p.ring_offset[index], p.ring_sinks[index], p.ring_size[index]};
        struct Run { int64_t slot, pos, n; };
        Run runs[3] = {{0, 0, std::min(ring.sinks, L)}, {0, 0, 0}, {0, 0, 0}};
        const int64_t count = std::min(std::max<int64_t>(L - ring.sinks, 0), ring.ring);  // tokens in the ring
        if (count > 0) {
          const int64_t oldest = L - count, first_slot = ring.slot_of(oldest);
          const int64_t to_end = std::min(count, ring.sinks + ring.ring - first_slot);
          runs[1] = {first_slot, oldest, to_end};
          runs[2] = {ring.sinks, oldest + to_end, count - to_end};
        }
        for (const Run& run : runs)
          for (const KeyRange& range : {sinks, window}) {
            const KeyRange hit = range.clip(run.pos, run.pos + run.n);  // visible positions of the run
            // q0 + split_keys may overflow int64 (huge split_keys, positions near 2^63): step by what is left
            for (int64_t q0 = hit.lo, q1; q0 < hit.hi; q0 = q1) {
              q1 = q0 + std::min(p.split_keys, hit.hi - q0);
              items.push_back({b, kvh, run.slot + (q0 - run.pos), run.slot + (q1 - run.pos), run.pos - run.slot});
            }
          }
        continue;
      }
      // ranges of split_keys slots (across the segments of the full storage: DecodeWorker::run)
      for (const KeyRange& range : {sinks, window})
        for (int64_t j = range.lo, end; j < range.hi; j = end) {
          end = j + std::min(p.split_keys, range.hi - j);
          items.push_back({b, kvh, j, end, 0});
        }
    }
  }
  first_item[a.batch * a.heads_kv] = static_cast<int64_t>(items.size());
  return items;
}

// Merges a compensated streaming head's compensation key (kv_layout.h) into one row's softmax
// (`row`, with its accumulator `acc`): one key, logit compensation_logit(scale * q . k_mean, n),
// value v_mean. Nothing when the head is not compensated or has evicted nothing yet.
template <typename scalar_t, typename acc_t>
void merge_compensation(const DecodeParams& p, int64_t b, int64_t kvh, const scalar_t* q, acc_t softmax_scale,
                        OnlineSoftmax<acc_t>& row, acc_t* acc) {
  if (p.kv_kind[kvh] != kKvStreaming) return;
  const Compensation comp = compensation_of(p.comp_table, p.kv_index[kvh]);
  if (comp.index < 0) return;
  const int64_t c = b * p.comp_heads + comp.index, n = p.comp_n[c], D = p.attn.head_dim;
  if (n == 0) return;
  const double* k_sum = p.comp_k + c * D;
  const double* v_sum = p.comp_v + c * D;
  acc_t dot = 0;
  for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(q[d]) * static_cast<acc_t>(k_sum[d] / n);
  const OnlineSoftmax<acc_t> key{compensation_logit(softmax_scale * dot, n, comp.weighted, StdLog{}), acc_t(1)};
  const auto scales = row.merge(key, StdExp{});
  for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * scales.self + static_cast<acc_t>(v_sum[d] / n) * scales.other;
}

// Merges a row's partials, adds the sink and a compensation key, mixes alpha and writes the
// finished output row.
template <typename scalar_t>
void combine(const DecodeParams& p, const std::vector<int64_t>& first_item, PartialBuffer<acc_type<scalar_t>>& partials) {
  using acc_t = acc_type<scalar_t>;
  const AttentionParams& a = p.attn;
  const int64_t G = a.group(), Sq = a.seqlen_q, D = a.head_dim;
  at::parallel_for(0, a.batch * a.heads_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> merged(2 * D), row(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.heads_q, h = bh % a.heads_q, kvh = h / G, g = h % G;
      const HeadScalars<acc_t> hs = read_head<acc_t>(a, b, h);
      const BranchPlan plan = plan_branches(hs);
      const acc_t* os = a.out_scale.present() ? a.out_scale.row<acc_t>(b, h) : nullptr;
      const acc_t* ob = a.out_bias.present() ? a.out_bias.row<acc_t>(b, h) : nullptr;
      const int64_t i0 = first_item[b * a.heads_kv + kvh], i1 = first_item[b * a.heads_kv + kvh + 1];
      for (int64_t i = 0; i < Sq; ++i) {
        scalar_t* out = const_cast<scalar_t*>(a.out.row<scalar_t>(b, i, h));
        if (hs.gate == acc_t(0)) {
          std::fill(out, out + D, scalar_t(0));
          continue;
        }
        acc_t inv[2] = {0, 0};
        for (int br = 0; br < 2; ++br) {
          if (!(br == 0 ? plan.full : plan.streaming)) continue;
          OnlineSoftmax<acc_t> row = OnlineSoftmax<acc_t>::start(hs.has_sink_logit, hs.sink_logit);
          acc_t* acc = merged.data() + br * D;
          std::fill(acc, acc + D, acc_t(0));
          for (int64_t it = i0; it < i1; ++it) {
            const int64_t at = partials.index(it, g * Sq + i, br);
            if (partials.softmax[at].sum == acc_t(0)) continue;  // the item saw nothing of this row
            const auto scales = row.merge(partials.softmax[at], StdExp{});
            const acc_t* part = partials.acc.data() + at * D;
            for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * scales.self + part[d] * scales.other;
          }
          // the streaming branch (a head served by a streaming KV head has no other)
          if (br == 1) merge_compensation(p, b, kvh, a.q.row<scalar_t>(b, i, h), hs.softmax_scale, row, acc);
          inv[br] = row.inverse_sum();
        }
        for (int64_t d = 0; d < D; ++d) {
          const acc_t full = merged[d] * inv[0], stream = merged[D + d] * inv[1];
          const acc_t o = plan.full && plan.streaming ? mix_alpha(hs.alpha, full, stream) : (plan.full ? full : stream);
          row[d] = epilogue(o, os ? os[d * a.out_scale.stride_n] : acc_t(1), ob ? ob[d * a.out_bias.stride_n] : acc_t(0),
                            hs.gate);
        }
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(row[d]);
      }
    }
  });
}

template <typename scalar_t>
void decode_typed(const DecodeParams& p) {
  using acc_t = acc_type<scalar_t>;
  std::vector<int64_t> first_item;
  const std::vector<DecodeItem> items = decode_items<acc_t>(p, first_item);
  PartialBuffer<acc_t> partials;
  partials.rows = p.attn.group() * p.attn.seqlen_q;
  partials.D = p.attn.head_dim;
  partials.resize(static_cast<int64_t>(items.size()));
  run_dynamic(static_cast<int64_t>(items.size()), [&] { return DecodeWorker<scalar_t>(p, items, partials); });
  combine<scalar_t>(p, first_item, partials);
}

}  // namespace

void decode_attention_isa(const DecodeParams& p, at::ScalarType dtype) {
#ifdef HEADOPS_BF16_ONLY
  TORCH_CHECK(dtype == at::kBFloat16, "headops: this kernel variant handles bfloat16 only");
  decode_typed<at::BFloat16>(p);
#else
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "headops decode attention",
                                  [&] { decode_typed<scalar_t>(p); });
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
