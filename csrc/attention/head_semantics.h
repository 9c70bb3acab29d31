// One source of truth for what a head sees and how its output is finished.
//
// Included by the CPU kernels and by the CUDA kernels, so every CPU test exercises the
// same visibility, alpha-mixing and epilogue code that runs on the GPU.
// Plain C++ (no torch headers) so that .cu files stay fast to compile.
#pragma once

#include <cstdint>

#include "attention_params.h"

#if defined(__CUDACC__)
#define HEADOPS_HD __host__ __device__ __forceinline__
#else
#define HEADOPS_HD inline
#endif

// CPU kernels are compiled once per instruction set; each copy of these inline functions
// lives in its own namespace so the linker never merges an AVX-512 copy into portable code.
#ifndef HEADOPS_ISA_NAMESPACE
#define HEADOPS_ISA_NAMESPACE portable
#endif

namespace headops {
inline namespace HEADOPS_ISA_NAMESPACE {

HEADOPS_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
HEADOPS_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Half-open key range [lo, hi); empty when hi <= lo.
struct KeyRange {
  int64_t lo;
  int64_t hi;
  HEADOPS_HD bool empty() const { return hi <= lo; }
  HEADOPS_HD int64_t size() const { return hi > lo ? hi - lo : 0; }
  HEADOPS_HD KeyRange clip(int64_t a, int64_t b) const { return {max64(lo, a), min64(hi, b)}; }
};

// The keys a head lets a query (or a run of consecutive queries) see: at most two disjoint
// ranges, the attention sinks [0, s) and the window, with sinks.hi < window.lo whenever
// both are non-empty. Either may be empty.
struct VisibleKeys {
  KeyRange sinks;
  KeyRange window;
  HEADOPS_HD int64_t count() const { return sinks.size() + window.size(); }
};

// Per-head visibility rule (DESIGN section 1):
//   visible(i, j) = causal_ok and (in_window or j < sinks)
//   causal_ok     = !causal or j <= pos_i
//   in_window     = window < 0 or (causal ? pos_i - j : |pos_i - j|) < window
// with bottom-right aligned positions pos_i = Sk - Sq + i.
struct HeadVisibility {
  bool causal;
  int64_t window;  // < 0: unlimited; never 0 (rejected at the API)
  int64_t sinks;   // >= 0

  HEADOPS_HD static int64_t query_position(int64_t i, int64_t Sq, int64_t Sk) { return Sk - Sq + i; }

  HEADOPS_HD bool visible(int64_t pos, int64_t j) const {
    if (causal && j > pos) return false;
    if (j < sinks) return true;
    if (window < 0) return true;
    int64_t d = pos - j;
    if (!causal && d < 0) d = -d;
    return d < window;
  }

  // Keys visible to every query whose position lies in [pos_first, pos_last]: the union of
  // their sets. Window edges move monotonically with the position and consecutive windows
  // overlap or touch, so the union of the windows is one range.
  HEADOPS_HD VisibleKeys keys_for_positions(int64_t pos_first, int64_t pos_last, int64_t Sk) const {
    int64_t causal_end = causal ? min64(pos_last + 1, Sk) : Sk;  // keys [0, causal_end) pass causality
    // a window wider than any query-key distance is unlimited (and must not overflow below);
    // compared as window - far > Sk: Sk + far overflows int64 at positions past 2^62
    const int64_t far = max64(pos_first < 0 ? -pos_first : pos_first, pos_last < 0 ? -pos_last : pos_last);
    const int64_t window = this->window >= 0 && this->window - far > Sk ? -1 : this->window;
    KeyRange win;
    if (window < 0) {
      win = {0, causal_end};
    } else {
      win.lo = max64(int64_t(0), pos_first - window + 1);
      win.hi = causal ? causal_end : (window > Sk - pos_last ? Sk : pos_last + window);
    }
    KeyRange snk = {0, min64(sinks, causal_end)};
    if (win.empty()) win = {0, 0};
    if (snk.empty()) return {{0, 0}, win};
    if (win.empty() || snk.hi >= win.lo) {
      // sinks touch or overlap the window: one range
      int64_t hi = win.empty() ? snk.hi : max64(snk.hi, win.hi);
      return {{0, 0}, {0, hi}};
    }
    return {snk, win};
  }

  HEADOPS_HD VisibleKeys keys_for_query(int64_t pos, int64_t Sk) const {
    return keys_for_positions(pos, pos, Sk);
  }

  // The inverse of visible(): the queries (indices i in [0, Sq), positions Sk - Sq + i) that see
  // key j, as one range [lo, hi) (empty when hi <= lo). Causality bounds the positions below by
  // j; a sink key is seen by every query that passes causality; otherwise a window bounds them
  // on both sides (only above under causality). The backward's key-side pass walks it.
  HEADOPS_HD KeyRange queries_for_key(int64_t j, int64_t Sq, int64_t Sk) const {
    const int64_t shift = Sk - Sq;  // position of query 0
    int64_t pos_lo = causal ? max64(j, shift) : shift;
    int64_t pos_hi = Sk;  // exclusive: the last query sits at Sk - 1
    // every query-key distance is below Sk + Sq: a wider window is unlimited (j + window below
    // cannot overflow then)
    const bool limited = window >= 0 && j >= sinks && window - Sq <= Sk;
    if (limited) {
      pos_hi = min64(pos_hi, j + window);
      if (!causal) pos_lo = max64(pos_lo, j - window + 1);
    }
    return {max64(pos_lo - shift, int64_t(0)), min64(pos_hi - shift, Sq)};
  }

  // The keys of block [j0, j0 + nk) that the query at position `pos` sees, relative to j0, as up
  // to two ranges, the first non-empty one first. `whole_block`: the caller knows every key of
  // the block is visible to every query of its tile.
  HEADOPS_HD void visible_in_block(int64_t pos, int64_t Sk, int64_t j0, int64_t nk, bool whole_block,
                                   KeyRange (&parts)[2]) const {
    if (whole_block) {
      parts[0] = {0, nk};
      parts[1] = {0, 0};
      return;
    }
    const VisibleKeys vk = keys_for_query(pos, Sk);
    parts[0] = vk.sinks.clip(j0, j0 + nk);
    parts[1] = vk.window.clip(j0, j0 + nk);
    for (KeyRange& part : parts) part = part.empty() ? KeyRange{0, 0} : KeyRange{part.lo - j0, part.hi - j0};
    if (parts[0].empty()) {
      parts[0] = parts[1];
      parts[1] = {0, 0};
    }
  }

  // True when every query in [pos_first, pos_last] sees every key in [j0, j1): no masking needed.
  HEADOPS_HD bool block_fully_visible(int64_t pos_first, int64_t pos_last, int64_t j0, int64_t j1) const {
    if (j1 <= j0) return true;
    if (causal && j1 - 1 > pos_first) return false;
    if (j1 <= sinks) return true;
    if (window < 0) return true;
    // causal: the last query is the farthest from j0; non-causal: also the first query from j1 - 1
    if (pos_last - j0 >= window) return false;
    if (!causal && (j1 - 1) - pos_first >= window) return false;
    return true;
  }
};

// The full branch of a DuoAttention head ignores window and sinks.
HEADOPS_HD HeadVisibility full_visibility(bool causal) { return {causal, -1, 0}; }

// Per-head scalars a kernel reads once per work item.
template <typename acc_t>
struct HeadScalars {
  acc_t softmax_scale;
  int64_t window;
  int64_t sinks;
  bool has_alpha;
  acc_t alpha;
  bool has_sink_logit;
  acc_t sink_logit;
  acc_t gate;
  // false when alpha's gradient is wanted: both branches are then needed even at alpha 0 or 1
  bool skip_unused_branch;
};

// Which online-softmax branches a head needs. Without alpha the head has one branch, the
// one that applies window and sinks ("streaming", plain causal when it has neither).
struct BranchPlan {
  bool full;
  bool streaming;
};

template <typename acc_t>
HEADOPS_HD BranchPlan plan_branches(const HeadScalars<acc_t>& h) {
  if (!h.has_alpha) return {false, true};
  if (!h.skip_unused_branch) return {true, true};
  // alpha exactly 1 or 0 makes the other branch's weight zero: do not compute it
  return {h.alpha != acc_t(0), h.alpha != acc_t(1)};
}

// The streaming branch applies the head's window and sinks (without alpha it is the head's
// only branch); the full branch (full_visibility) ignores them.
template <typename acc_t>
HEADOPS_HD HeadVisibility streaming_visibility(bool causal, const HeadScalars<acc_t>& hs) {
  return {causal, hs.window, hs.sinks};
}

// What a head's key walk follows: the full branch when the head computes it (alpha; the
// streaming branch's keys are a subset), else the streaming branch.
template <typename acc_t>
HEADOPS_HD HeadVisibility walk_visibility(bool causal, const HeadScalars<acc_t>& hs) {
  return plan_branches(hs).full ? full_visibility(causal) : streaming_visibility(causal, hs);
}

// The keys a tile of queries [q0, q1) walks, CPU and CUDA alike: the sinks range, then the window
// range (or the one causal range of the full branch).
template <typename acc_t>
HEADOPS_HD VisibleKeys tile_walk(const AttentionParams& p, const HeadScalars<acc_t>& hs, int64_t q0, int64_t q1) {
  const int64_t shift = p.seqlen_k - p.seqlen_q;
  return walk_visibility(p.causal, hs).keys_for_positions(q0 + shift, q1 - 1 + shift, p.seqlen_k);
}

// out = alpha * full + (1 - alpha) * streaming
template <typename acc_t>
HEADOPS_HD acc_t mix_alpha(acc_t alpha, acc_t full, acc_t streaming) {
  // a branch whose weight is exactly 0 is not part of the head (it is computed only for alpha's
  // gradient): its NaN/inf, from inputs only it sees, must not reach the output as 0 * NaN
  if (alpha == acc_t(1)) return full;
  if (alpha == acc_t(0)) return streaming;
  return alpha * full + (acc_t(1) - alpha) * streaming;
}
// the same for vectors of one row under a scalar alpha strictly between 0 and 1
template <typename vec_t>
inline vec_t mix_alpha_interior(vec_t alpha, vec_t full, vec_t streaming) {
  return alpha * full + (vec_t(1) - alpha) * streaming;
}

// out_h = gate_h * (o_h * out_scale_h + out_bias_h); scale/bias default to 1 and 0.
template <typename acc_t>
HEADOPS_HD acc_t epilogue_ungated(acc_t o, acc_t out_scale, acc_t out_bias, acc_t gate) {
  return gate * (o * out_scale + out_bias);
}
// A gate of exactly 0 masks the head: its output is 0 whatever o is (NaN or inf from its inputs
// included), the same whether the head was skipped or computed (a gate that requires grad).
template <typename acc_t>
HEADOPS_HD acc_t epilogue(acc_t o, acc_t out_scale, acc_t out_bias, acc_t gate) {
  return gate == acc_t(0) ? acc_t(0) : epilogue_ungated(o, out_scale, out_bias, gate);
}

// A head's scalars as a kernel reads them once per work item (CPU and CUDA alike): absent
// per-head arguments take their defaults (scale 1/sqrt(D) or the float given, unlimited
// window, no sinks, no alpha, no sink logit, gate 1).
template <typename acc_t>
HEADOPS_HD HeadScalars<acc_t> read_head(const AttentionParams& p, int64_t b, int64_t h) {
  HeadScalars<acc_t> s;
  s.softmax_scale = p.softmax_scale.present() ? p.softmax_scale.at<acc_t>(b, h) : acc_t(p.default_softmax_scale);
  s.window = p.window.present() ? p.window.at<int64_t>(b, h) : -1;
  s.sinks = p.sinks.present() ? p.sinks.at<int64_t>(b, h) : 0;
  s.has_alpha = p.alpha.present();
  s.alpha = s.has_alpha ? p.alpha.at<acc_t>(b, h) : acc_t(0);
  s.has_sink_logit = p.sink_logit.present();
  s.sink_logit = s.has_sink_logit ? p.sink_logit.at<acc_t>(b, h) : acc_t(0);
  s.gate = p.gate.present() ? p.gate.at<acc_t>(b, h) : acc_t(1);
  s.skip_unused_branch = p.skip_unused_branch;
  return s;
}

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
