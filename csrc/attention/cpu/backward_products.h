// How a CPU backward work item obtains its five tile products, per dtype:
//  - BlasTileProducts: float/double inputs straight from the strided rows through BLAS;
//  - PackedTileProducts: bfloat16/float16 inputs through oneDNN's brgemm (AMX, AVX512-BF16,
//    AVX512-FP16), or for bfloat16 on AMX through headops' own tile loops (cpu/amx_tiles.h), in
//    the input dtype with float accumulation, as the forward's PackedOperands:
//    P, dS and dO are rounded to the input dtype for the products that read them (as SDPA's
//    16-bit backward does); everything elementwise stays in float. Float inputs take it too on
//    AVX-512 CPUs (call_uses_packed_operands), with plain operands and nothing rounded.
// Both take one query tile at a time (begin_tile), then per key block S = Q K^T and
// dP = dO V^T (scores_and_dprobs) and dV += P^T dO, dQ += dS K, dK += dS^T Q (gradients; dk or
// dv null where not wanted, dq_tile where dq is not wanted); S, dP
// and dQ per group of the tile's rows over its first keys (RowGroup, kernel_common.h), dV and dK
// per chunk of the block's keys over the rows that see them (KeyChunk).
// Products that add into the head's dK and dV rows find them zeroed; those that write them
// once (writes_key_grads_once: float through brgemm) hand them over at the head's end
// (end_head). scales_key_grads: dK comes out already times the softmax scale.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../../cpu/amx_tiles.h"
#include "../../cpu/blas.h"
#include "../../cpu/cache_line_vector.h"
#include "../../cpu/kept_workspace.h"
#include "../../cpu/row_ops.h"
#include "../../cpu/transpose.h"
#include "../attention_params.h"
#include "../head_semantics.h"
#include "../../cpu/vnni_pack.h"
#include "kernel_common.h"

namespace headops::cpu::CPU_CAPABILITY {

// Where a key block's dK and dV rows go (per query head, float, k's row stride), or null.
template <typename acc_t>
struct KeyGradRows {
  acc_t* dk = nullptr;
  acc_t* dv = nullptr;
  int64_t stride_dk = 0, stride_dv = 0;
};

template <typename acc_t>
struct BlasTileProducts {
  static constexpr int64_t key_alignment() { return 1; }
  static constexpr bool writes_key_grads_once = false, scales_key_grads = false;
  using dq_t = acc_t;  // dq's dtype (the caller's buffer)
  const AttentionParams& f;
  const acc_t *q = nullptr, *k = nullptr, *v = nullptr, *d_o = nullptr;
  int64_t nq = 0;

  explicit BlasTileProducts(const BackwardParams& p) : f(p.fwd) {}
  int64_t padded_keys() const { return f.seqlen_k; }

  // d_o: dL/do of the tile's rows, [nq, D] contiguous, float
  void begin_tile(int64_t b, int64_t h, int64_t q0, int64_t rows, const acc_t* d_o_rows, acc_t /*softmax_scale*/) {
    const int64_t kvh = h / f.group();
    q = f.q.row<acc_t>(b, q0, h);
    k = f.k.row<acc_t>(b, 0, kvh);
    v = f.v.row<acc_t>(b, 0, kvh);
    d_o = d_o_rows;
    nq = rows;
  }
  bool rounds_dout() const { return false; }
  static void round_like_inputs(acc_t* /*row*/, int64_t /*n*/) {}

  void scores_and_dprobs(acc_t* s, acc_t* dp, int64_t ld, int64_t j0, const std::vector<RowGroup>& groups) {
    const int64_t D = f.head_dim, ldq = f.q.stride_s;
    const acc_t *keys = k + j0 * f.k.stride_s, *values = v + j0 * f.v.stride_s;
    for (const RowGroup& g : groups) {
      // S = Q K^T, dP = dO V^T
      gemm_nt(g.rows, g.keys, D, acc_t(1), q + g.r0 * ldq, ldq, keys, f.k.stride_s, acc_t(0), s + g.r0 * ld, ld);
      gemm_nt(g.rows, g.keys, D, acc_t(1), d_o + g.r0 * D, D, values, f.v.stride_s, acc_t(0), dp + g.r0 * ld, ld);
    }
  }
  // prob and ds: [nq, nk] with leading dimension ld (every key real here)
  void gradients(const acc_t* prob, const acc_t* ds, int64_t ld, int64_t j0, int64_t /*nk*/, int64_t /*real*/,
                 const std::vector<RowGroup>& groups, const std::vector<KeyChunk>& chunks, acc_t* dq_tile,
                 const KeyGradRows<acc_t>& out) {
    const int64_t D = f.head_dim, ldq = f.q.stride_s;
    for (const KeyChunk& c : chunks) {
      const int64_t keys = c.k1 - c.k0, rows = nq - c.r0, at = c.r0 * ld + c.k0;
      if (out.dv)  // dV += P^T dO
        gemm_tn(keys, D, rows, acc_t(1), prob + at, ld, d_o + c.r0 * D, D, acc_t(1), out.dv + c.k0 * out.stride_dv,
                out.stride_dv);
      if (out.dk)  // dK += dS^T Q
        gemm_tn(keys, D, rows, acc_t(1), ds + at, ld, q + c.r0 * ldq, ldq, acc_t(1), out.dk + c.k0 * out.stride_dk,
                out.stride_dk);
    }
    if (dq_tile != nullptr)
      for (const RowGroup& g : groups)  // dQ += dS K
        gemm_nn(g.rows, D, g.keys, acc_t(1), ds + g.r0 * ld, ld, k + j0 * f.k.stride_s, f.k.stride_s, acc_t(1),
                dq_tile + g.r0 * D, D);
  }
  void end_worker() {}
};

// K^T, V^T (the B operands of S and dP) and K (of dQ) of every (b, kv head) in brgemm's B layout
// (vnni_pack.h: VNNI pairs for 16-bit types, plain for float), or tile-major for headops' own AMX
// loops (amx_tile_major, as the forward's PackedKV), zero-padded to a multiple of kPackBlock
// keys. A workspace of 1.5x the size of K and V (kept_workspace.h), packed once per call.
template <typename scalar_t>
struct PackedBackwardKV {
  static constexpr int64_t kPackBlock = 64;
  at::Tensor fresh;  // the workspace when it is larger than the kept one
  scalar_t* storage = nullptr;
  int64_t padded_keys = 0, head_dim = 0, heads_kv = 0, heads = 0;  // heads: batch * heads_kv
  bool amx_tile_major = false;

  PackedBackwardKV(const AttentionParams& f, bool tile_major) : PackedBackwardKV(f, tile_major, nullptr) {
    storage = packing_workspace<scalar_t>(workspace_elems(f), fresh);
    for_each_block(f, [&](int64_t b, int64_t kvh, int64_t blk) {
      const int64_t j_begin = blk * kPackBlock;
      pack_rows(b, kvh, blk, real_keys(f, blk), [&](int64_t r) { return f.k.row<scalar_t>(b, j_begin + r, kvh); },
                [&](int64_t r) { return f.v.row<scalar_t>(b, j_begin + r, kvh); });
    });
  }
  // Not packed yet, in storage the caller holds (workspace_elems(f) elements): pack_rows fills it.
  PackedBackwardKV(const AttentionParams& f, bool tile_major, scalar_t* external)
      : head_dim(f.head_dim), heads_kv(f.heads_kv), amx_tile_major(tile_major) {
    padded_keys = padded_keys_of(f);
    heads = f.batch * f.heads_kv;
    storage = external;
  }
  static int64_t padded_keys_of(const AttentionParams& f) {
    return (f.seqlen_k + kPackBlock - 1) / kPackBlock * kPackBlock;
  }
  static int64_t workspace_elems(const AttentionParams& f) {
    return 3 * f.batch * f.heads_kv * padded_keys_of(f) * f.head_dim;
  }
  static int64_t real_keys(const AttentionParams& f, int64_t blk) {
    return std::max<int64_t>(0, std::min(kPackBlock, f.seqlen_k - blk * kPackBlock));
  }
  // fn(b, kvh, blk) for every block of kPackBlock keys, in parallel: one block of every kv head in
  // a row (bshd keeps a key's heads side by side, so consecutive blocks read neighbouring memory
  // rather than one head's rows a page apart)
  template <typename Fn>
  static void for_each_block(const AttentionParams& f, const Fn& fn) {
    const int64_t blocks = (f.seqlen_k + kPackBlock - 1) / kPackBlock, heads = f.batch * f.heads_kv;
    at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) fn(n / (blocks * f.heads_kv), n % f.heads_kv, n / f.heads_kv % blocks);
    });
  }
  int64_t head_elems() const { return padded_keys * head_dim; }
  scalar_t* part(int64_t which, int64_t b, int64_t kvh) const {
    return storage + (which * heads + b * heads_kv + kvh) * head_elems();
  }
  const scalar_t* keys_t(int64_t b, int64_t kvh) const { return part(0, b, kvh); }
  const scalar_t* values_t(int64_t b, int64_t kvh) const { return part(1, b, kvh); }
  const scalar_t* keys(int64_t b, int64_t kvh) const { return part(2, b, kvh); }
  // where key j's column of K^T or V^T starts (K's rows: j * head_dim in both layouts)
  int64_t transposed_offset(int64_t j) const {
    return transposed_key_offset(j, head_dim, amx_tile_major, vnni_pairs<scalar_t>());
  }
  // Packs block blk of (b, kvh) from the `real` rows key(r) and value(r) give (zeros past them).
  template <typename KeyRow, typename ValueRow>
  void pack_rows(int64_t b, int64_t kvh, int64_t blk, int64_t real, KeyRow key, ValueRow value) const {
    const int64_t j_begin = blk * kPackBlock, D = head_dim, L = padded_keys;
    if constexpr (sizeof(scalar_t) == 2) {
      if (amx_tile_major) {
        pack_columns_amx_tiles<scalar_t>(key, real, kPackBlock, D, part(0, b, kvh) + transposed_offset(j_begin));
        pack_columns_amx_tiles<scalar_t>(value, real, kPackBlock, D, part(1, b, kvh) + transposed_offset(j_begin));
        pack_rows_amx_tiles<scalar_t>(key, real, kPackBlock, D, part(2, b, kvh) + j_begin * D);
        return;
      }
    }
    constexpr int64_t P = vnni_pairs<scalar_t>();
    pack_columns_vnni<scalar_t>(key, real, kPackBlock, D, L, P, part(0, b, kvh) + transposed_offset(j_begin));
    pack_columns_vnni<scalar_t>(value, real, kPackBlock, D, L, P, part(1, b, kvh) + transposed_offset(j_begin));
    pack_rows_vnni<scalar_t>(key, real, kPackBlock, D, P, part(2, b, kvh) + j_begin * D);
  }
};

template <typename scalar_t>
struct PackedTileProducts {
  static constexpr int64_t P = vnni_pairs<scalar_t>();
  // dq's dtype: 16-bit inputs get dq written in their own dtype (the caller allocates it so
  // where backward_reads_input_dtype), each row rounded once as it is finished, rather than a
  // float dq converted afterwards
  using dq_t = std::conditional_t<P == 2, scalar_t, float>;
  int64_t key_alignment() const { return packed_key_alignment(own_amx, P); }
  // float keeps the head's dK^T and dV^T (below) and writes its rows once; its Q^T operand
  // carries the softmax scale, which rounds once per element of a tile rather than a pass over
  // dK. 16-bit types add into the rows, and scaling their bf16 Q would round it twice.
  static constexpr bool writes_key_grads_once = P == 1, scales_key_grads = P == 1;
  const AttentionParams& f;
  const PackedBackwardKV<scalar_t>& kv;
  // bfloat16 on AMX (K and V packed tile-major): headops' own tile loops (cpu/amx_tiles.h). The
  // tile's queries are the reduction of dV and dK: nq_pad rounds them to whole steps of 32, Q
  // and dO are packed tile-major for it, and the transposed P and dS are zero past nq.
  const bool own_amx;
  // 16-bit types learning softmax_scale or key_bias: dP = dO V^T reads dL/do as two parts in the
  // input dtype, do_rows + do_rows_lo, one more product that makes dP float-accurate. Those
  // gradients sum dS over all rows (and keys) whose terms cancel nearly to nothing; where gate or
  // out_scale make dL/do inexact in bfloat16, dL/do rounded once left errors of up to 1e-2 of
  // their size (S = 333)
  const bool split_dout;
  int64_t block_k, D;
  const scalar_t *q = nullptr, *kt = nullptr, *vt = nullptr, *kr = nullptr;
  int64_t ldq = 0;  // q's row stride
  int64_t nq = 0, nq_pad = 0;
  // The tile's Q and dO as the dK and dV products read them: VNNI-packed rows (B of dS^T Q and
  // P^T dO) for 16-bit types; transposed, [D][nq], for float (A of Q^T dS and dO^T P)
  CacheLineVector<scalar_t> q_operand, do_rows, do_operand;  // do_rows: dO as A of dP = dO V^T
  CacheLineVector<scalar_t> do_rows_lo;                        // split_dout: dO - do_rows, rounded
  CacheLineVector<scalar_t> prob_rows, prob_t, ds_rows, ds_t;  // 16-bit types: the block's P, P^T, dS, dS^T
  CacheLineVector<scalar_t> q_rows;  // own AMX: the tile's Q rows, zero rows to a whole tile
  // float: the head's dK^T and dV^T, [D][padded keys]. dK^T += Q^T dS and dV^T += dO^T P read P
  // and dS where they are, so no key block is transposed; end_head transposes the keys it
  // touched into the head's rows once and clears them here. On the 2-core AMX Xeon the per-block
  // transposes of P and dS were 2.8 % of a float forward+backward (B=1, H=16, S=2048, D=128).
  CacheLineVector<float> keys_grad_t, values_grad_t;
  int64_t touched_lo = 0, touched_hi = 0;

  PackedTileProducts(const BackwardParams& p, const PackedBackwardKV<scalar_t>& packed, int64_t block_q, int64_t bk)
      : f(p.fwd),
        kv(packed),
        own_amx(packed.amx_tile_major),
        split_dout(P == 2 && (p.dsoftmax_scale != nullptr || p.dkey_bias != nullptr)),
        block_k(bk), D(p.fwd.head_dim) {
    const int64_t bq_pad = padded_queries(block_q);
    if (own_amx) q_rows.resize(bq_pad * D);
    q_operand.resize(bq_pad * D);
    do_rows.resize(block_q * D);
    if (split_dout) do_rows_lo.resize(block_q * D);
    do_operand.resize(bq_pad * D);
    if constexpr (P == 2) {
      prob_rows.resize(block_q * bk);
      ds_rows.resize(block_q * bk);
      prob_t.resize(bk * bq_pad);
      ds_t.resize(bk * bq_pad);
    } else {
      if (p.want_dk) keys_grad_t.assign(D * kv.padded_keys, 0.f);
      if (p.want_dv) values_grad_t.assign(D * kv.padded_keys, 0.f);
    }
  }
  int64_t padded_keys() const { return kv.padded_keys; }

  void begin_tile(int64_t b, int64_t h, int64_t q0, int64_t rows, const float* d_o, float softmax_scale) {
    const int64_t kvh = h / f.group();
    nq = rows;
    nq_pad = padded_queries(rows);
    q = f.q.row<scalar_t>(b, q0, h);
    ldq = f.q.stride_s;
    kt = kv.keys_t(b, kvh);
    vt = kv.values_t(b, kvh);
    kr = kv.keys(b, kvh);
    if (split_dout)
      split_row(d_o, do_rows.data(), do_rows_lo.data(), nq * D);
    else
      round_rows(d_o, D, nq, D, do_rows.data(), D);
    if constexpr (P == 2) {
      if (own_amx) return begin_amx_tile();
    }
    if constexpr (P == 1) {
      transpose(nq, D, q, ldq, q_operand.data(), nq);
      if (softmax_scale != 1.f) scale_row(q_operand.data(), D * nq, softmax_scale);
      transpose(nq, D, d_o, D, do_operand.data(), nq);
    } else {
      pack_rows_vnni<scalar_t>([&](int64_t r) { return q + r * ldq; }, nq, nq_pad, D, P, q_operand.data());
      pack_rows_vnni<scalar_t>([&](int64_t r) { return do_rows.data() + r * D; }, nq, nq_pad, D, P, do_operand.data());
    }
  }
  // dL/do rounded to scalar_t, as the dP and dV products read it (float, or dP from two parts:
  // nothing to round)
  bool rounds_dout() const { return P == 2 && !split_dout; }
  static void round_like_inputs(float* row, int64_t n) {
    constexpr int64_t kChunk = 64;
    scalar_t rounded[kChunk];
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t c = std::min(kChunk, n - i);
      convert_row(row + i, rounded, c);
      at::vec::convert(rounded, row + i, c);
    }
  }

  // per row group g: rows [g.r0, g.r0 + g.rows) (g.r0 a multiple of 16: own AMX pads the group's
  // rows to whole tiles, which the tile's copies of Q and dO hold) over keys [j0, j0 + g.keys)
  void scores_and_dprobs(float* s, float* dp, int64_t ld, int64_t j0, const std::vector<RowGroup>& groups) {
    const scalar_t *keys_t = kt + kv.transposed_offset(j0), *values_t = vt + kv.transposed_offset(j0);
    for (const RowGroup& g : groups) {
      float *s_g = s + g.r0 * ld, *dp_g = dp + g.r0 * ld;
      scores(g.rows, g.keys, q + g.r0 * ldq, ldq, keys_t, s_g, ld, false);              // S = Q K^T
      if (split_dout) {  // dP = dO V^T, dO in two parts
        scores_parts(g.rows, g.keys, do_rows.data() + g.r0 * D, do_rows_lo.data() + g.r0 * D, D, values_t, dp_g, ld);
      } else {
        scores(g.rows, g.keys, do_rows.data() + g.r0 * D, D, values_t, dp_g, ld, false);  // dP = dO V^T
      }
    }
  }
  // prob and ds: [nq, nk] with leading dimension ld, zero past the `real` keys (< Sk)
  void gradients(const float* prob, const float* ds, int64_t ld, int64_t j0, int64_t nk, int64_t real,
                 const std::vector<RowGroup>& groups, const std::vector<KeyChunk>& chunks, float* dq_tile,
                 const KeyGradRows<float>& out) {
    using at::native::cpublas::brgemm;
    const scalar_t* ds_in;  // dS as the products read it
    int64_t ld_in;
    if constexpr (P == 1) {
      ds_in = ds;
      ld_in = ld;
    } else {
      round_rows(ds, ld, nq, nk, ds_rows.data(), block_k);
      ds_in = ds_rows.data();
      ld_in = block_k;
    }
    if (dq_tile != nullptr)
      for (const RowGroup& g : groups)  // dQ += dS K
        accumulate(g.rows, g.keys, ds_in + g.r0 * ld_in, ld_in, kr + j0 * D, dq_tile + g.r0 * D, D);
    if constexpr (P == 1) {
      // dV^T += dO^T P and dK^T += Q^T dS: Q^T and dO^T are [D][nq], so a chunk's rows from r0
      // are its columns from r0
      const int64_t L = kv.padded_keys;
      for (const KeyChunk& c : chunks) {
        const int64_t keys = c.k1 - c.k0, rows = nq - c.r0, at = c.r0 * ld + c.k0;
        if (out.dv)
          brgemm(D, keys, rows, nq, ld, L, true, do_operand.data() + c.r0, prob + at, values_grad_t.data() + j0 + c.k0,
                 false);
        if (out.dk)
          brgemm(D, keys, rows, nq, ld, L, true, q_operand.data() + c.r0, ds + at, keys_grad_t.data() + j0 + c.k0,
                 false);
      }
      if (out.dv || out.dk) {
        touched_lo = touched_hi > touched_lo ? std::min(touched_lo, j0) : j0;
        touched_hi = std::max(touched_hi, j0 + real);
      }
    } else {
      // dV += P^T dO and dK += dS^T Q from the transposed P and dS ([keys][nq_pad]); a chunk's
      // rows from r0 (a multiple of kRowGroup, so of a VNNI pair and of an AMX step) start at
      // row r0 * D of Q's and dO's packed rows in either layout
      auto product = [&](const scalar_t* a_t, const scalar_t* b_rows, float* rows_out, int64_t stride) {
        for (const KeyChunk& c : chunks)
          accumulate(c.k1 - c.k0, nq_pad - c.r0, a_t + c.k0 * nq_pad + c.r0, nq_pad, b_rows + c.r0 * D,
                     rows_out + c.k0 * stride, stride);
      };
      if (out.dv) {
        round_rows(prob, ld, nq, real, prob_rows.data(), block_k);
        transpose_tile(prob_rows.data(), block_k, real, prob_t.data());
        product(prob_t.data(), do_operand.data(), out.dv, out.stride_dv);
      }
      if (out.dk) {
        transpose_tile(ds_in, ld_in, real, ds_t.data());
        product(ds_t.data(), q_operand.data(), out.dk, out.stride_dk);
      }
    }
  }
  // Writes the keys some block touched into head_rows (the head's dK and dV rows from key 0;
  // zeros between touched blocks) and returns them ({0, 0} for none): the caller zeroes the rest.
  KeyRange end_head(const KeyGradRows<float>& head_rows) {
    static_assert(P == 1, "16-bit types add into the rows");
    if (touched_hi <= touched_lo) return {0, 0};
    const KeyRange written{touched_lo, touched_hi};
    const int64_t L = kv.padded_keys, lo = written.lo, n = written.size();
    auto hand_over = [&](CacheLineVector<float>& grad_t, float* rows, int64_t stride) {
      if (rows == nullptr) return;
      transpose(D, n, grad_t.data() + lo, L, rows + lo * stride, stride);
      for (int64_t d = 0; d < D; ++d) std::fill_n(grad_t.data() + d * L + lo, n, 0.f);
    };
    hand_over(keys_grad_t, head_rows.dk, head_rows.stride_dk);
    hand_over(values_grad_t, head_rows.dv, head_rows.stride_dv);
    touched_lo = touched_hi = 0;
    return written;
  }
  void end_worker() { AMX::end_products(own_amx, is_vnni<scalar_t>()); }

 private:
  // C[M x N] = A[M x D] B (+= with add_c), B = K^T or V^T packed from a key block's first key:
  // headops' own AMX loops where they run (A's rows padded to whole tiles), else brgemm
  void scores(int64_t M, int64_t N, const scalar_t* a, int64_t lda, const scalar_t* b, float* c, int64_t ldc,
              bool add_c) {
    if constexpr (P == 2) {
      if (own_amx)
        return AMX::scores(AMX::padded_rows(M), N, D, AMX::bits(a), lda, AMX::bits(b), c, ldc, add_c);
    }
    at::native::cpublas::brgemm(M, N, D, lda, kv.padded_keys, ldc, add_c, a, b, c, is_vnni<scalar_t>());
  }
  // C = (A_hi + A_lo) B, A in two parts (own AMX: in one pass over the tile registers)
  void scores_parts(int64_t M, int64_t N, const scalar_t* a_hi, const scalar_t* a_lo, int64_t lda, const scalar_t* b,
                    float* c, int64_t ldc) {
    if constexpr (P == 2) {
      if (own_amx)
        return AMX::scores_split_a(AMX::padded_rows(M), N, D, AMX::bits(a_hi), AMX::bits(a_lo), lda, AMX::bits(b), c,
                                   ldc);
    }
    scores(M, N, a_hi, lda, b, c, ldc, false);
    scores(M, N, a_lo, lda, b, c, ldc, true);
  }
  // C[M x D] += A[M x K] B, B packed rows of D (K and the tile's Q and dO): headops' own AMX loops
  // over tile-major B where they run, else brgemm
  void accumulate(int64_t M, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* b, float* c, int64_t ldc) {
    if constexpr (P == 2) {
      if (own_amx) return AMX::accumulate(M, D, K, AMX::bits(a), lda, AMX::bits(b), c, ldc);
    }
    at::native::cpublas::brgemm(M, D, K, lda, D, ldc, true, a, b, c, is_vnni<scalar_t>());
  }
  // own AMX: the tile's Q rows copied, they and dO's zero-padded to a whole tile (the A rows of S
  // and dP), and both packed tile-major over the queries (the B of dK and dV)
  void begin_amx_tile() {
    AMX::bind_thread();
    AMX::copy_padded_rows(AMX::bits(q), ldq, nq, D, AMX::bits(q_rows.data()));
    std::fill(do_rows.begin() + nq * D, do_rows.begin() + AMX::padded_rows(nq) * D, scalar_t(0));
    if (split_dout) std::fill(do_rows_lo.begin() + nq * D, do_rows_lo.begin() + AMX::padded_rows(nq) * D, scalar_t(0));
    q = q_rows.data();
    ldq = D;
    pack_rows_amx_tiles<scalar_t>([&](int64_t r) { return q + r * D; }, nq, nq_pad, D, q_operand.data());
    pack_rows_amx_tiles<scalar_t>([&](int64_t r) { return do_rows.data() + r * D; }, nq, nq_pad, D, do_operand.data());
  }
  // the tile's queries as the reduction of dV and dK: whole VNNI pairs, or whole AMX steps
  int64_t padded_queries(int64_t rows) const {
    const int64_t step = packed_key_alignment(own_amx, P);
    return (rows + step - 1) / step * step;
  }
  // dst[r, j] = src[r, j] rounded to scalar_t (convert_row), r < rows, j < cols
  static void round_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, scalar_t* dst, int64_t ld_dst) {
    for (int64_t r = 0; r < rows; ++r) convert_row(src + r * ld_src, dst + r * ld_dst, cols);
  }
  // dst[j, r] = rows[r, j] for the first `keys` columns; the padding columns [nq, nq_pad) are zero
  void transpose_tile(const scalar_t* rows, int64_t ld, int64_t keys, scalar_t* dst) const {
    transpose(nq, keys, reinterpret_cast<const uint16_t*>(rows), ld, reinterpret_cast<uint16_t*>(dst), nq_pad);
    if (nq_pad > nq)
      for (int64_t j = 0; j < keys; ++j) std::fill(dst + j * nq_pad + nq, dst + (j + 1) * nq_pad, scalar_t(0));
  }
};

// float16 K^T, V^T and K as two bfloat16 parts each (split_row: hi + lo is the float16 value
// exactly), tile-major for headops' own AMX loops: the backward's SplitHalfTileProducts.
struct SplitHalfBackwardKV {
  at::Tensor fresh;
  at::BFloat16* storage;
  PackedBackwardKV<at::BFloat16> hi, lo;

  explicit SplitHalfBackwardKV(const AttentionParams& f)
      : storage(packing_workspace<at::BFloat16>(2 * PackedBackwardKV<at::BFloat16>::workspace_elems(f), fresh)),
        hi(f, true, storage),
        lo(f, true, storage + PackedBackwardKV<at::BFloat16>::workspace_elems(f)) {
    using KV = PackedBackwardKV<at::BFloat16>;
    const int64_t D = f.head_dim;
    KV::for_each_block(f, [&](int64_t b, int64_t kvh, int64_t blk) {
      const int64_t real = KV::real_keys(f, blk), j_begin = blk * KV::kPackBlock;
      // (q, k, v are finite here: attention_bwd.cpp checked them)
      const HalfBlockParts parts = split_half_block([&](int64_t r) { return f.k.row<at::Half>(b, j_begin + r, kvh); },
                                                    [&](int64_t r) { return f.v.row<at::Half>(b, j_begin + r, kvh); },
                                                    real, D);
      hi.pack_rows(b, kvh, blk, real, [&](int64_t r) { return parts.k_hi + r * D; },
                   [&](int64_t r) { return parts.v_hi + r * D; });
      lo.pack_rows(b, kvh, blk, real, [&](int64_t r) { return parts.k_lo + r * D; },
                   [&](int64_t r) { return parts.v_lo + r * D; });
    });
  }
};

// float16 on AMX without AMX-FP16 (the forward's SplitHalfOperands): each of the five products
// runs three times on bfloat16 tiles, hi·hi + hi·lo + lo·hi of its operands' two parts. q, k, v
// split exactly; dL/do, P and dS (float) to ~2**-17. dq, dk and dv come out float-accurate to
// about that before dq's rounding to float16. For calls that learn neither softmax_scale nor
// key_bias, with finite q, k, v (backward_splits_half, attention_bwd.cpp).
struct SplitHalfTileProducts {
  using dq_t = at::Half;
  static constexpr bool writes_key_grads_once = false, scales_key_grads = false;
  static constexpr int64_t key_alignment() { return AMX::kKeyStep; }
  using BF16 = at::BFloat16;
  const AttentionParams& f;
  const SplitHalfBackwardKV& kv;
  int64_t block_k, D;
  const BF16 *kt_hi = nullptr, *kt_lo = nullptr, *vt_hi = nullptr, *vt_lo = nullptr;
  const BF16 *kr_hi = nullptr, *kr_lo = nullptr;
  int64_t nq = 0, nq_pad = 0;
  // the tile's Q and dO in two parts: rows, zero rows to a whole tile (A of S and dP), and packed
  // tile-major over the queries (B of dK and dV)
  CacheLineVector<BF16> q_hi, q_lo, do_hi, do_lo, q_op_hi, q_op_lo, do_op_hi, do_op_lo;
  // the block's dS (A of dQ) and P in two parts, and one of them transposed ([keys][nq_pad], A of
  // dK and dV)
  CacheLineVector<BF16> ds_hi, ds_lo, prob_hi, prob_lo, t_hi, t_lo;

  SplitHalfTileProducts(const BackwardParams& p, const SplitHalfBackwardKV& split, int64_t block_q, int64_t bk)
      : f(p.fwd), kv(split), block_k(bk), D(p.fwd.head_dim) {
    const int64_t bq_pad = padded_queries(block_q);
    for (auto* rows : {&q_hi, &q_lo, &do_hi, &do_lo}) rows->resize(AMX::padded_rows(block_q) * D);
    for (auto* packed : {&q_op_hi, &q_op_lo, &do_op_hi, &do_op_lo}) packed->resize(bq_pad * D);
    for (auto* tile : {&ds_hi, &ds_lo, &prob_hi, &prob_lo}) tile->resize(block_q * bk);
    t_hi.resize(bk * bq_pad);
    t_lo.resize(bk * bq_pad);
  }
  int64_t padded_keys() const { return kv.hi.padded_keys; }

  void begin_tile(int64_t b, int64_t h, int64_t q0, int64_t rows, const float* d_o, float /*softmax_scale*/) {
    const int64_t kvh = h / f.group();
    nq = rows;
    nq_pad = padded_queries(rows);
    kt_hi = kv.hi.keys_t(b, kvh);
    kt_lo = kv.lo.keys_t(b, kvh);
    vt_hi = kv.hi.values_t(b, kvh);
    vt_lo = kv.lo.values_t(b, kvh);
    kr_hi = kv.hi.keys(b, kvh);
    kr_lo = kv.lo.keys(b, kvh);
    AMX::bind_thread();
    const int64_t tile_rows = AMX::padded_rows(nq);
    split_padded_rows([&](int64_t r) { return f.q.row<at::Half>(b, q0 + r, h); }, nq, tile_rows, D, q_hi.data(),
                      q_lo.data());
    split_padded_rows([&](int64_t r) { return d_o + r * D; }, nq, tile_rows, D, do_hi.data(), do_lo.data());
    auto pack = [&](const CacheLineVector<BF16>& rows_of, CacheLineVector<BF16>& packed) {
      pack_rows_amx_tiles<BF16>([&](int64_t r) { return rows_of.data() + r * D; }, nq, nq_pad, D, packed.data());
    };
    pack(q_hi, q_op_hi);
    pack(q_lo, q_op_lo);
    pack(do_hi, do_op_hi);
    pack(do_lo, do_op_lo);
  }
  static constexpr bool rounds_dout() { return false; }
  static void round_like_inputs(float* /*row*/, int64_t /*n*/) {}

  // S = Q K^T and dP = dO V^T per row group (g.r0 a multiple of 16; rows padded to whole tiles)
  void scores_and_dprobs(float* s, float* dp, int64_t ld, int64_t j0, const std::vector<RowGroup>& groups) {
    const int64_t at = kv.hi.transposed_offset(j0);
    for (const RowGroup& g : groups) {
      three_scores(g, q_hi, q_lo, kt_hi + at, kt_lo + at, s + g.r0 * ld, ld);
      three_scores(g, do_hi, do_lo, vt_hi + at, vt_lo + at, dp + g.r0 * ld, ld);
    }
  }
  // prob and ds: [nq, nk] with leading dimension ld, zero past the `real` keys (< Sk)
  void gradients(const float* prob, const float* ds, int64_t ld, int64_t j0, int64_t nk, int64_t real,
                 const std::vector<RowGroup>& groups, const std::vector<KeyChunk>& chunks, float* dq_tile,
                 const KeyGradRows<float>& out) {
    split_rows(ds, ld, nk, ds_hi, ds_lo);
    if (dq_tile != nullptr)
      for (const RowGroup& g : groups)  // dQ += dS K
        three_products(g.rows, g.keys, ds_hi.data() + g.r0 * block_k, ds_lo.data() + g.r0 * block_k, block_k,
                       kr_hi + j0 * D, kr_lo + j0 * D, dq_tile + g.r0 * D, D);
    // dV += P^T dO and dK += dS^T Q from the transposed parts ([keys][nq_pad]); a chunk's rows
    // from r0 (a multiple of an AMX step) start at row r0 * D of Q's and dO's packed rows
    auto product = [&](const CacheLineVector<BF16>& b_hi, const CacheLineVector<BF16>& b_lo, float* rows_out,
                       int64_t stride) {
      for (const KeyChunk& c : chunks) {
        const int64_t at = c.k0 * nq_pad + c.r0;
        three_products(c.k1 - c.k0, nq_pad - c.r0, t_hi.data() + at, t_lo.data() + at, nq_pad, b_hi.data() + c.r0 * D,
                       b_lo.data() + c.r0 * D, rows_out + c.k0 * stride, stride);
      }
    };
    if (out.dv) {
      split_rows(prob, ld, real, prob_hi, prob_lo);
      transpose_parts(prob_hi, prob_lo, real);
      product(do_op_hi, do_op_lo, out.dv, out.stride_dv);
    }
    if (out.dk) {
      transpose_parts(ds_hi, ds_lo, real);
      product(q_op_hi, q_op_lo, out.dk, out.stride_dk);
    }
  }
  void end_worker() { AMX::end_products(true, false); }

 private:
  // C = A B^T over the head dim (AMX::split_scores): a row group's rows of the tile's A parts
  void three_scores(const RowGroup& g, const CacheLineVector<BF16>& a_hi, const CacheLineVector<BF16>& a_lo,
                    const BF16* b_hi, const BF16* b_lo, float* c, int64_t ldc) const {
    AMX::split_scores(AMX::padded_rows(g.rows), g.keys, D, AMX::bits(a_hi.data() + g.r0 * D),
                      AMX::bits(a_lo.data() + g.r0 * D), D, AMX::bits(b_hi), AMX::bits(b_lo), c, ldc);
  }
  // C[M x D] += A B, reduced over K (AMX::split_accumulate; B tile-major rows of D)
  void three_products(int64_t M, int64_t K, const BF16* a_hi, const BF16* a_lo, int64_t lda, const BF16* b_hi,
                      const BF16* b_lo, float* c, int64_t ldc) const {
    AMX::split_accumulate(M, D, K, AMX::bits(a_hi), AMX::bits(a_lo), lda, AMX::bits(b_hi), AMX::bits(b_lo), c, ldc);
  }
  // the tile's nq rows of src (float, [nq, cols] with leading dimension ld) in two parts, ld block_k
  void split_rows(const float* src, int64_t ld, int64_t cols, CacheLineVector<BF16>& hi, CacheLineVector<BF16>& lo) {
    for (int64_t r = 0; r < nq; ++r) split_row(src + r * ld, hi.data() + r * block_k, lo.data() + r * block_k, cols);
  }
  // t_hi, t_lo = the parts' first `keys` columns transposed, zero in the padding columns [nq, nq_pad)
  void transpose_parts(const CacheLineVector<BF16>& hi, const CacheLineVector<BF16>& lo, int64_t keys) {
    for (auto [rows, dst] : {std::pair{&hi, &t_hi}, std::pair{&lo, &t_lo}}) {
      transpose(nq, keys, reinterpret_cast<const uint16_t*>(rows->data()), block_k, reinterpret_cast<uint16_t*>(dst->data()),
                nq_pad);
      if (nq_pad > nq)
        for (int64_t j = 0; j < keys; ++j) std::fill(dst->data() + j * nq_pad + nq, dst->data() + (j + 1) * nq_pad, BF16(0.f));
    }
  }
  static int64_t padded_queries(int64_t rows) { return (rows + AMX::kKeyStep - 1) / AMX::kKeyStep * AMX::kKeyStep; }
};

}  // namespace headops::cpu::CPU_CAPABILITY
