// What the decode kernels (CPU and CUDA) walk for one (batch row, KV head): the union of the
// keys its active query heads see. Plain C++ (__host__ __device__), one home for both.
#pragma once

#include <cstdint>

#include "../attention/attention_params.h"
#include "../attention/head_semantics.h"

namespace headops {
inline namespace HEADOPS_ISA_NAMESPACE {

// `any`: some query head of the group is active (gate != 0) and the row holds tokens; `keys`:
// the union of what the active heads' new queries (positions length - Sq .. length - 1) see,
// the sinks range then the window range (one range when they touch).
struct GroupKeys {
  bool any;
  VisibleKeys keys;
};

template <typename acc_t>
HEADOPS_HD GroupKeys group_keys(const AttentionParams& a, int64_t b, int64_t kvh, int64_t length) {
  const int64_t G = a.group(), Sq = a.seqlen_q;
  KeyRange sinks{0, 0}, window{0, 0};
  bool any = false;
  for (int64_t g = 0; g < G; ++g) {
    const HeadScalars<acc_t> hs = read_head<acc_t>(a, b, kvh * G + g);
    if (hs.gate == acc_t(0)) continue;
    const VisibleKeys keys = walk_visibility(a.causal, hs).keys_for_positions(length - Sq, length - 1, length);
    if (!keys.sinks.empty()) sinks.hi = max64(sinks.hi, keys.sinks.hi);
    if (!keys.window.empty())
      window = window.empty() ? keys.window : KeyRange{min64(window.lo, keys.window.lo), max64(window.hi, keys.window.hi)};
    any = true;
  }
  if (!any || length <= 0) return {false, {{0, 0}, {0, 0}}};
  if (!sinks.empty() && !window.empty() && sinks.hi >= window.lo) {
    window = {0, max64(sinks.hi, window.hi)};
    sinks = {0, 0};
  }
  return {true, {sinks, window}};
}

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
