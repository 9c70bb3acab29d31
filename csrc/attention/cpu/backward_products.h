// How a CPU backward work item obtains its five tile products, per dtype:
//  - BlasTileProducts: float/double inputs straight from the strided rows through BLAS;
//  - PackedTileProducts: bfloat16/float16 inputs through oneDNN's brgemm (AMX, AVX512-BF16,
//    AVX512-FP16) in the input dtype with float accumulation, as the forward's PackedOperands:
//    P, dS and dO are rounded to the input dtype for the products that read them (as SDPA's
//    16-bit backward does); everything elementwise stays in float. Float inputs take it too on
//    AVX-512 CPUs (call_uses_packed_operands), with plain operands and nothing rounded.
// Both take one query tile at a time (begin_tile), then per key block S = Q K^T and
// dP = dO V^T (scores_and_dprobs) and dV += P^T dO, dQ += dS K, dK += dS^T Q (gradients).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../cpu/blas.h"
#include "../../cpu/row_ops.h"
#include "../../cpu/transpose.h"
#include "../attention_params.h"
#include "../../cpu/vnni_pack.h"

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
  static constexpr int64_t key_alignment = 1;
  const AttentionParams& f;
  const acc_t *q = nullptr, *k = nullptr, *v = nullptr, *d_o = nullptr;
  int64_t nq = 0;

  explicit BlasTileProducts(const BackwardParams& p) : f(p.fwd) {}
  int64_t padded_keys() const { return f.seqlen_k; }

  // d_o: dL/do of the tile's rows, [nq, D] contiguous, float
  void begin_tile(int64_t b, int64_t h, int64_t q0, int64_t rows, const acc_t* d_o_rows) {
    const int64_t kvh = h / f.group();
    q = f.q.row<acc_t>(b, q0, h);
    k = f.k.row<acc_t>(b, 0, kvh);
    v = f.v.row<acc_t>(b, 0, kvh);
    d_o = d_o_rows;
    nq = rows;
  }
  const acc_t* q_row(int64_t r) { return q + r * f.q.stride_s; }
  static constexpr bool rounds_dout = false;
  static void round_like_inputs(acc_t* /*row*/, int64_t /*n*/) {}

  void scores_and_dprobs(acc_t* s, acc_t* dp, int64_t ld, int64_t j0, int64_t nk) {
    const int64_t D = f.head_dim;
    gemm_nt(nq, nk, D, acc_t(1), q, f.q.stride_s, k + j0 * f.k.stride_s, f.k.stride_s, acc_t(0), s, ld);   // S = Q K^T
    gemm_nt(nq, nk, D, acc_t(1), d_o, D, v + j0 * f.v.stride_s, f.v.stride_s, acc_t(0), dp, ld);            // dP = dO V^T
  }
  // prob and ds: [nq, nk] with leading dimension ld (nk keys, all real here)
  void gradients(const acc_t* prob, const acc_t* ds, int64_t ld, int64_t j0, int64_t nk, int64_t /*real*/,
                 acc_t* dq_tile, const KeyGradRows<acc_t>& out) {
    const int64_t D = f.head_dim;
    if (out.dv) gemm_tn(nk, D, nq, acc_t(1), prob, ld, d_o, D, acc_t(1), out.dv, out.stride_dv);         // dV += P^T dO
    gemm_nn(nq, D, nk, acc_t(1), ds, ld, k + j0 * f.k.stride_s, f.k.stride_s, acc_t(1), dq_tile, D);     // dQ += dS K
    if (out.dk) gemm_tn(nk, D, nq, acc_t(1), ds, ld, q, f.q.stride_s, acc_t(1), out.dk, out.stride_dk);  // dK += dS^T Q
  }
  void end_worker() {}
};

// K^T, V^T (the B operands of S and dP) and K (of dQ) of every (b, kv head) in brgemm's B layout
// (vnni_pack.h: VNNI pairs for 16-bit types, plain for float), zero-padded to a multiple of
// kPackBlock keys. A transient workspace of 1.5x the size of K and V, packed once per call.
template <typename scalar_t>
struct PackedBackwardKV {
  static constexpr int64_t kPackBlock = 64;
  at::Tensor storage;
  int64_t padded_keys = 0, head_dim = 0, heads_kv = 0, heads = 0;  // heads: batch * heads_kv

  explicit PackedBackwardKV(const AttentionParams& f) : head_dim(f.head_dim), heads_kv(f.heads_kv) {
    padded_keys = (f.seqlen_k + kPackBlock - 1) / kPackBlock * kPackBlock;
    heads = f.batch * f.heads_kv;
    storage = at::empty({3 * heads * head_elems()},
                        at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
    const int64_t blocks = padded_keys / kPackBlock;
    at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) pack_block(f, n / blocks / f.heads_kv, n / blocks % f.heads_kv, n % blocks);
    });
  }
  int64_t head_elems() const { return padded_keys * head_dim; }
  scalar_t* part(int64_t which, int64_t b, int64_t kvh) const {
    return storage.data_ptr<scalar_t>() + (which * heads + b * heads_kv + kvh) * head_elems();
  }
  const scalar_t* keys_t(int64_t b, int64_t kvh) const { return part(0, b, kvh); }
  const scalar_t* values_t(int64_t b, int64_t kvh) const { return part(1, b, kvh); }
  const scalar_t* keys(int64_t b, int64_t kvh) const { return part(2, b, kvh); }

 private:
  void pack_block(const AttentionParams& f, int64_t b, int64_t kvh, int64_t blk) {
    const int64_t j_begin = blk * kPackBlock, D = head_dim, L = padded_keys;
    const int64_t real = std::max<int64_t>(0, std::min(kPackBlock, f.seqlen_k - j_begin));
    auto key = [&](int64_t r) { return f.k.row<scalar_t>(b, j_begin + r, kvh); };
    auto value = [&](int64_t r) { return f.v.row<scalar_t>(b, j_begin + r, kvh); };
    constexpr int64_t P = vnni_pairs<scalar_t>();
    pack_columns_vnni<scalar_t>(key, real, kPackBlock, D, L, part(0, b, kvh) + j_begin * P);
    pack_columns_vnni<scalar_t>(value, real, kPackBlock, D, L, part(1, b, kvh) + j_begin * P);
    pack_rows_vnni<scalar_t>(key, real, kPackBlock, D, part(2, b, kvh) + j_begin * D);
  }
};

template <typename scalar_t>
struct PackedTileProducts {
  static constexpr int64_t P = vnni_pairs<scalar_t>();
  // VNNI pairs: key blocks of 16-bit types start and end on even keys
  static constexpr int64_t key_alignment = P;
  const AttentionParams& f;
  const PackedBackwardKV<scalar_t>& kv;
  int64_t block_k, D;
  const scalar_t *q = nullptr, *kt = nullptr, *vt = nullptr, *kr = nullptr;
  int64_t nq = 0, nq_pad = 0;
  std::vector<scalar_t> q_vnni, do_rows, do_vnni;  // the tile's Q and dO as B operands; dO as A
  std::vector<scalar_t> prob_rows, prob_t, ds_rows, ds_t;  // the block's P, P^T, dS, dS^T in scalar_t
  std::vector<float> q_float;

  PackedTileProducts(const BackwardParams& p, const PackedBackwardKV<scalar_t>& packed, int64_t block_q, int64_t bk)
      : f(p.fwd), kv(packed), block_k(bk), D(p.fwd.head_dim) {
    const int64_t bq_pad = block_q + block_q % P;
    q_vnni.resize(bq_pad * D);
    do_rows.resize(block_q * D);
    do_vnni.resize(bq_pad * D);
    prob_t.resize(bk * bq_pad);
    ds_t.resize(bk * bq_pad);
    if constexpr (P == 2) {  // float's products read P and dS where they are
      prob_rows.resize(block_q * bk);
      ds_rows.resize(block_q * bk);
    }
    q_float.resize(D);
  }
  int64_t padded_keys() const { return kv.padded_keys; }

  void begin_tile(int64_t b, int64_t h, int64_t q0, int64_t rows, const float* d_o) {
    const int64_t kvh = h / f.group();
    nq = rows;
    nq_pad = rows + rows % P;
    q = f.q.row<scalar_t>(b, q0, h);
    kt = kv.keys_t(b, kvh);
    vt = kv.values_t(b, kvh);
    kr = kv.keys(b, kvh);
    round_rows(d_o, D, nq, D, do_rows.data(), D);
    pack_rows_vnni<scalar_t>([&](int64_t r) { return q + r * f.q.stride_s; }, nq, nq_pad, D, q_vnni.data());
    pack_rows_vnni<scalar_t>([&](int64_t r) { return do_rows.data() + r * D; }, nq, nq_pad, D, do_vnni.data());
  }
  // dL/do rounded to scalar_t, as the dP and dV products read it (float: nothing to round)
  static constexpr bool rounds_dout = P == 2;
  static void round_like_inputs(float* row, int64_t n) {
    constexpr int64_t kChunk = 64;
    scalar_t rounded[kChunk];
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t c = std::min(kChunk, n - i);
      convert_row(row + i, rounded, c);
      at::vec::convert(rounded, row + i, c);
    }
  }
  const float* q_row(int64_t r) {
    const scalar_t* row = q + r * f.q.stride_s;
    for (int64_t d = 0; d < D; ++d) q_float[d] = static_cast<float>(row[d]);
    return q_float.data();
  }

  void scores_and_dprobs(float* s, float* dp, int64_t ld, int64_t j0, int64_t nk) {
    using at::native::cpublas::brgemm;
    constexpr bool vnni = is_vnni<scalar_t>();
    brgemm(nq, nk, D, f.q.stride_s, kv.padded_keys, ld, false, q, kt + j0 * P, s, vnni);         // S = Q K^T
    brgemm(nq, nk, D, D, kv.padded_keys, ld, false, do_rows.data(), vt + j0 * P, dp, vnni);      // dP = dO V^T
  }
  // prob and ds: [nq, nk] with leading dimension ld, zero past the `real` keys (< Sk)
  void gradients(const float* prob, const float* ds, int64_t ld, int64_t j0, int64_t nk, int64_t real,
                 float* dq_tile, const KeyGradRows<float>& out) {
    using at::native::cpublas::brgemm;
    constexpr bool vnni = is_vnni<scalar_t>();
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
    brgemm(nq, D, nk, ld_in, D, D, true, ds_in, kr + j0 * D, dq_tile, vnni);  // dQ += dS K
    if (out.dv) {
      if constexpr (P == 1) {
        transpose_tile(prob, ld, real, prob_t.data());
      } else {
        round_rows(prob, ld, nq, real, prob_rows.data(), block_k);
        transpose_tile(prob_rows.data(), block_k, real, prob_t.data());
      }
      brgemm(real, D, nq_pad, nq_pad, D, out.stride_dv, true, prob_t.data(), do_vnni.data(), out.dv, vnni);  // dV += P^T dO
    }
    if (out.dk) {
      transpose_tile(ds_in, ld_in, real, ds_t.data());
      brgemm(real, D, nq_pad, nq_pad, D, out.stride_dk, true, ds_t.data(), q_vnni.data(), out.dk, vnni);  // dK += dS^T Q
    }
  }
  void end_worker() { at::native::cpublas::brgemm_release(is_vnni<scalar_t>()); }

 private:
  // dst[r, j] = src[r, j] rounded to scalar_t (convert_row), r < rows, j < cols
  static void round_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, scalar_t* dst, int64_t ld_dst) {
    for (int64_t r = 0; r < rows; ++r) convert_row(src + r * ld_src, dst + r * ld_dst, cols);
  }
  // dst[j, r] = rows[r, j] for the first `keys` columns; row nq of an odd tile's padding (16-bit
  // types) is zero
  void transpose_tile(const scalar_t* rows, int64_t ld, int64_t keys, scalar_t* dst) const {
    if constexpr (P == 1) {
      transpose(nq, keys, rows, ld, dst, nq_pad);
    } else {
      transpose(nq, keys, reinterpret_cast<const uint16_t*>(rows), ld, reinterpret_cast<uint16_t*>(dst), nq_pad);
      if (nq_pad > nq)
        for (int64_t j = 0; j < keys; ++j) dst[j * nq_pad + nq] = scalar_t(0);
    }
  }
};

}  // namespace headops::cpu::CPU_CAPABILITY
