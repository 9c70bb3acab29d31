// The backward of one head's epilogue and alpha mixing: the rules the CPU and CUDA backward
// kernels share (as head_semantics.h is for the forward). Plain C++, no torch headers.
#pragma once

#include <cmath>

#include "attention_params.h"
#include "head_semantics.h"
#include "online_softmax.h"

namespace headops {
inline namespace HEADOPS_ISA_NAMESPACE {

// How a head takes part in the backward. The kernels keep a row buffer of do_scale * dL/do (the
// gradient of the mixed attention average); a branch X then sees dP_X = dp_weight_X * (that
// buffer . v) and contributes dp_weight_X * P_X to dv.
template <typename acc_t>
struct BackwardHead {
  HeadScalars<acc_t> hs;
  BranchPlan plan;                         // the branches with a non-zero weight
  acc_t weight_full, weight_streaming;     // alpha and 1 - alpha (0 and 1 without alpha)
  acc_t do_scale;                          // folded into the row buffer when one branch is walked
  acc_t dp_weight_full, dp_weight_streaming;
  bool skipped;    // the forward skipped the head (gate exactly 0): its gradients stay 0
  bool rows_zero;  // gate 0 and no dL/dlse: nothing reaches q, k or v

  HEADOPS_HD static BackwardHead read(const BackwardParams& p, int64_t b, int64_t h) {
    BackwardHead x;
    x.hs = read_head<acc_t>(p.fwd, b, h);
    x.plan = plan_branches(x.hs);
    x.weight_full = x.hs.has_alpha ? x.hs.alpha : acc_t(0);
    x.weight_streaming = x.hs.has_alpha ? acc_t(1) - x.hs.alpha : acc_t(1);
    const bool both = x.plan.full && x.plan.streaming;
    x.do_scale = both ? acc_t(1) : (x.plan.full ? x.weight_full : x.weight_streaming);
    x.dp_weight_full = both ? x.weight_full : acc_t(1);
    x.dp_weight_streaming = both ? x.weight_streaming : acc_t(1);
    x.skipped = p.skipped_zero_gate && x.hs.gate == acc_t(0);
    x.rows_zero = x.hs.gate == acc_t(0) && p.dlse == nullptr;
    return x;
  }

  HEADOPS_HD bool both_branches() const { return plan.full && plan.streaming; }

  // Which saved branch averages exist: the forward computed a branch whose weight is not 0, and
  // both when alpha's gradient was wanted.
  HEADOPS_HD bool reads_full(bool want_dalpha) const { return hs.has_alpha && (plan.full || want_dalpha); }
  HEADOPS_HD bool reads_streaming(bool want_dalpha) const { return plan.streaming || want_dalpha; }

  // A row's delta per branch, from the dot products of dL/do (the mixed average's gradient,
  // before do_scale) with each branch's saved average; dL/dlse joins the streaming branch's.
  // A gate of exactly 0 gives 0 whatever the saved averages hold (a NaN included): the dots are
  // not read then (the CPU passes 0 for them, the CUDA row pass whatever it summed).
  HEADOPS_HD void row_deltas(acc_t dot_full, acc_t dot_streaming, bool has_dlse, acc_t dlse, acc_t& delta_full,
                             acc_t& delta_streaming) const {
    delta_full = hs.gate != acc_t(0) && plan.full ? weight_full * dot_full : acc_t(0);
    delta_streaming = hs.gate != acc_t(0) && plan.streaming ? weight_streaming * dot_streaming : acc_t(0);
    if (has_dlse) delta_streaming -= dlse;
  }

  // A row's share of dL/dalpha (0 under a zero gate).
  HEADOPS_HD acc_t dalpha_share(acc_t dot_full, acc_t dot_streaming) const {
    return hs.gate != acc_t(0) ? dot_full - dot_streaming : acc_t(0);
  }

  // A row's share of dL/dsink_logit in one branch: the sink is a key with a zero value, so it is
  // -P_sink * delta, with P_sink = exp(sink_logit - lse) (0 for a row that saw nothing, 1 under
  // a +inf sink logit).
  template <typename Exp>
  HEADOPS_HD acc_t dsink_share(acc_t lse, acc_t delta, Exp exp_fn) const {
    return lse == -static_cast<acc_t>(INFINITY) ? acc_t(0) : -sink_probability(hs.sink_logit, lse, exp_fn) * delta;
  }
};

// What the gate multiplies, as d(gate) reads it: under a gate of exactly 0 the output is 0 whatever
// o * out_scale + out_bias holds (the reference zeroes a NaN or inf there), so a non-finite term
// adds 0 to d(gate) instead of NaN.
template <typename acc_t>
HEADOPS_HD acc_t gated_term(acc_t gate, acc_t term) {
  const bool finite = term == term && term != static_cast<acc_t>(INFINITY) && term != -static_cast<acc_t>(INFINITY);
  return gate == acc_t(0) && !finite ? acc_t(0) : term;
}

// One head's rows of what the row pass reads and writes: the epilogue's out_scale/out_bias and
// their gradients, dL/dlse, and the saved branch averages that exist. Every row pointer is null
// when its tensor is absent; the saved averages are [Sq, D] per head.
template <typename acc_t>
struct EpilogueRows {
  const acc_t* out_scale;
  const acc_t* out_bias;
  acc_t* dout_scale;
  acc_t* dout_bias;
  const acc_t* dlse;  // [Sq]
  const acc_t* o_full;
  const acc_t* o_streaming;
  int64_t head_dim;
  bool want_dalpha;
  bool need_mixed;  // dL/dgate or dL/dout_scale reads the mixed average itself

  HEADOPS_HD static EpilogueRows read(const BackwardParams& p, const BackwardHead<acc_t>& head, int64_t b, int64_t h) {
    const AttentionParams& f = p.fwd;
    const int64_t bh = b * f.heads_q + h, Sq = f.seqlen_q, D = f.head_dim;
    EpilogueRows x;
    x.out_scale = f.out_scale.present() ? f.out_scale.row<acc_t>(b, h) : nullptr;
    x.out_bias = f.out_bias.present() ? f.out_bias.row<acc_t>(b, h) : nullptr;
    x.dout_scale = p.dout_scale ? static_cast<acc_t*>(p.dout_scale) + bh * D : nullptr;
    x.dout_bias = p.dout_bias ? static_cast<acc_t*>(p.dout_bias) + bh * D : nullptr;
    x.dlse = p.dlse ? static_cast<const acc_t*>(p.dlse) + bh * Sq : nullptr;
    x.want_dalpha = p.dalpha != nullptr;
    x.o_full = head.reads_full(x.want_dalpha) ? static_cast<const acc_t*>(f.o_full) + bh * Sq * D : nullptr;
    x.o_streaming =
        head.reads_streaming(x.want_dalpha) ? static_cast<const acc_t*>(f.o_stream) + bh * Sq * D : nullptr;
    x.head_dim = D;
    x.need_mixed = p.dgate != nullptr || x.dout_scale != nullptr;
    return x;
  }

  HEADOPS_HD const acc_t* full_row(int64_t i) const { return o_full ? o_full + i * head_dim : nullptr; }
  HEADOPS_HD const acc_t* streaming_row(int64_t i) const {
    return o_streaming ? o_streaming + i * head_dim : nullptr;
  }
};

// Element d of the attention average the epilogue saw: alpha's mix where both branches were
// saved, else the one saved branch. At least one of the rows is not null.
template <typename acc_t>
HEADOPS_HD acc_t mixed_average(const HeadScalars<acc_t>& hs, const acc_t* full_row, const acc_t* streaming_row,
                               int64_t d) {
  if (full_row && streaming_row) return mix_alpha(hs.alpha, full_row[d], streaming_row[d]);
  return full_row ? full_row[d] : streaming_row[d];
}

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
