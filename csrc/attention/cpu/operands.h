// How a CPU work item obtains its two tile products, S = Q K^T and O += P V, per dtype, for a
// range of the tile's rows over the first keys of a block (begin_block once per key block):
//  - BlasOperands: float/double straight from the strided inputs through BLAS;
//  - PackedOperands: bfloat16/float16 through oneDNN's brgemm (AMX / AVX512-BF16/FP16), and
//    float through brgemm on AVX-512 CPUs, reading K and V from a packed copy (in the layout
//    brgemm_pairs finds: VNNI pairs for 16-bit types on AMX and AVX512-BF16, plain K^T and V for
//    float and for float16 on AVX512-FP16) made once per call for the key blocks some item needs;
//  - SplitProbabilityOperands: PackedOperands whose P V reads float P in two 16-bit parts
//    (precise_probabilities);
//  - SplitHalfOperands: float16 on AMX without AMX-FP16, each operand as two bfloat16 parts on
//    headops' own bfloat16 tile loops;
//  - WidenedHalfOperands: float16 where brgemm runs float tiles but no float16 ones (AVX-512
//    without AVX512-FP16): PackedOperands<float> on K, V and Q widened to float;
//  - ConvertedOperands: bfloat16/float16 where brgemm is unavailable (or the head dim is
//    odd): tiles converted to float, then BLAS.
#pragma once

#include <cstring>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../../cpu/amx_tiles.h"
#include "../../cpu/blas.h"
#include "../../cpu/cache_line_vector.h"
#include "../../cpu/isa_dispatch.h"
#include "../../cpu/row_ops.h"
#include "../attention_params.h"
#include "../../cpu/vnni_pack.h"

namespace headops::cpu::CPU_CAPABILITY {

template <typename T>
struct BlasOperands {
  using prob_t = T;
  static constexpr int64_t key_alignment = 1;
  const AttentionParams& p;
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;

  explicit BlasOperands(const AttentionParams& params) : p(params) {}

  void begin_item(int64_t b, int64_t h, int64_t q0, int64_t /*nq*/) {
    const int64_t kvh = h / p.group();
    q = p.q.row<T>(b, q0, h);
    k = p.k.row<T>(b, 0, kvh);
    v = p.v.row<T>(b, 0, kvh);
  }
  void begin_block(int64_t /*j0*/, int64_t /*nk*/) {}
  void scores(T* s, int64_t lds, int64_t r0, int64_t rows, int64_t j0, int64_t nk) {
    gemm_nt(rows, nk, p.head_dim, T(1), q + r0 * p.q.stride_s, p.q.stride_s, k + j0 * p.k.stride_s, p.k.stride_s, T(0),
            s + r0 * lds, lds);
  }
  void accumulate(T* acc, int64_t r0, int64_t rows, const T* prob, int64_t ldp, int64_t j0, int64_t nk) {
    gemm_nn(rows, p.head_dim, nk, T(1), prob + r0 * ldp, ldp, v + j0 * p.v.stride_s, p.v.stride_s, T(1),
            acc + r0 * p.head_dim, p.head_dim);
  }
  void end_worker() {}
};

template <typename scalar_t>
struct ConvertedOperands {
  using prob_t = float;
  static constexpr int64_t key_alignment = 1;
  const AttentionParams& p;
  std::vector<float> qbuf, kbuf, vbuf;
  int64_t b_ = 0, kvh_ = 0;

  ConvertedOperands(const AttentionParams& params, int64_t block_q, int64_t block_k) : p(params) {
    qbuf.resize(block_q * p.head_dim);
    kbuf.resize(block_k * p.head_dim);
    vbuf.resize(block_k * p.head_dim);
  }
  void convert_rows(const HeadTensor& t, int64_t b, int64_t s0, int64_t n, int64_t h, float* dst) {
    const int64_t D = p.head_dim;
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* src = t.row<scalar_t>(b, s0 + r, h);
      for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<float>(src[d]);
    }
  }
  void begin_item(int64_t b, int64_t h, int64_t q0, int64_t nq) {
    b_ = b;
    kvh_ = h / p.group();
    convert_rows(p.q, b, q0, nq, h, qbuf.data());
  }
  // the block's K and V rows, converted once for all the row groups' products
  void begin_block(int64_t j0, int64_t nk) {
    convert_rows(p.k, b_, j0, nk, kvh_, kbuf.data());
    convert_rows(p.v, b_, j0, nk, kvh_, vbuf.data());
  }
  void scores(float* s, int64_t lds, int64_t r0, int64_t rows, int64_t /*j0*/, int64_t nk) {
    const int64_t D = p.head_dim;
    gemm_nt(rows, nk, D, 1.f, qbuf.data() + r0 * D, D, kbuf.data(), D, 0.f, s + r0 * lds, lds);
  }
  void accumulate(float* acc, int64_t r0, int64_t rows, const float* prob, int64_t ldp, int64_t /*j0*/, int64_t nk) {
    const int64_t D = p.head_dim;
    gemm_nn(rows, D, nk, 1.f, prob + r0 * ldp, ldp, vbuf.data(), D, 1.f, acc + r0 * D, D);
  }
  void end_worker() {}
};

// K^T and V of every (b, kv head) as brgemm B operands (vnni_pack.h: P = 2 interleaves pairs of
// consecutive reduction-dim elements, P = 1 is plain; `pairs`, from brgemm_pairs), zero-padded to
// a multiple of kPackBlock keys:
//   keys_t[b, kvh] : [D/P][Sk_pad][P]  element (d, j) at ((d/P) * Sk_pad + j) * P + d % P
//   values[b, kvh] : [Sk_pad/P][D][P]  element (j, d) at ((j/P) * D + d) * P + j % P
// or, for headops' own AMX loops (amx_tile_major), in their tile-major forms (vnni_pack.h).
template <typename scalar_t>
struct PackedKV {
  static constexpr int64_t kPackBlock = 64;
  scalar_t* keys_t = nullptr;
  scalar_t* values = nullptr;
  int64_t padded_keys = 0;  // Sk_pad
  int64_t head_dim = 0;
  int64_t pairs = vnni_pairs<scalar_t>();  // P
  bool amx_tile_major = false;

  // where key j's column of K^T / row of V starts within one head's packed block
  int64_t key_offset(int64_t j) const { return transposed_key_offset(j, head_dim, amx_tile_major, pairs); }
  int64_t value_offset(int64_t j) const { return j * head_dim; }

  int64_t head_elems() const { return padded_keys * head_dim; }
  const scalar_t* keys_of(int64_t b, int64_t kvh, int64_t heads_kv) const {
    return keys_t + (b * heads_kv + kvh) * head_elems();
  }
  const scalar_t* values_of(int64_t b, int64_t kvh, int64_t heads_kv) const {
    return values + (b * heads_kv + kvh) * head_elems();
  }

  // Packs keys [blk * kPackBlock, +kPackBlock) of one (b, kv head) (vnni_pack.h).
  void pack_block(const AttentionParams& p, int64_t b, int64_t kvh, int64_t blk) const {
    const int64_t j_begin = blk * kPackBlock;
    pack_rows(p, b, kvh, blk, [&](int64_t r) { return p.k.row<scalar_t>(b, j_begin + r, kvh); },
              [&](int64_t r) { return p.v.row<scalar_t>(b, j_begin + r, kvh); });
  }

  // pack_block from rows that key(r) and value(r) give (r within the block)
  template <typename KeyRow, typename ValueRow>
  void pack_rows(const AttentionParams& p, int64_t b, int64_t kvh, int64_t blk, KeyRow key, ValueRow value) const {
    const int64_t j_begin = blk * kPackBlock;
    const int64_t real = real_keys(p, blk);
    const int64_t at = (b * p.heads_kv + kvh) * head_elems();
    if constexpr (sizeof(scalar_t) == 2) {
      if (amx_tile_major) {
        pack_columns_amx_tiles<scalar_t>(key, real, kPackBlock, head_dim, keys_t + at + key_offset(j_begin));
        pack_rows_amx_tiles<scalar_t>(value, real, kPackBlock, head_dim, values + at + value_offset(j_begin));
        return;
      }
    }
    pack_columns_vnni<scalar_t>(key, real, kPackBlock, head_dim, padded_keys, pairs, keys_t + at + key_offset(j_begin));
    pack_rows_vnni<scalar_t>(value, real, kPackBlock, head_dim, pairs, values + at + value_offset(j_begin));
  }

  // the call's keys rounded up to whole blocks (Sk_pad)
  static int64_t padded_keys_of(const AttentionParams& p) {
    return (p.seqlen_k + kPackBlock - 1) / kPackBlock * kPackBlock;
  }
  // the keys of block blk below seqlen_k (the rest of the block is packed as zeros)
  static int64_t real_keys(const AttentionParams& p, int64_t blk) {
    return std::max<int64_t>(0, std::min(kPackBlock, p.seqlen_k - blk * kPackBlock));
  }
};

// float16 K and V as two bfloat16 parts each (split_row: hi + lo is the float16 value exactly),
// tile-major for headops' own AMX loops (SplitHalfOperands). all_finite turns false when a packed
// value is inf or NaN: the split products would make NaN of inf * 0 where one product gives
// +-inf (a key that an inf query logit masks out), so such a call takes the float16 path instead.
struct SplitHalfKV {
  static constexpr int64_t kPackBlock = PackedKV<at::BFloat16>::kPackBlock;
  PackedKV<at::BFloat16> hi, lo;
  int64_t padded_keys = 0;
  mutable std::atomic<bool> all_finite{true};
  at::Tensor fresh;  // the workspace when it is larger than the kept one

  // Both parts tile-major in one workspace, nothing packed yet (pack_block).
  explicit SplitHalfKV(const AttentionParams& p) : padded_keys(PackedKV<at::BFloat16>::padded_keys_of(p)) {
    for (PackedKV<at::BFloat16>* part : {&hi, &lo}) {
      part->head_dim = p.head_dim;
      part->amx_tile_major = true;
      part->pairs = 2;
      part->padded_keys = padded_keys;
    }
    const int64_t elems = p.batch * p.heads_kv * hi.head_elems();
    hi.keys_t = packing_workspace<at::BFloat16>(4 * elems, fresh);
    hi.values = hi.keys_t + elems;
    lo.keys_t = hi.values + elems;
    lo.values = lo.keys_t + elems;
  }

  void pack_block(const AttentionParams& p, int64_t b, int64_t kvh, int64_t blk) const {
    const int64_t D = hi.head_dim, j_begin = blk * kPackBlock;
    const HalfBlockParts parts = split_half_block([&](int64_t r) { return p.k.row<at::Half>(b, j_begin + r, kvh); },
                                                  [&](int64_t r) { return p.v.row<at::Half>(b, j_begin + r, kvh); },
                                                  PackedKV<at::BFloat16>::real_keys(p, blk), D);
    if (!parts.finite) all_finite.store(false, std::memory_order_relaxed);
    hi.pack_rows(p, b, kvh, blk, [&](int64_t r) { return parts.k_hi + r * D; },
                 [&](int64_t r) { return parts.v_hi + r * D; });
    lo.pack_rows(p, b, kvh, blk, [&](int64_t r) { return parts.k_lo + r * D; },
                 [&](int64_t r) { return parts.v_lo + r * D; });
  }
};

// float16 K and V widened to float and packed as float brgemm operands (plain K^T and V), for
// CPUs whose brgemm runs float tiles but has no float16 layout (call_widens_half_to_float_tiles;
// WidenedHalfOperands). Widening is exact, so the products are float32's on the same values.
struct WidenedHalfKV : PackedKV<float> {
  at::Tensor fresh;  // the workspace when it is larger than the kept one

  // K^T and V in one workspace, nothing packed yet (pack_block)
  explicit WidenedHalfKV(const AttentionParams& p) {
    head_dim = p.head_dim;
    pairs = 1;
    padded_keys = padded_keys_of(p);
    const int64_t elems = p.batch * p.heads_kv * head_elems();
    keys_t = packing_workspace<float>(2 * elems, fresh);
    values = keys_t + elems;
  }

  void pack_block(const AttentionParams& p, int64_t b, int64_t kvh, int64_t blk) const {
    const int64_t D = head_dim, j_begin = blk * kPackBlock, real = real_keys(p, blk);
    thread_local std::vector<float> widened;
    widened.resize(std::max<size_t>(widened.size(), 2 * real * D));
    float *k = widened.data(), *v = k + real * D;
    for (int64_t r = 0; r < real; ++r) {
      convert_row(p.k.row<at::Half>(b, j_begin + r, kvh), k + r * D, D);
      convert_row(p.v.row<at::Half>(b, j_begin + r, kvh), v + r * D, D);
    }
    pack_rows(p, b, kvh, blk, [&](int64_t r) { return k + r * D; }, [&](int64_t r) { return v + r * D; });
  }
};

template <typename scalar_t>
struct PackedOperands {
  using prob_t = scalar_t;  // probabilities are rounded to the input dtype for the P.V product
  const AttentionParams& p;
  const PackedKV<scalar_t>& packed;
  const scalar_t* q = nullptr;
  int64_t ldq = 0;
  const scalar_t* kt = nullptr;
  const scalar_t* vv = nullptr;
  // bfloat16 on AMX (K and V packed tile-major): headops' own tile loops (cpu/amx_tiles.h)
  // instead of brgemm, reading the item's query rows from a copy padded with zero rows to whole tiles
  const bool own_amx;
  const bool vnni;  // brgemm's B in VNNI pairs
  CacheLineVector<scalar_t> q_tile;

  PackedOperands(const AttentionParams& params, const PackedKV<scalar_t>& kv)
      : p(params), packed(kv), own_amx(kv.amx_tile_major), vnni(kv.pairs == 2) {}

  void begin_item(int64_t b, int64_t h, int64_t q0, int64_t nq) {
    const int64_t kvh = h / p.group();
    q = p.q.row<scalar_t>(b, q0, h);
    ldq = p.q.stride_s;
    kt = packed.keys_of(b, kvh, p.heads_kv);
    vv = packed.values_of(b, kvh, p.heads_kv);
    if constexpr (sizeof(scalar_t) == 2) {
      if (own_amx) {
        AMX::bind_thread();
        const int64_t tile_rows = AMX::padded_rows(nq);
        q_tile.resize(std::max<int64_t>(q_tile.size(), tile_rows * p.head_dim));
        AMX::copy_padded_rows(AMX::bits(q), ldq, nq, p.head_dim, AMX::bits(q_tile.data()));
        q = q_tile.data();
        ldq = p.head_dim;
      }
    }
  }
  void begin_block(int64_t /*j0*/, int64_t /*nk*/) {}
  // rows [r0, r0 + rows) of the tile (r0 a multiple of 16; own AMX: its rows padded to whole
  // tiles, which the query copy holds)
  void scores(float* s, int64_t lds, int64_t r0, int64_t rows, int64_t j0, int64_t nk) {
    const scalar_t* b = kt + packed.key_offset(j0);
    const scalar_t* a = q + r0 * ldq;
    if constexpr (sizeof(scalar_t) == 2) {
      if (own_amx)
        return AMX::scores(AMX::padded_rows(rows), nk, p.head_dim, AMX::bits(a), ldq, AMX::bits(b), s + r0 * lds, lds);
    }
    at::native::cpublas::brgemm(rows, nk, p.head_dim, ldq, packed.padded_keys, lds, false, a, b, s + r0 * lds, vnni);
  }
  void accumulate(float* acc, int64_t r0, int64_t rows, const scalar_t* prob, int64_t ldp, int64_t j0, int64_t nk) {
    const scalar_t* b = vv + packed.value_offset(j0);
    const int64_t D = p.head_dim;
    if constexpr (sizeof(scalar_t) == 2) {
      if (own_amx) return AMX::accumulate(rows, D, nk, AMX::bits(prob + r0 * ldp), ldp, AMX::bits(b), acc + r0 * D, D);
    }
    at::native::cpublas::brgemm(rows, D, nk, ldp, D, D, true, prob + r0 * ldp, b, acc + r0 * D, vnni);
  }
  // acc += (P_hi + P_lo) V, P held in two parts (own AMX: in one pass over the tile registers)
  void accumulate_parts(float* acc, int64_t r0, int64_t rows, const scalar_t* prob_hi, const scalar_t* prob_lo,
                        int64_t ldp, int64_t j0, int64_t nk) {
    if constexpr (sizeof(scalar_t) == 2) {
      if (own_amx) {
        const int64_t D = p.head_dim;
        return AMX::accumulate_split_a(rows, D, nk, AMX::bits(prob_hi + r0 * ldp), AMX::bits(prob_lo + r0 * ldp), ldp,
                                       AMX::bits(vv + packed.value_offset(j0)), acc + r0 * D, D);
      }
    }
    accumulate(acc, r0, rows, prob_hi, ldp, j0, nk);
    accumulate(acc, r0, rows, prob_lo, ldp, j0, nk);
  }
  void end_worker() { AMX::end_products(own_amx, vnni); }
};

// float16 through float tiles on K and V widened and packed once (WidenedHalfKV), each item's
// query rows widened into a copy: P stays float, as float32's does.
struct WidenedHalfOperands : PackedOperands<float> {
  CacheLineVector<float> q_rows;

  WidenedHalfOperands(const AttentionParams& params, const WidenedHalfKV& kv) : PackedOperands<float>(params, kv) {}

  void begin_item(int64_t b, int64_t h, int64_t q0, int64_t nq) {
    const int64_t kvh = h / p.group(), D = p.head_dim;
    kt = packed.keys_of(b, kvh, p.heads_kv);
    vv = packed.values_of(b, kvh, p.heads_kv);
    q_rows.resize(std::max<int64_t>(q_rows.size(), nq * D));
    for (int64_t r = 0; r < nq; ++r) convert_row(p.q.row<at::Half>(b, q0 + r, h), q_rows.data() + r * D, D);
    q = q_rows.data();
    ldq = D;
  }
};

// PackedOperands whose P V reads the probabilities to ~2**-17 rather than rounded to the input
// dtype: the softmax keeps them in float, and each group's rows are split in two parts (hi + lo,
// split_row) that two products add up. For calls that learn softmax_scale, sink_logit, alpha or
// key_bias (precise_probabilities): their gradients sum terms that cancel, which bfloat16 P
// upset by up to 5e-2 of their size. Costs one more P V product and the split.
template <typename scalar_t>
struct SplitProbabilityOperands : PackedOperands<scalar_t> {
  using prob_t = float;
  CacheLineVector<scalar_t> hi, lo;  // [block_q, block_k]: the block's P in two parts

  SplitProbabilityOperands(const AttentionParams& params, const PackedKV<scalar_t>& kv, int64_t block_q,
                           int64_t block_k)
      : PackedOperands<scalar_t>(params, kv), hi(block_q * block_k), lo(block_q * block_k) {}

  void accumulate(float* acc, int64_t r0, int64_t rows, const float* prob, int64_t ldp, int64_t j0, int64_t nk) {
    for (int64_t r = r0; r < r0 + rows; ++r) split_row(prob + r * ldp, hi.data() + r * ldp, lo.data() + r * ldp, nk);
    this->accumulate_parts(acc, r0, rows, hi.data(), lo.data(), ldp, j0, nk);
  }
};

// float16 on AMX without a float16 tile unit (no AMX-FP16, where oneDNN's brgemm hands float16 to
// MKL's gemm, which converts it to float): each float16 value is exactly hi + lo in bfloat16
// (split_row), so the products run on bfloat16 tiles as three each (AMX::split_scores and
// split_accumulate),
//   S = Qhi Khi^T + Qhi Klo^T + Qlo Khi^T,   O += Phi Vhi + Phi Vlo + Plo Vhi,
// with P kept in float by the softmax and split the same way. The dropped lo * lo terms are at
// most 2**-18 of each element product, and P's split keeps it to ~2**-17. Inputs must be finite
// (SplitHalfKV::all_finite and the caller's check of Q).
struct SplitHalfOperands {
  using prob_t = float;
  const AttentionParams& p;
  const SplitHalfKV& kv;
  const at::BFloat16 *k_hi = nullptr, *k_lo = nullptr, *v_hi = nullptr, *v_lo = nullptr;
  CacheLineVector<at::BFloat16> q_hi, q_lo;  // the item's query rows, zero rows up to whole tiles
  CacheLineVector<at::BFloat16> p_hi, p_lo;  // [block_q, block_k]: the block's P in two parts

  SplitHalfOperands(const AttentionParams& params, const SplitHalfKV& split, int64_t block_q, int64_t block_k)
      : p(params), kv(split), p_hi(block_q * block_k), p_lo(block_q * block_k) {}

  void begin_item(int64_t b, int64_t h, int64_t q0, int64_t nq) {
    const int64_t kvh = h / p.group(), D = p.head_dim;
    k_hi = kv.hi.keys_of(b, kvh, p.heads_kv);
    k_lo = kv.lo.keys_of(b, kvh, p.heads_kv);
    v_hi = kv.hi.values_of(b, kvh, p.heads_kv);
    v_lo = kv.lo.values_of(b, kvh, p.heads_kv);
    AMX::bind_thread();
    const int64_t tile_rows = AMX::padded_rows(nq);
    q_hi.resize(std::max<int64_t>(q_hi.size(), tile_rows * D));
    q_lo.resize(std::max<int64_t>(q_lo.size(), tile_rows * D));
    split_padded_rows([&](int64_t r) { return p.q.row<at::Half>(b, q0 + r, h); }, nq, tile_rows, D, q_hi.data(),
                      q_lo.data());
  }
  void begin_block(int64_t /*j0*/, int64_t /*nk*/) {}
  void scores(float* s, int64_t lds, int64_t r0, int64_t rows, int64_t j0, int64_t nk) {
    const int64_t D = p.head_dim, M = AMX::padded_rows(rows), at = kv.hi.key_offset(j0);
    AMX::split_scores(M, nk, D, AMX::bits(q_hi.data() + r0 * D), AMX::bits(q_lo.data() + r0 * D), D,
                      AMX::bits(k_hi + at), AMX::bits(k_lo + at), s + r0 * lds, lds);
  }
  void accumulate(float* acc, int64_t r0, int64_t rows, const float* prob, int64_t ldp, int64_t j0, int64_t nk) {
    const int64_t D = p.head_dim, at = kv.hi.value_offset(j0);
    for (int64_t r = r0; r < r0 + rows; ++r) split_row(prob + r * ldp, p_hi.data() + r * ldp, p_lo.data() + r * ldp, nk);
    AMX::split_accumulate(rows, D, nk, AMX::bits(p_hi.data() + r0 * ldp), AMX::bits(p_lo.data() + r0 * ldp), ldp,
                          AMX::bits(v_hi + at), AMX::bits(v_lo + at), acc + r0 * D, D);
  }
  void end_worker() { AMX::end_products(true, false); }
};

}  // namespace headops::cpu::CPU_CAPABILITY
