// Fused CPU attention backward with per-head behaviour (FlashAttention-2 style).
//
// One work item is one (batch, query head): it owns that head's dq rows, its per-query-head
// dk/dv accumulators (the caller sums GQA groups in a fixed order) and its per-head parameter
// gradients, so threads never write the same memory and results do not depend on the thread
// that ran an item. Within the item:
//   1. a pass over the rows turns dL/dout into the gradient of the attention average (through
//      the epilogue and the alpha mixing) and yields the gradients of gate, out_scale,
//      out_bias, alpha and sink_logit, and each branch's delta_i = do_i . o_i - dlse_i;
//   2. query tiles walk only the key blocks they can see (the forward's tile_keys), recompute
//      the probabilities from the saved lse, and accumulate dq, dk, dv (and key_bias,
//      softmax_scale) with five tile products (backward_products.h: BLAS for float/double,
//      brgemm in the input dtype for bfloat16/float16 where the CPU runs it natively).
//      Nothing of size S x S is stored.
// Every row of dq, dk and dv an item owns is written here, zeros where no key block reaches it
// (the dispatcher does not fill them first).
// q, k, v arrive in their own dtype on the brgemm path, else in the accumulation dtype (the
// dispatcher converts); everything else in the accumulation dtype.
#pragma once

#ifndef CPU_CAPABILITY
#error "include backward_kernel.h from a backward_<isa>.cpp that defines CPU_CAPABILITY"
#endif
#define HEADOPS_ISA_NAMESPACE CPU_CAPABILITY

#include "attention_bwd_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backward_semantics.h"
#include "../head_semantics.h"
#include "../online_softmax.h"
#include "../work_counters.h"
#include "../../cpu/blas.h"
#include "../../cpu/cache_line_vector.h"
#include "../../cpu/isa_dispatch.h"
#include "../../cpu/row_ops.h"
#include "backward_products.h"
#include "kernel_common.h"

namespace headops::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  V acc0(T(0)), acc1(T(0));
  int64_t d = 0;
  for (; d + 2 * V::size() <= n; d += 2 * V::size()) {
    acc0 = at::vec::fmadd(V::loadu(a + d), V::loadu(b + d), acc0);
    acc1 = at::vec::fmadd(V::loadu(a + d + V::size()), V::loadu(b + d + V::size()), acc1);
  }
  T sum = reduce_sum(acc0 + acc1);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// ds[j] = p[j] * (ds[j] - delta) on [lo, hi): softmax backward of one row (ds holds dP).
template <typename T>
void softmax_grad(T* ds, const T* p, int64_t lo, int64_t hi, T delta) {
  using V = Vectorized<T>;
  const V vd(delta);
  int64_t j = lo;
  for (; j + V::size() <= hi; j += V::size()) (V::loadu(p + j) * (V::loadu(ds + j) - vd)).store(ds + j);
  for (; j < hi; ++j) ds[j] = p[j] * (ds[j] - delta);
}

template <typename acc_t, typename Products>
class HeadBackward {
  using V = Vectorized<acc_t>;

 public:
  HeadBackward(const BackwardParams& p, int64_t block_q, int64_t block_k, Products products)
      : p_(p), f_(p.fwd), block_q_(block_q), block_k_(block_k), D_(p.fwd.head_dim), products_(std::move(products)),
        d_out_(p.fwd.seqlen_q * p.fwd.head_dim), delta_stream_(p.fwd.seqlen_q), delta_full_(p.fwd.seqlen_q),
        probs_(block_q * block_k), probs_full_(block_q * block_k),
        grads_(block_q * block_k), dq_tile_(block_q * p.fwd.head_dim), row_keys_(block_q),
        raw_scores_(p.dsoftmax_scale ? block_k : 0) {}

  void run(int64_t b, int64_t h, LocalWorkCounts& counts) {
    const BackwardHead<acc_t> head = BackwardHead<acc_t>::read(p_, b, h);
    const int64_t Sq = f_.seqlen_q, Sk = f_.seqlen_k;
    if (!head.skipped) prepare_rows(b, h, head);  // (a skipped head was never computed)
    if (head.skipped || !p_.needs_key_loop() || head.rows_zero) {  // nothing reaches q, k or v
      zero_query_grad_rows(b, h, 0, Sq);
      zero_key_grad_rows(b, h, 0, Sk);
      return;
    }
    if constexpr (!Products::writes_key_grads_once) zero_key_grad_rows(b, h, 0, Sk);  // the products add into them
    walk_tiles(b, h, head, counts);
  }
  void finish() { products_.end_worker(); }

 private:
  acc_t saved_lse(const void* base, int64_t b, int64_t h, int64_t i) const {
    return static_cast<const acc_t*>(base)[(b * f_.heads_q + h) * f_.seqlen_q + i];
  }
  // Pass 1: the epilogue and alpha mixing backwards, row by row.
  void prepare_rows(int64_t b, int64_t h, const BackwardHead<acc_t>& head) {
    const int64_t D = D_, Sq = f_.seqlen_q, bh = b * f_.heads_q + h;
    const HeadScalars<acc_t>& hs = head.hs;
    const BranchPlan& plan = head.plan;
    const acc_t gate = hs.gate;
    const EpilogueRows<acc_t> rows = EpilogueRows<acc_t>::read(p_, head, b, h);
    const acc_t *os = rows.out_scale, *ob = rows.out_bias, *dlse = rows.dlse;
    acc_t *dos = rows.dout_scale, *dob = rows.dout_bias;
    const bool want_dalpha = rows.want_dalpha;
    acc_t dgate = 0, dalpha = 0, dsink = 0;
    for (int64_t i = 0; i < Sq; ++i) {
      const acc_t* dy = p_.dout.row<acc_t>(b, i, h);
      const acc_t* o_full = rows.full_row(i);
      const acc_t* o_stream = rows.streaming_row(i);
      acc_t* d_o = d_out_.data() + i * D;
      const bool mixed = rows.need_mixed && (o_full || o_stream);
      // out = gate * (o * out_scale + out_bias)
      if (!mixed && dob == nullptr) {
        // no parameter gradient reads this row: dL/do alone, in loops the compiler vectorises
        if (os) {
          for (int64_t d = 0; d < D; ++d) d_o[d] = gate * dy[d] * os[d];
        } else {
          for (int64_t d = 0; d < D; ++d) d_o[d] = gate * dy[d];
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const acc_t scale = os ? os[d] : acc_t(1);
          if (mixed) {
            const acc_t o = mixed_average(hs, o_full, o_stream, d);
            if (p_.dgate) dgate += dy[d] * gated_term(gate, o * scale + (ob ? ob[d] : acc_t(0)));
            if (dos) dos[d] += gate * dy[d] * o;
          }
          if (dob) dob[d] += gate * dy[d];
          d_o[d] = gate * dy[d] * scale;  // dL/do of the mixed average
        }
      }
      // under a zero gate the saved averages may hold anything a NaN could come from: not read
      auto dots = [&](acc_t& full, acc_t& stream) {
        full = gate != acc_t(0) && o_full ? dot(d_o, o_full, D) : acc_t(0);
        stream = gate != acc_t(0) && o_stream ? dot(d_o, o_stream, D) : acc_t(0);
      };
      acc_t dot_full, dot_stream;
      dots(dot_full, dot_stream);
      if (want_dalpha) dalpha += head.dalpha_share(dot_full, dot_stream);
      const bool has_dlse = dlse != nullptr;
      const acc_t dlse_i = has_dlse ? dlse[i] : acc_t(0);
      head.row_deltas(dot_full, dot_stream, has_dlse, dlse_i, delta_full_[i], delta_stream_[i]);
      if (p_.dsink_logit && hs.has_sink_logit) {
        if (plan.streaming) dsink += head.dsink_share(saved_lse(f_.lse, b, h, i), delta_stream_[i], StdExp{});
        if (plan.full) dsink += head.dsink_share(saved_lse(f_.lse_full, b, h, i), delta_full_[i], StdExp{});
      }
      if (products_.rounds_dout()) {
        // dP reads dL/do rounded to the input dtype: dS takes its deltas from the same values,
        // so that dP - delta cancels as it does exactly (do_scale is 1 wherever one branch is
        // walked); dalpha and dsink above keep the exact ones
        products_.round_like_inputs(d_o, D);
        dots(dot_full, dot_stream);
        head.row_deltas(dot_full, dot_stream, has_dlse, dlse_i, delta_full_[i], delta_stream_[i]);
      }
      if (head.do_scale != acc_t(1)) scale_row(d_o, D, head.do_scale);
    }
    if (p_.dgate) static_cast<acc_t*>(p_.dgate)[bh] = dgate;
    if (p_.dalpha) static_cast<acc_t*>(p_.dalpha)[bh] = dalpha;
    if (p_.dsink_logit) static_cast<acc_t*>(p_.dsink_logit)[bh] = dsink;
  }

  // Pass 2: query tiles over the key blocks they can see.
  void walk_tiles(int64_t b, int64_t h, const BackwardHead<acc_t>& head, LocalWorkCounts& counts) {
    const int64_t Sq = f_.seqlen_q, D = D_, bh = b * f_.heads_q + h;
    const HeadScalars<acc_t>& hs = head.hs;
    const int64_t rows = head_query_tile(hs, block_q_);
    dscale_ = 0;
    for (int64_t q0 = 0; q0 < Sq; q0 += rows) {
      const int64_t q1 = std::min(Sq, q0 + rows), nq = q1 - q0;
      const VisibleKeys keys = tile_keys(f_, hs, q0, q1, products_.key_alignment(), products_.padded_keys());
      if (keys.count() == 0) {
        zero_query_grad_rows(b, h, q0, q1);
        continue;
      }
      counts.add(kWorkItems, 1);
      products_.begin_tile(b, h, q0, nq, d_out_.data() + q0 * D, hs.softmax_scale);
      if (p_.want_dq) std::fill(dq_tile_.begin(), dq_tile_.begin() + nq * D, acc_t(0));
      for (const KeyRange& range : {keys.sinks, keys.window})
        for (int64_t j0 = range.lo; j0 < range.hi; j0 += block_k_)
          key_block(b, h, head, q0, nq, j0, std::min(block_k_, range.hi - j0), counts);
      // dq = scale * dS K
      for (int64_t r = 0; r < nq && p_.want_dq; ++r) {
        acc_t* dq_row = dq_tile_.data() + r * D;
        using dq_t = typename Products::dq_t;
        dq_t* out = const_cast<dq_t*>(p_.dq.row<dq_t>(b, q0 + r, h));
        if constexpr (std::is_same_v<dq_t, acc_t>) {
          for (int64_t d = 0; d < D; ++d) out[d] = hs.softmax_scale * dq_row[d];
        } else {  // rounded as dq.to(dtype) would round it
          for (int64_t d = 0; d < D; ++d) dq_row[d] = hs.softmax_scale * dq_row[d];
          convert_row(dq_row, out, D);
        }
      }
    }
    if (p_.dsoftmax_scale) static_cast<acc_t*>(p_.dsoftmax_scale)[bh] = dscale_;
    if constexpr (Products::writes_key_grads_once) {
      const KeyRange written = products_.end_head(key_grad_rows(b, 0, h));
      zero_key_grad_rows(b, h, 0, written.lo);
      zero_key_grad_rows(b, h, written.hi, f_.seqlen_k);
    }
    // dk = scale * sum dS^T Q, scaled once here where the products do not scale it: BLAS given
    // the scale as alpha rounds differently with its thread setting (the rows of dk belong to
    // this item)
    if (!Products::scales_key_grads && p_.want_dk && hs.softmax_scale != acc_t(1))
      for (int64_t j = 0; j < f_.seqlen_k; ++j)
        scale_row(const_cast<acc_t*>(p_.dk.row<acc_t>(b, j, h)), D, hs.softmax_scale);
  }

  void zero_query_grad_rows(int64_t b, int64_t h, int64_t i0, int64_t i1) {
    using dq_t = typename Products::dq_t;
    if (p_.want_dq)
      for (int64_t i = i0; i < i1; ++i) fill_zero(const_cast<dq_t*>(p_.dq.row<dq_t>(b, i, h)), 0, D_);
  }
  void zero_key_grad_rows(int64_t b, int64_t h, int64_t j0, int64_t j1) {
    auto zero = [&](const HeadTensor& grad) {
      for (int64_t j = j0; j < j1; ++j) fill_zero(const_cast<acc_t*>(grad.row<acc_t>(b, j, h)), 0, D_);
    };
    if (p_.want_dk) zero(p_.dk);
    if (p_.want_dv) zero(p_.dv);
  }

  // Probabilities of one branch for row r: exp(logit - lse) on the visible parts, 0 elsewhere.
  // `logits` holds scale * s + bias when `prescaled`, else the raw q.k products.
  void branch_probs(acc_t* out, const acc_t* logits, bool prescaled, const HeadVisibility& vis, int64_t pos,
                    int64_t j0, int64_t nk, bool whole_block, acc_t lse, acc_t scale, const acc_t* bias,
                    KeyRange (&parts)[2]) {
    vis.visible_in_block(pos, f_.seqlen_k, j0, nk, whole_block, parts);
    if (lse == -std::numeric_limits<acc_t>::infinity()) parts[0] = parts[1] = {0, 0};  // nothing visible
    int64_t cursor = 0;
    for (const KeyRange& part : parts) {
      if (part.empty()) continue;
      fill_zero(out, cursor, part.lo);
      acc_t unused_max;
      if (prescaled)
        exp_and_sum(logits, out, part.lo, part.hi, lse);
      else
        scaled_exp_sum(logits + part.lo, out + part.lo, part.size(), scale, bias ? bias + part.lo : nullptr, lse,
                       unused_max);
      cursor = part.hi;
    }
    fill_zero(out, cursor, nk);
  }

  // Key block [j0, j0 + nk): its first `real` keys exist (an aligned block may reach past Sk).
  void key_block(int64_t b, int64_t h, const BackwardHead<acc_t>& head, int64_t q0, int64_t nq, int64_t j0,
                 int64_t nk, LocalWorkCounts& counts) {
    const HeadScalars<acc_t>& hs = head.hs;
    const BranchPlan& plan = head.plan;
    const int64_t ld = block_k_, real = std::min(nk, f_.seqlen_k - j0);
    const int64_t pos0 = q0 + f_.seqlen_k - f_.seqlen_q;
    const acc_t* bias = f_.key_bias.present() ? f_.key_bias.row<acc_t>(b, h) + j0 : nullptr;
    acc_t* dkb = p_.dkey_bias ? static_cast<acc_t*>(p_.dkey_bias) + (b * f_.heads_q + h) * f_.seqlen_k + j0 : nullptr;
    acc_t* s = probs_.data();
    acc_t* ds = grads_.data();

    const HeadVisibility stream_vis = streaming_visibility(f_.causal, hs);
    const HeadVisibility full_vis = full_visibility(f_.causal);
    const bool both = head.both_branches();
    const HeadVisibility& main_vis = plan.full && !both ? full_vis : stream_vis;
    const bool main_whole = main_vis.block_fully_visible(pos0, pos0 + nq - 1, j0, j0 + real);
    const bool full_whole = full_vis.block_fully_visible(pos0, pos0 + nq - 1, j0, j0 + real);
    const bool stream_whole = stream_vis.block_fully_visible(pos0, pos0 + nq - 1, j0, j0 + real);

    // S, dP and dQ per group of rows on a block the diagonal or a window's edge crosses, and dV
    // and dK per chunk of keys over the rows that see them: the probabilities and dS past a row's
    // visible keys are zeros (branch_probs, the fills below), which no product needs to read
    const bool whole = real == nk && (both ? full_whole && stream_whole : main_whole);
    plan_row_groups(groups_, row_keys_.data(), nq, nk, whole, [&](int64_t r) {
      const int64_t main = seen_in_block(main_vis, pos0 + r, f_.seqlen_k, j0, nk);
      return both ? std::max(main, seen_in_block(full_vis, pos0 + r, f_.seqlen_k, j0, nk)) : main;
    });
    plan_key_chunks(chunks_, groups_, nq, real);
    products_.scores_and_dprobs(s, ds, ld, j0, groups_);  // S = Q K^T, dP = dO V^T
    counts.add(kKeyBlocks, 1);
    counts.add(kScoreElements, group_elements(groups_));
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = q0 + r, pos = pos0 + r;
      acc_t* s_row = s + r * ld;
      acc_t* ds_row = ds + r * ld;
      KeyRange parts[2];
      if (!both) {
        const acc_t lse = saved_lse(plan.full ? f_.lse_full : f_.lse, b, h, i);
        const acc_t delta = plan.full ? delta_full_[i] : delta_stream_[i];
        keep_raw_scores(s_row, std::min(real, row_keys_[r]));
        branch_probs(s_row, s_row, false, main_vis, pos, j0, real, main_whole, lse, hs.softmax_scale, bias, parts);
        int64_t cursor = 0;
        for (const KeyRange& part : parts) {
          if (part.empty()) continue;
          fill_zero(ds_row, cursor, part.lo);
          softmax_grad(ds_row, s_row, part.lo, part.hi, delta);
          cursor = part.hi;
        }
        add_scale_grad(ds_row, parts);
        fill_zero(ds_row, cursor, real);
      } else {
        // both branches read the same logits: scale them once, in place (the keys computed)
        const int64_t computed = std::min(real, row_keys_[r]);
        keep_raw_scores(s_row, computed);
        for (int64_t j = 0; j < computed; ++j) s_row[j] = s_row[j] * hs.softmax_scale + (bias ? bias[j] : acc_t(0));
        acc_t* pf = probs_full_.data() + r * ld;
        KeyRange full_parts[2];
        branch_probs(pf, s_row, true, full_vis, pos, j0, real, full_whole, saved_lse(f_.lse_full, b, h, i), 0,
                     nullptr, full_parts);
        branch_probs(s_row, s_row, true, stream_vis, pos, j0, real, stream_whole, saved_lse(f_.lse, b, h, i), 0,
                     nullptr, parts);
        // dS = P_f (w_f dP - delta_f) + P_s (w_s dP - delta_s);  dv weights P = w_f P_f + w_s P_s
        const acc_t df = delta_full_[i], dst = delta_stream_[i];
        for (int64_t j = 0; j < real; ++j) {
          const acc_t dp = ds_row[j];
          ds_row[j] = (pf[j] != acc_t(0) ? pf[j] * (head.dp_weight_full * dp - df) : acc_t(0)) +
                      (s_row[j] != acc_t(0) ? s_row[j] * (head.dp_weight_streaming * dp - dst) : acc_t(0));
          s_row[j] = head.dp_weight_full * pf[j] + head.dp_weight_streaming * s_row[j];
        }
        add_scale_grad(ds_row, full_parts);  // the full branch sees every key the streaming one does
      }
      fill_zero(s_row, real, nk);  // keys past Sk: nothing in any product
      fill_zero(ds_row, real, nk);
      if (dkb) add_into(dkb, ds_row, real);
    }
    if (p_.want_dv) counts.add(kValueBlocks, 1);
    if (p_.want_dv || p_.want_dk) counts.add(kGradientElements, chunk_elements(chunks_, nq));
    products_.gradients(s, ds, ld, j0, nk, real, groups_, chunks_, p_.want_dq ? dq_tile_.data() : nullptr,
                        key_grad_rows(b, j0, h));  // dV, dQ, dK
  }

  // d(softmax_scale) = sum_ij dS_ij (q_i . k_j), summed here from the float dS and the raw
  // scores before the products round dS (16-bit inputs): the sum cancels nearly to nothing, and
  // dS rounded to bfloat16, as the dQ product reads it, left errors of up to 7e-2 of its size
  // where the float dS leaves 1.3e-4 (20 draws, S = 333, P and dL/do in two parts). A frozen q
  // then needs no dQ product.
  void keep_raw_scores(const acc_t* s_row, int64_t n) {
    if (p_.dsoftmax_scale) std::copy(s_row, s_row + n, raw_scores_.data());
  }
  void add_scale_grad(const acc_t* ds_row, const KeyRange (&parts)[2]) {
    if (!p_.dsoftmax_scale) return;
    for (const KeyRange& part : parts)
      if (!part.empty()) dscale_ += dot(ds_row + part.lo, raw_scores_.data() + part.lo, part.size());
  }

  // The head's dK and dV rows from key j0 (null where not wanted).
  KeyGradRows<acc_t> key_grad_rows(int64_t b, int64_t j0, int64_t h) const {
    KeyGradRows<acc_t> rows;
    if (p_.want_dk) {
      rows.dk = const_cast<acc_t*>(p_.dk.row<acc_t>(b, j0, h));
      rows.stride_dk = p_.dk.stride_s;
    }
    if (p_.want_dv) {
      rows.dv = const_cast<acc_t*>(p_.dv.row<acc_t>(b, j0, h));
      rows.stride_dv = p_.dv.stride_s;
    }
    return rows;
  }

  const BackwardParams& p_;
  const AttentionParams& f_;
  int64_t block_q_, block_k_, D_;
  Products products_;
  CacheLineVector<acc_t> d_out_;                  // dL/do of the item's rows (times do_scale)
  std::vector<acc_t> delta_stream_, delta_full_;  // per row and branch: weight * do . o - dlse
  CacheLineVector<acc_t> probs_, probs_full_, grads_;  // [block_q, block_k]: P (or logits), P_full, dP then dS
  CacheLineVector<acc_t> dq_tile_;                     // [block_q, D]: dS K of the current tile (dq)
  std::vector<RowGroup> groups_;                       // the current block's S, dP and dQ products
  std::vector<KeyChunk> chunks_;                       // and its dV and dK products
  std::vector<int64_t> row_keys_;                      // per row: the keys of the block its S and dP computed
  CacheLineVector<acc_t> raw_scores_;                  // [block_k]: one row's q . k (d(softmax_scale))
  acc_t dscale_ = 0;                                   // the head's d(softmax_scale) so far
};

// Items heaviest first: the (b, h) pairs and the keys they walk. A head the forward skipped is
// an item too, which only writes its zero gradients.
template <typename acc_t>
std::vector<std::pair<int64_t, int64_t>> backward_items(const BackwardParams& p, int64_t block_q) {
  const AttentionParams& f = p.fwd;
  std::vector<std::pair<int64_t, int64_t>> items;  // (cost, b * Hq + h)
  for (int64_t b = 0; b < f.batch; ++b) {
    for (int64_t h = 0; h < f.heads_q; ++h) {
      const HeadScalars<acc_t> hs = read_head<acc_t>(f, b, h);
      int64_t cost = f.seqlen_q;
      if (p.skipped_zero_gate && hs.gate == acc_t(0)) {
        items.emplace_back(cost, b * f.heads_q + h);
        continue;
      }
      const int64_t rows = head_query_tile(hs, block_q);
      for (int64_t q0 = 0; q0 < f.seqlen_q; q0 += rows) {
        const int64_t q1 = std::min(f.seqlen_q, q0 + rows);
        cost += (q1 - q0) * tile_keys(f, hs, q0, q1, 1, f.seqlen_k).count();
      }
      items.emplace_back(cost, b * f.heads_q + h);
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  return items;
}

template <typename acc_t, typename Products, typename MakeProducts>
void run_backward(const BackwardParams& p, const TileShape& tiles, MakeProducts make_products) {
  const auto items = backward_items<acc_t>(p, tiles.block_q);
  struct Worker {
    HeadBackward<acc_t, Products> head;
    LocalWorkCounts counts;
    const std::vector<std::pair<int64_t, int64_t>>& items;
    int64_t heads_q;
    void run(int64_t n) {
      const int64_t flat = items[n].second;
      head.run(flat / heads_q, flat % heads_q, counts);
    }
    void finish() {
      head.finish();
      counts.publish();
    }
  };
  run_dynamic(static_cast<int64_t>(items.size()), [&] {
    return Worker{HeadBackward<acc_t, Products>(p, tiles.block_q, tiles.block_k, make_products()), {}, items,
                  p.fwd.heads_q};
  });
}

template <typename scalar_t>
void backward_typed(const BackwardParams& p) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const TileShape tiles = fit_to_call(backward_tile_shape(dtype, p.fwd.head_dim), p.fwd.seqlen_q, p.fwd.seqlen_k, p.fwd.causal);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (backward_writes_key_grads_once(dtype, p.fwd.head_dim, p.fwd.seqlen_q * p.fwd.group())) {
      const PackedBackwardKV<float> packed(p.fwd, false);
      return run_backward<float, PackedTileProducts<float>>(
          p, tiles, [&] { return PackedTileProducts<float>(p, packed, tiles.block_q, tiles.block_k); });
    }
  }
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    run_backward<scalar_t, BlasTileProducts<scalar_t>>(p, tiles, [&] { return BlasTileProducts<scalar_t>(p); });
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    const bool sums_ds = p.dsoftmax_scale != nullptr || p.dkey_bias != nullptr;
    TORCH_CHECK(backward_splits_half(dtype, p.fwd.head_dim, p.fwd.seqlen_q * p.fwd.group(), sums_ds),
                "headops: the CPU backward reads float16 q/k/v only where backward_splits_half says so");
    const SplitHalfBackwardKV split(p.fwd);
    run_backward<float, SplitHalfTileProducts>(
        p, tiles, [&] { return SplitHalfTileProducts(p, split, tiles.block_q, tiles.block_k); });
  } else {
    TORCH_CHECK(backward_reads_input_dtype(dtype, p.fwd.head_dim),
                "headops: the CPU backward reads 16-bit q/k/v only where backward_reads_input_dtype says so");
    const PackedBackwardKV<scalar_t> packed(p.fwd, runs_own_amx_tiles(dtype, p.fwd.head_dim));
    run_backward<float, PackedTileProducts<scalar_t>>(
        p, tiles, [&] { return PackedTileProducts<scalar_t>(p, packed, tiles.block_q, tiles.block_k); });
  }
}

}  // namespace

void attention_backward_isa(const BackwardParams& p, at::ScalarType input_dtype) {
#ifdef HEADOPS_BF16_ONLY
  TORCH_CHECK(input_dtype == at::kBFloat16, "headops: this kernel variant handles bfloat16 only");
  backward_typed<at::BFloat16>(p);
#else
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input_dtype, "headops attention backward",
                                  [&] { backward_typed<scalar_t>(p); });
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
