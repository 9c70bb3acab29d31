// Fused CPU attention forward with per-head behaviour (DESIGN section 1).
//
// Flash-style: each work item is one (batch, query head, query tile); it walks only the key
// blocks that some query of the tile can see (head_semantics.h), keeps an online softmax in
// float (double for float64) per branch, and finishes with the alpha mixing and the epilogue.
// Items are built into a list first: heads whose gate is exactly 0 never become items, and the
// list is handed to the threads heaviest first, so skipped work also frees the threads.
//
// Compiled once per instruction set (forward_<isa>.cpp define CPU_CAPABILITY and the target
// before including this file), so at::vec::Vectorized is real SIMD; attention_fwd_cpu.cpp
// picks the variant the running CPU supports.
#pragma once

#ifndef CPU_CAPABILITY
#error "include forward_kernel.h from a forward_<isa>.cpp that defines CPU_CAPABILITY"
#endif
#define HEADOPS_ISA_NAMESPACE CPU_CAPABILITY

#include "attention_fwd_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../head_semantics.h"
#include "../online_softmax.h"
#include "../work_counters.h"
#include "../../cpu/cache_line_vector.h"
#include "../../cpu/kept_workspace.h"
#include "../../cpu/row_ops.h"
#include "kernel_common.h"
#include "operands.h"
#include "row_probes.h"

namespace headops::cpu {
namespace CPU_CAPABILITY {
namespace {

struct WorkItem {
  int64_t b, h, q0, q1;
  VisibleKeys keys;  // what the item walks (tile_keys), computed once when the list is built
  int64_t cost;
};

template <typename acc_t, typename prob_t>
struct BranchState {
  CacheLineVector<acc_t> acc;
  std::vector<OnlineSoftmax<acc_t>> rows;
  CacheLineVector<prob_t> prob;  // probabilities of the current key block, in the P.V product's dtype

  BranchState(int64_t block_q, int64_t block_k, int64_t D) : acc(block_q * D), rows(block_q), prob(block_q * block_k) {}

  void reset(int64_t nq, int64_t D, const HeadScalars<acc_t>& hs) {
    std::fill(rows.begin(), rows.begin() + nq, OnlineSoftmax<acc_t>::start(hs.has_sink_logit, hs.sink_logit));
    std::fill(acc.begin(), acc.begin() + nq * D, acc_t(0));
  }
};

// A row's reference max may lag its true max by this much (in logits) before the row is
// rescaled: exp(20) keeps every sum far from float overflow while most blocks skip the
// rescale. Probabilities stored as float16 for the P.V product must stay below 65504: exp(10).
// (In the accumulation dtype: a double here made every row's test convert its max to double.)
template <typename prob_t, typename acc_t>
constexpr acc_t lazy_rescale_limit() {
  return std::is_same_v<prob_t, at::Half> ? acc_t(10) : acc_t(20);
}

template <typename scalar_t, typename Operands>
class ItemRunner {
  using acc_t = acc_type<scalar_t>;
  using prob_t = typename Operands::prob_t;
  using Branch = BranchState<acc_t, prob_t>;

 public:
  ItemRunner(const AttentionParams& p, int64_t block_q, int64_t block_k, Operands& ops)
      : p_(p), block_k_(block_k), ops_(ops), scores_(block_q * block_k), row_max_(block_q), row_keys_(block_q),
        out_row_(p.head_dim),
        full_(block_q, block_k, p.head_dim), streaming_(block_q, block_k, p.head_dim), probes_(p.probe, block_q) {}

  void run(const WorkItem& item, LocalWorkCounts& counts) {
    const int64_t b = item.b, h = item.h, q0 = item.q0, nq = item.q1 - item.q0, D = p_.head_dim;
    const HeadScalars<acc_t> hs = read_head<acc_t>(p_, b, h);
    const BranchPlan plan = plan_branches(hs);
    const HeadVisibility streaming_vis = streaming_visibility(p_.causal, hs);
    const HeadVisibility full_vis = full_visibility(p_.causal);
    const int64_t pos0 = q0 + p_.seqlen_k - p_.seqlen_q;
    const acc_t* bias = p_.key_bias.present() ? p_.key_bias.row<acc_t>(b, h) : nullptr;

    if (plan.full) full_.reset(nq, D, hs);
    if (plan.streaming) streaming_.reset(nq, D, hs);
    probes_.reset(nq);  // (a probe refuses alpha: its rows are the streaming branch's)
    batch_row_ = b;
    ops_.begin_item(b, h, q0, nq);
    counts.add(kWorkItems, 1);

    for (const KeyRange& range : {item.keys.sinks, item.keys.window}) {
      for (int64_t j0 = range.lo; j0 < range.hi; j0 += block_k_) {
        const int64_t nk = std::min(block_k_, range.hi - j0);
        plan_products(plan, full_vis, streaming_vis, pos0, nq, j0, nk);
        ops_.begin_block(j0, nk);
        for (const RowGroup& g : groups_) ops_.scores(scores_.data(), block_k_, g.r0, g.rows, j0, g.keys);
        counts.add(kKeyBlocks, 1);
        counts.add(kScoreElements, group_elements(groups_));
        const acc_t* block_bias = bias ? bias + j0 * p_.key_bias.stride_n : nullptr;
        const BlockLogits logits{hs.softmax_scale, block_bias, p_.key_bias.stride_n, j0, nk};
        if (plan.full && plan.streaming) {
          // both branches read the same logits: scale them once, in place
          for (int64_t r = 0; r < nq; ++r) scale_row_in_place(logits, r);
          update(full_, full_vis, pos0, nq, logits, true, counts);
          update(streaming_, streaming_vis, pos0, nq, logits, true, counts);
        } else {
          update(plan.full ? full_ : streaming_, plan.full ? full_vis : streaming_vis, pos0, nq, logits, false, counts);
        }
      }
    }
    finish(item, hs, plan);
  }

 private:
  // How the raw q.k products of the current block become logits.
  struct BlockLogits {
    acc_t scale;
    const acc_t* bias;  // at the block's first key, or nullptr
    int64_t bias_stride;
    int64_t j0, nk;
  };

  // The products of the block [j0, j0 + nk): one, or per group of rows on a block the diagonal
  // or a window's edge crosses (plan_row_groups, over the branches the head computes).
  void plan_products(const BranchPlan& plan, const HeadVisibility& full_vis, const HeadVisibility& streaming_vis,
                     int64_t pos0, int64_t nq, int64_t j0, int64_t nk) {
    const int64_t Sk = p_.seqlen_k;
    auto fully = [&](const HeadVisibility& vis) { return vis.block_fully_visible(pos0, pos0 + nq - 1, j0, j0 + nk); };
    const bool whole = j0 + nk <= Sk && (!plan.full || fully(full_vis)) && (!plan.streaming || fully(streaming_vis));
    plan_row_groups(groups_, row_keys_.data(), nq, nk, whole, [&](int64_t r) {
      const int64_t full = plan.full ? seen_in_block(full_vis, pos0 + r, Sk, j0, nk) : 0;
      return std::max(full, plan.streaming ? seen_in_block(streaming_vis, pos0 + r, Sk, j0, nk) : int64_t(0));
    });
  }

  // Scales (and biases) row r of the block's scores in place; returns the row max over its
  // real keys that its products computed (padding keys past Sk are left alone and never read).
  acc_t scale_row_in_place(const BlockLogits& lg, int64_t r) {
    const int64_t real_keys = std::max<int64_t>(0, std::min({lg.nk, p_.seqlen_k - lg.j0, row_keys_[r]}));
    row_max_[r] = scale_bias_max(scores_.data() + r * block_k_, real_keys, lg.scale, lg.bias, lg.bias_stride);
    return row_max_[r];
  }

  // Online-softmax update of one branch with the key block [j0, j0 + nk). `scaled`: the
  // scores already hold logits (and row_max_ their maxima).
  void update(Branch& st, const HeadVisibility& vis, int64_t pos0, int64_t nq, const BlockLogits& lg, bool scaled,
              LocalWorkCounts& counts) {
    const int64_t D = p_.head_dim, Sk = p_.seqlen_k, j0 = lg.j0, nk = lg.nk;
    const bool whole_block = j0 + nk <= Sk && vis.block_fully_visible(pos0, pos0 + nq - 1, j0, j0 + nk);
    // rows whose visible keys form one range take the one-pass path (scaled_exp_sum; it also
    // stores the logits in place where probes read them: probes refuse alpha, so no second
    // branch reads these scores after this one)
    const bool fusable = !scaled && (lg.bias == nullptr || lg.bias_stride == 1);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    bool any_row = false;
    for (int64_t r = 0; r < nq; ++r) {
      acc_t* s = scores_.data() + r * block_k_;
      prob_t* prob = st.prob.data() + r * block_k_;
      KeyRange parts[2];
      vis.visible_in_block(pos0 + r, Sk, j0, nk, whole_block, parts);
      if (parts[0].empty()) {
        fill_zero(prob, 0, nk);
        continue;
      }
      OnlineSoftmax<acc_t>& row = st.rows[r];
      bool logits_stored = false;  // the one-pass attempt left the part's logits in s (probes)
      acc_t stored_max = neg_inf;
      if (fusable && parts[1].empty()) {
        const KeyRange part = parts[0];
        const acc_t* bias = lg.bias ? lg.bias + part.lo : nullptr;
        acc_t ref_max = row.max;
        // a row's first block: nothing accumulated yet, so any reference max is exact (a NaN
        // logit shows up as a NaN sum below, and the row takes the exact path)
        if (ref_max == neg_inf) ref_max = scaled_max_ignoring_nan(s + part.lo, part.size(), lg.scale, bias);
        if (ref_max != neg_inf) {
          acc_t block_max, entropy_terms = 0;
          acc_t* logits_out = probes_.active() ? s + part.lo : nullptr;
          const acc_t sum = scaled_exp_sum(s + part.lo, prob + part.lo, part.size(), lg.scale, bias, ref_max,
                                           block_max, logits_out, probes_.wants_entropy() ? &entropy_terms : nullptr);
          logits_stored = logits_out != nullptr;
          stored_max = block_max;
          if (block_max <= ref_max + lazy_rescale_limit<prob_t, acc_t>()) {  // false for NaN: exact path
            fill_zero(prob, 0, part.lo);
            fill_zero(prob, part.hi, nk);
            // the reference stays (or, for a row that had nothing, starts at ref_max): no rescale
            // (and no NaN logit: block_max bounds every one of them)
            probes_.update(r, batch_row_, pos0 + r, s, prob, parts, j0, ref_max, ref_max, row.sum, acc_t(1),
                           entropy_terms, block_max);
            row.add_at_reference(ref_max, sum);
            any_row = true;
            continue;
          }
        }
      }
      // the exact path: logits of the whole row (or, after a one-pass attempt that stored them,
      // of its one visible part, whose max that attempt found)
      const acc_t row_max = scaled ? row_max_[r] : logits_stored ? stored_max : scale_row_in_place(lg, r);
      acc_t block_max = neg_inf;
      if (whole_block || logits_stored) {
        block_max = row_max;
      } else {
        for (const KeyRange& part : parts)
          if (!part.empty()) block_max = max_of(s, part.lo, part.hi, block_max);
      }
      const acc_t old_ref = row.reference(), old_sum = row.sum;
      const acc_t correction = row.rescale(block_max, StdExp{});
      if (row.max == neg_inf) {  // every visible logit is -inf (key_bias): the block adds nothing
        fill_zero(prob, 0, nk);
        continue;
      }
      int64_t cursor = 0;
      acc_t sum = 0, entropy_terms = 0;
      for (const KeyRange& part : parts) {
        if (part.empty()) continue;
        fill_zero(prob, cursor, part.lo);
        acc_t part_terms = 0;
        sum += exp_and_sum(s, prob, part.lo, part.hi, row.reference(),
                           probes_.wants_entropy() ? &part_terms : nullptr);
        entropy_terms += part_terms;
        cursor = part.hi;
      }
      fill_zero(prob, cursor, nk);
      row.add(sum, correction);
      if (correction != acc_t(1)) scale_row(st.acc.data() + r * D, D, correction);
      // (the block's max is not passed: here a NaN logit may be among the keys)
      probes_.update(r, batch_row_, pos0 + r, s, prob, parts, j0, row.reference(), old_ref, old_sum, correction,
                     entropy_terms, std::numeric_limits<acc_t>::quiet_NaN());
      any_row = true;
    }
    if (any_row) {
      for (const RowGroup& g : groups_)
        ops_.accumulate(st.acc.data(), g.r0, g.rows, st.prob.data(), block_k_, j0, g.keys);
      counts.add(kValueBlocks, 1);
    }
  }

  void finish(const WorkItem& item, const HeadScalars<acc_t>& hs, const BranchPlan& plan) {
    const int64_t b = item.b, h = item.h, D = p_.head_dim;
    const acc_t* os = p_.out_scale.present() ? p_.out_scale.row<acc_t>(b, h) : nullptr;
    const acc_t* ob = p_.out_bias.present() ? p_.out_bias.row<acc_t>(b, h) : nullptr;
    acc_t* lse = static_cast<acc_t*>(p_.lse) + (b * p_.heads_q + h) * p_.seqlen_q;
    for (int64_t r = 0; r < item.q1 - item.q0; ++r) {
      const int64_t i = item.q0 + r;
      const acc_t inv_full = plan.full ? full_.rows[r].inverse_sum() : acc_t(0);
      const acc_t inv_stream = plan.streaming ? streaming_.rows[r].inverse_sum() : acc_t(0);
      lse[i] = (plan.streaming ? streaming_ : full_).rows[r].lse(StdLog{});
      probes_.finish(r, b, h, i, p_.heads_q, p_.seqlen_q, streaming_.rows[r], hs);
      const acc_t* af = full_.acc.data() + r * D;
      const acc_t* as = streaming_.acc.data() + r * D;
      const int64_t saved_row = ((b * p_.heads_q + h) * p_.seqlen_q + i) * D;
      // what the backward reads; a branch not computed saves o = 0 and lse = -inf (never garbage)
      if (p_.o_stream) store_branch(static_cast<acc_t*>(p_.o_stream) + saved_row, plan.streaming ? as : nullptr, D, inv_stream);
      if (p_.o_full) {
        store_branch(static_cast<acc_t*>(p_.o_full) + saved_row, plan.full ? af : nullptr, D, inv_full);
        static_cast<acc_t*>(p_.lse_full)[(b * p_.heads_q + h) * p_.seqlen_q + i] =
            plan.full ? full_.rows[r].lse(StdLog{}) : negative_infinity<acc_t>();
      }
      acc_t* o = out_row_.data();
      using V = Vectorized<acc_t>;
      int64_t d = 0;
      if (plan.full && plan.streaming) {
        const V alpha(hs.alpha), vf(inv_full), vs(inv_stream);
        if (hs.alpha != acc_t(0) && hs.alpha != acc_t(1))
          for (; d + V::size() <= D; d += V::size())
            mix_alpha_interior(alpha, V::loadu(af + d) * vf, V::loadu(as + d) * vs).store(o + d);
        for (; d < D; ++d) o[d] = mix_alpha(hs.alpha, af[d] * inv_full, as[d] * inv_stream);
      } else {
        const acc_t* a = plan.full ? af : as;
        const acc_t inv = plan.full ? inv_full : inv_stream;
        for (; d + V::size() <= D; d += V::size()) (V::loadu(a + d) * V(inv)).store(o + d);
        for (; d < D; ++d) o[d] = a[d] * inv;
      }
      apply_epilogue(o, D, os, p_.out_scale.stride_n, ob, p_.out_bias.stride_n, hs.gate);
      convert_row(o, const_cast<scalar_t*>(p_.out.row<scalar_t>(b, i, h)), D);
    }
  }

  // dst = src * factor; zeros for a branch that was not computed (src nullptr)
  static void store_branch(acc_t* dst, const acc_t* src, int64_t D, acc_t factor) {
    if (src == nullptr) return fill_zero(dst, 0, D);
    using V = Vectorized<acc_t>;
    int64_t d = 0;
    for (; d + V::size() <= D; d += V::size()) (V::loadu(src + d) * V(factor)).store(dst + d);
    for (; d < D; ++d) dst[d] = src[d] * factor;
  }

  // o = gate * (o * out_scale + out_bias), vectorised where scale and bias are contiguous.
  static void apply_epilogue(acc_t* o, int64_t D, const acc_t* os, int64_t os_stride, const acc_t* ob,
                             int64_t ob_stride, acc_t gate) {
    using V = Vectorized<acc_t>;
    int64_t d = 0;
    if (gate != acc_t(0) && (os == nullptr || os_stride == 1) && (ob == nullptr || ob_stride == 1)) {
      for (; d + V::size() <= D; d += V::size()) {
        const V scale = os ? V::loadu(os + d) : V(acc_t(1));
        const V shift = ob ? V::loadu(ob + d) : V(acc_t(0));
        epilogue_ungated(V::loadu(o + d), scale, shift, V(gate)).store(o + d);
      }
    }
    for (; d < D; ++d)
      o[d] = epilogue(o[d], os ? os[d * os_stride] : acc_t(1), ob ? ob[d * ob_stride] : acc_t(0), gate);
  }

  const AttentionParams& p_;
  int64_t block_k_;
  Operands& ops_;
  CacheLineVector<acc_t> scores_;
  std::vector<acc_t> row_max_;  // max of each row of the current block (all its real keys)
  std::vector<RowGroup> groups_;  // the current block's products (plan_products)
  std::vector<int64_t> row_keys_;  // per row: the keys of the current block its products computed
  std::vector<acc_t> out_row_;  // one finished output row before conversion to the output dtype
  Branch full_, streaming_;
  RowProbes<acc_t> probes_;
  int64_t batch_row_ = 0;  // of the item being run
  std::vector<acc_t> key_mass_;  // [Sk]: one head's key mass while run_key_mass sums it
  std::vector<acc_t> mass_row_ = std::vector<acc_t>(block_k_);  // one row's probabilities of a block

 public:
  // A probe's key mass (DESIGN section 5): per key, the probability the query rows
  // [key_mass_r0, key_mass_r1) give it, from the lse the forward wrote. One call per (b, h), so
  // each row of the output has one writer; the tiles walk the keys the forward's items walked.
  void run_key_mass(int64_t b, int64_t h, int64_t block_q, int64_t alignment, int64_t padded_keys,
                    LocalWorkCounts& counts) {
    const ProbeParams& probe = *p_.probe;
    const int64_t Sk = p_.seqlen_k, shift = p_.seqlen_k - p_.seqlen_q;
    const HeadScalars<acc_t> hs = read_head<acc_t>(p_, b, h);
    const HeadVisibility vis = streaming_visibility(p_.causal, hs);
    const acc_t* bias = p_.key_bias.present() ? p_.key_bias.row<acc_t>(b, h) : nullptr;
    const acc_t* lse = static_cast<const acc_t*>(p_.lse) + (b * p_.heads_q + h) * p_.seqlen_q;
    key_mass_.assign(Sk, acc_t(0));
    for (int64_t q0 = probe.key_mass_r0; q0 < probe.key_mass_r1; q0 += block_q) {
      const int64_t q1 = std::min(probe.key_mass_r1, q0 + block_q), nq = q1 - q0;
      const VisibleKeys keys = tile_keys(p_, hs, q0, q1, alignment, padded_keys);
      ops_.begin_item(b, h, q0, nq);
      for (const KeyRange& range : {keys.sinks, keys.window}) {
        for (int64_t j0 = range.lo; j0 < range.hi; j0 += block_k_) {
          const int64_t nk = std::min(block_k_, range.hi - j0);
          // whole blocks: row_keys_ tells scale_row_in_place that every key was computed
          plan_row_groups(groups_, row_keys_.data(), nq, nk, true, [](int64_t) { return int64_t(0); });
          ops_.begin_block(j0, nk);
          ops_.scores(scores_.data(), block_k_, 0, nq, j0, nk);
          counts.add(kKeyBlocks, 1);
          counts.add(kScoreElements, nq * nk);
          const BlockLogits logits{hs.softmax_scale, bias ? bias + j0 * p_.key_bias.stride_n : nullptr,
                                   p_.key_bias.stride_n, j0, nk};
          for (int64_t r = 0; r < nq; ++r) {
            if (lse[q0 + r] == negative_infinity<acc_t>()) continue;  // the row saw nothing
            scale_row_in_place(logits, r);
            const acc_t* x = scores_.data() + r * block_k_;
            KeyRange parts[2];
            vis.visible_in_block(shift + q0 + r, Sk, j0, nk, false, parts);
            for (const KeyRange& part : parts) {
              if (part.empty()) continue;
              exp_and_sum(x, mass_row_.data(), part.lo, part.hi, lse[q0 + r]);
              add_into(key_mass_.data() + j0 + part.lo, mass_row_.data() + part.lo, part.size());
            }
          }
        }
      }
    }
    float* out = probe.key_mass_out + (b * p_.heads_q + h) * Sk;
    for (int64_t j = 0; j < Sk; ++j) out[j] = static_cast<float>(key_mass_[j]);
  }
};

// What a head gated off (never computed) reports: masses 0, indices -1, entropy 0.
inline void write_skipped_probes(const ProbeParams& probe, int64_t head, int64_t Sq, int64_t Sk) {
  const int64_t rows = head * Sq;
  if (probe.span_mass) std::fill_n(probe.span_mass + rows * probe.n_spans, Sq * probe.n_spans, 0.f);
  if (probe.distance_mass) std::fill_n(probe.distance_mass + rows * probe.n_distances, Sq * probe.n_distances, 0.f);
  if (probe.sink_mass_out) std::fill_n(probe.sink_mass_out + rows, Sq, 0.f);
  if (probe.entropy_out) std::fill_n(probe.entropy_out + rows, Sq, 0.f);
  if (probe.topk_index) std::fill_n(probe.topk_index + rows * probe.topk, Sq * probe.topk, int64_t(-1));
  if (probe.topk_prob) std::fill_n(probe.topk_prob + rows * probe.topk, Sq * probe.topk, 0.f);
  if (probe.key_mass_out) std::fill_n(probe.key_mass_out + head * Sk, Sk, 0.f);
}

// Heads gated off exactly: output 0, lse -inf, and the saved branches (when kept) 0 and -inf.
template <typename scalar_t>
void write_skipped_head(const AttentionParams& p, int64_t b, int64_t h) {
  using acc_t = acc_type<scalar_t>;
  const int64_t head_row = (b * p.heads_q + h) * p.seqlen_q, D = p.head_dim;
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    static_cast<acc_t*>(p.lse)[head_row + i] = negative_infinity<acc_t>();
    scalar_t* out = const_cast<scalar_t*>(p.out.row<scalar_t>(b, i, h));
    std::fill(out, out + D, scalar_t(0));
    if (p.o_stream) fill_zero(static_cast<acc_t*>(p.o_stream) + (head_row + i) * D, 0, D);
    if (p.o_full) {
      fill_zero(static_cast<acc_t*>(p.o_full) + (head_row + i) * D, 0, D);
      static_cast<acc_t*>(p.lse_full)[head_row + i] = negative_infinity<acc_t>();
    }
  }
  if (p.probe) write_skipped_probes(*p.probe, b * p.heads_q + h, p.seqlen_q, p.seqlen_k);
}

template <typename scalar_t>
std::vector<WorkItem> build_work_list(const AttentionParams& p, int64_t block_q, int64_t alignment,
                                      int64_t padded_keys, std::vector<std::pair<int64_t, int64_t>>& skipped) {
  using acc_t = acc_type<scalar_t>;
  std::vector<WorkItem> items;
  items.reserve(p.batch * p.heads_q * ((p.seqlen_q + block_q - 1) / block_q));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const HeadScalars<acc_t> hs = read_head<acc_t>(p, b, h);
      if (p.skip_zero_gate && hs.gate == acc_t(0)) {
        skipped.emplace_back(b, h);
        continue;
      }
      const int64_t rows = head_query_tile(hs, block_q);
      for (int64_t q0 = 0; q0 < p.seqlen_q; q0 += rows) {
        const int64_t q1 = std::min(p.seqlen_q, q0 + rows);
        const VisibleKeys keys = tile_keys(p, hs, q0, q1, alignment, padded_keys);
        const int64_t branches = hs.has_alpha ? 2 : 1;
        items.push_back({b, h, q0, q1, keys, (q1 - q0) * (keys.count() * branches + 1)});
      }
    }
  }
  // heaviest first, so that the last items handed out are short (longest-processing-time order)
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });
  return items;
}

// Runs job(runner, i, counts) for i in [0, n) on run_dynamic's threads, each with its own
// operands and ItemRunner.
template <typename scalar_t, typename Operands, typename MakeOperands, typename Job>
void run_jobs(const AttentionParams& p, int64_t n, int64_t block_q, int64_t block_k, MakeOperands& make_operands,
              const Job& job) {
  struct Worker {
    Operands ops;
    ItemRunner<scalar_t, Operands> runner;
    LocalWorkCounts counts;
    const Job& job;
    Worker(Operands o, const AttentionParams& p, int64_t bq, int64_t bk, const Job& j)
        : ops(std::move(o)), runner(p, bq, bk, ops), job(j) {}
    void run(int64_t i) { job(runner, i, counts); }
    void finish() {
      counts.publish();
      ops.end_worker();
    }
  };
  run_dynamic(n, [&] { return Worker(make_operands(), p, block_q, block_k, job); });
}

// The forward's items; then, for a probe with key mass, its second pass, one (b, h) at a time.
template <typename scalar_t, typename Operands, typename MakeOperands>
void run_items(const AttentionParams& p, const std::vector<WorkItem>& items, int64_t block_q, int64_t block_k,
               int64_t alignment, int64_t padded_keys, MakeOperands make_operands) {
  using Runner = ItemRunner<scalar_t, Operands>;
  run_jobs<scalar_t, Operands>(p, static_cast<int64_t>(items.size()), block_q, block_k, make_operands,
                               [&](Runner& runner, int64_t i, LocalWorkCounts& counts) { runner.run(items[i], counts); });
  if (p.probe == nullptr || !p.probe->key_mass) return;
  std::vector<int64_t> heads;  // b * Hq + h of the heads computed (the skipped ones are written already)
  for (const WorkItem& item : items)
    if (item.q0 == 0) heads.push_back(item.b * p.heads_q + item.h);
  std::sort(heads.begin(), heads.end());
  run_jobs<scalar_t, Operands>(p, static_cast<int64_t>(heads.size()), block_q, block_k, make_operands,
                               [&](Runner& runner, int64_t i, LocalWorkCounts& counts) {
                                 runner.run_key_mass(heads[i] / p.heads_q, heads[i] % p.heads_q, block_q, alignment,
                                                     padded_keys, counts);
                               });
}

template <typename scalar_t>
void write_skipped(const AttentionParams& p, const std::vector<std::pair<int64_t, int64_t>>& skipped) {
  at::parallel_for(0, static_cast<int64_t>(skipped.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) write_skipped_head<scalar_t>(p, skipped[i].first, skipped[i].second);
  });
  LocalWorkCounts counts;
  counts.add(kHeadsSkipped, static_cast<int64_t>(skipped.size()));
  counts.publish();
}

// Packs, in parallel, the 64-key blocks of K and V that some item will read.
template <typename KV>
void pack_needed_blocks(const AttentionParams& p, const std::vector<WorkItem>& items, const KV& kv) {
  const int64_t per_head = kv.padded_keys / KV::kPackBlock;
  std::vector<uint8_t> needed(p.batch * p.heads_kv * per_head, 0);
  for (const WorkItem& it : items) {
    const VisibleKeys& keys = it.keys;
    uint8_t* flags = needed.data() + (it.b * p.heads_kv + it.h / p.group()) * per_head;
    for (const KeyRange& r : {keys.sinks, keys.window})
      if (!r.empty())
        std::fill(flags + r.lo / KV::kPackBlock, flags + (r.hi - 1) / KV::kPackBlock + 1, uint8_t(1));
  }
  // one block of every kv head in a row (as PackedBackwardKV): bshd keeps a key's heads side by
  // side, so consecutive blocks read neighbouring memory rather than one head's rows a page apart
  std::vector<int64_t> blocks;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t blk = 0; blk < per_head; ++blk)
      for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
        const int64_t i = (b * p.heads_kv + kvh) * per_head + blk;
        if (needed[i]) blocks.push_back(i);
      }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t flat = blocks[i], blk = flat % per_head, bk = flat / per_head;
      kv.pack_block(p, bk / p.heads_kv, bk % p.heads_kv, blk);
    }
  });
}

// K and V packed once per call (only the blocks some item reads), then brgemm tiles.
template <typename scalar_t>
void forward_packed(const AttentionParams& p, int64_t bq, int64_t bk) {
  std::vector<std::pair<int64_t, int64_t>> skipped;
  PackedKV<scalar_t> kv;
  kv.head_dim = p.head_dim;
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  kv.amx_tile_major = runs_own_amx_tiles(dtype, p.head_dim);
  kv.pairs = brgemm_pairs(dtype);
  TORCH_CHECK(kv.pairs == 1 || (kv.pairs == 2 && sizeof(scalar_t) == 2),
              "headops: the packed forward needs a brgemm layout for its dtype (brgemm_pairs)");
  const int64_t align = packed_key_alignment(kv.amx_tile_major, kv.pairs);
  kv.padded_keys = PackedKV<scalar_t>::padded_keys_of(p);
  auto items = build_work_list<scalar_t>(p, bq, align, kv.padded_keys, skipped);
  write_skipped<scalar_t>(p, skipped);
  if (items.empty()) return;
  // only the blocks some item reads are ever written; the rest of the buffer stays untouched
  const int64_t elems = 2 * p.batch * p.heads_kv * kv.head_elems();
  at::Tensor fresh;
  kv.keys_t = packing_workspace<scalar_t>(elems, fresh);
  kv.values = kv.keys_t + p.batch * p.heads_kv * kv.head_elems();
  pack_needed_blocks(p, items, kv);
  if constexpr (sizeof(scalar_t) == 2) {
    if (p.precise_probabilities)
      return run_items<scalar_t, SplitProbabilityOperands<scalar_t>>(
          p, items, bq, bk, align, kv.padded_keys, [&] { return SplitProbabilityOperands<scalar_t>(p, kv, bq, bk); });
  }
  run_items<scalar_t, PackedOperands<scalar_t>>(p, items, bq, bk, align, kv.padded_keys,
                                                [&] { return PackedOperands<scalar_t>(p, kv); });
}

// Whether every query row some item reads is finite (SplitHalfOperands' condition).
inline bool queries_all_finite(const AttentionParams& p, const std::vector<WorkItem>& items) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end && finite.load(std::memory_order_relaxed); ++i)
      for (int64_t r = items[i].q0; r < items[i].q1; ++r)
        if (!all_finite_half(p.q.row<at::Half>(items[i].b, r, items[i].h), p.head_dim)) {
          finite.store(false, std::memory_order_relaxed);
          break;
        }
  });
  return finite.load();
}

// float16 as two bfloat16 parts on AMX (SplitHalfOperands); false, having written nothing, when
// q, k or v holds inf or NaN where an item reads it (the caller then takes another path).
inline bool forward_split_half(const AttentionParams& p, int64_t bq, int64_t bk) {
  std::vector<std::pair<int64_t, int64_t>> skipped;
  const int64_t align = packed_key_alignment(true, 2);
  auto items = build_work_list<at::Half>(p, bq, align, PackedKV<at::BFloat16>::padded_keys_of(p), skipped);
  if (items.empty()) {
    write_skipped<at::Half>(p, skipped);
    return true;
  }
  if (!queries_all_finite(p, items)) return false;
  SplitHalfKV kv(p);
  pack_needed_blocks(p, items, kv);
  if (!kv.all_finite.load()) return false;
  write_skipped<at::Half>(p, skipped);
  run_items<at::Half, SplitHalfOperands>(p, items, bq, bk, align, kv.padded_keys,
                                        [&] { return SplitHalfOperands(p, kv, bq, bk); });
  return true;
}

// float16 through float tiles (WidenedHalfOperands) on K and V widened and packed once per call.
inline void forward_widened_half(const AttentionParams& p, int64_t bq, int64_t bk) {
  std::vector<std::pair<int64_t, int64_t>> skipped;
  WidenedHalfKV kv(p);
  const int64_t align = packed_key_alignment(false, 1);
  auto items = build_work_list<at::Half>(p, bq, align, kv.padded_keys, skipped);
  write_skipped<at::Half>(p, skipped);
  if (items.empty()) return;
  pack_needed_blocks(p, items, kv);
  run_items<at::Half, WidenedHalfOperands>(p, items, bq, bk, align, kv.padded_keys,
                                           [&] { return WidenedHalfOperands(p, kv); });
}

template <typename scalar_t>
void forward_typed(const AttentionParams& p) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  // The saved averages feed per-head gradients that sum terms which cancel (softmax_scale,
  // alpha, sink_logit, key_bias). float16 saved for its backward keeps P in float (converted tiles, BLAS's
  // tile shape): that backward runs in float32, and those sums took 2.5e-4 of their size from the
  // packed path's float16 P where float P gives 1.4e-5 (test_autograd). bfloat16 P rounded took
  // up to 5e-2 (S = 333, D = 128): a bfloat16 call that learns one of them asks for
  // precise_probabilities (headops.attention), which the packed path meets with P in two parts
  // (SplitProbabilityOperands) and the converted path with float P. Otherwise P is rounded as
  // SDPA rounds it.
  const bool float16_float_probs =
      std::is_same_v<scalar_t, at::Half> && (p.saves_for_backward() || p.precise_probabilities);
  // float16 in two bfloat16 parts reads P to ~2**-17 and drops S's lo * lo terms, which those
  // sums feel through the saved averages (30 draws, S = 333 and 600, D = 128 and 64, all
  // features: softmax_scale up to 1.4e-3 of its size and alpha 1.2e-4, where float P gives
  // 1.2e-4 and 6e-6), so a call that learns them (precise_probabilities) keeps float P
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    if (!p.precise_probabilities && call_splits_half_into_bf16_tiles(p.head_dim, p.seqlen_q * p.group())) {
      const TileShape split = fit_to_call(tile_shape(dtype, p.head_dim), p.seqlen_q, p.seqlen_k, p.causal);
      if (forward_split_half(p, split.block_q, split.block_k)) return;
    }
    // P in float, as a call saved for its backward or keeping precise probabilities needs
    if (call_widens_half_to_float_tiles(p.head_dim, p.seqlen_q * p.group())) {
      const TileShape widened = fit_to_call(tile_shape(dtype, p.head_dim), p.seqlen_q, p.seqlen_k, p.causal);
      return forward_widened_half(p, widened.block_q, widened.block_k);
    }
  }
  const TileShape tiles = fit_to_call(float16_float_probs ? blas_tile_shape() : tile_shape(dtype, p.head_dim),
                                      p.seqlen_q, p.seqlen_k, p.causal);
  const int64_t bq = tiles.block_q, bk = tiles.block_k;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (!float16_float_probs && call_uses_packed_operands(dtype, p.head_dim, p.seqlen_q * p.group(), false))
      return forward_packed<scalar_t>(p, bq, bk);
  }
  std::vector<std::pair<int64_t, int64_t>> skipped;
  auto items = build_work_list<scalar_t>(p, bq, 1, p.seqlen_k, skipped);
  write_skipped<scalar_t>(p, skipped);
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    run_items<scalar_t, BlasOperands<scalar_t>>(p, items, bq, bk, 1, p.seqlen_k,
                                                [&] { return BlasOperands<scalar_t>(p); });
  } else {
    run_items<scalar_t, ConvertedOperands<scalar_t>>(p, items, bq, bk, 1, p.seqlen_k,
                                                     [&] { return ConvertedOperands<scalar_t>(p, bq, bk); });
  }
}

}  // namespace

void attention_forward_isa(const AttentionParams& p, at::ScalarType dtype) {
#ifdef HEADOPS_BF16_ONLY
  TORCH_CHECK(dtype == at::kBFloat16, "headops: this kernel variant handles bfloat16 only");
  return forward_typed<at::BFloat16>(p);
#else
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "headops attention forward",
                                  [&] { forward_typed<scalar_t>(p); });
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
