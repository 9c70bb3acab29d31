// Where a head-sparse KV cache keeps each KV head's tokens, and which original position a
// storage slot holds. Plain C++ (__host__ __device__), shared by the CPU and CUDA kernels and
// mirrored by python/headops/cache.py.
//
// Per layer there are two packed storages:
//   full:      [B, Hf, capacity, D]  a full KV head keeps token p at slot p (p < length[b]);
//   streaming: [B, slots, D]         streaming KV head s owns slots [offset_s, offset_s + sinks_s
//                                    + ring_s): the first sinks_s tokens at slots 0..sinks_s-1, then
//                                    a ring of ring_s slots holding the most recent tokens;
//                                    a budget KV head owns `size` slots of the same storage, whose
//                                    positions are explicit ([B, slots] int64, -1 = empty) and
//                                    whose accumulated attention mass ([B, slots] float) decides
//                                    which token is evicted when a new one arrives.
#pragma once

#include <cstdint>

#include "../attention/head_semantics.h"

namespace headops {
inline namespace HEADOPS_ISA_NAMESPACE {

enum KvKind : int64_t { kKvFull = 0, kKvStreaming = 1, kKvBudget = 2 };

// One budget KV head's layout in one batch row: `size` slots from `offset`; the first `sinks`
// positions and the `recent` most recent ones are never evicted. Entry of the budget table
// [B, Hb, 4]: [offset, size, sinks, recent] (rows may share their slots differently: AdaKV).
struct BudgetLayout {
  int64_t offset, size, sinks, recent;
};

// Row b's layout of budget head i in a [B, budget_heads, 4] budget table.
HEADOPS_HD BudgetLayout budget_layout_of(const int64_t* table, int64_t budget_heads, int64_t b, int64_t i) {
  const int64_t* r = table + 4 * (b * budget_heads + i);
  return {r[0], r[1], r[2], r[3]};
}

// One streaming KV head's layout.
struct RingLayout {
  int64_t offset;  // first slot in the streaming storage
  int64_t sinks;   // slots [0, sinks) hold positions [0, sinks)
  int64_t ring;    // slots [sinks, sinks + ring) are a ring over the positions >= sinks

  // The slot (relative to offset) that position p is written to.
  HEADOPS_HD int64_t slot_of(int64_t p) const { return p < sinks ? p : sinks + (p - sinks) % ring; }

  // The inverse of slot_of for a row holding `length` tokens: the position slot `slot` (relative
  // to offset, in [0, sinks + ring)) holds, or -1 when it holds none yet (the CUDA decode walks
  // a streaming head's slots and reads each one's position here).
  HEADOPS_HD int64_t position_of_slot(int64_t slot, int64_t length) const {
    if (slot < sinks) return slot < length ? slot : -1;
    const int64_t count = min64(max64(length - sinks, 0), ring);  // tokens in the ring
    if (count == 0) return -1;
    const int64_t last = length - 1, r = slot - sinks;
    const int64_t back = ((last - sinks) % ring - r + ring) % ring;  // how far behind the latest token
    return back < count ? last - back : -1;
  }

  // The positions the head has evicted once a row holds `length` tokens: past the sinks and out
  // of the ring, [sinks, max(sinks, length - ring)); a row growing from `before` to `after`
  // tokens evicts the difference, [max(sinks, before - ring), max(sinks, after - ring)).
  HEADOPS_HD KeyRange evicted(int64_t length) const { return {sinks, max64(sinks, length - ring)}; }
  HEADOPS_HD KeyRange evicted_between(int64_t before, int64_t after) const {
    return {max64(sinks, before - ring), max64(sinks, after - ring)};
  }
};

// RazorAttention's compensation token (DESIGN section 6). A compensated streaming KV head folds
// the tokens it evicts into one key and value per batch row: the sums of their keys and values
// (float64, as cached: RoPE applied) and their count n, updated as tokens are evicted (never
// recomputed). At attention it is one more key, visible to every query of the head's query
// heads, with value v_sum / n and logit
//   softmax_scale * q . (k_sum / n) + log n     (weighted: it stands for n keys)
//   softmax_scale * q . (k_sum / n)             (unweighted)
// It has no position: key_bias, window and sinks do not apply to it. n = 0: no such key.
// Table row of streaming head s, [Hs, 2]: [index into the compensation storage or -1, weighted].
struct Compensation {
  int64_t index;  // -1: not compensated
  bool weighted;
};

HEADOPS_HD Compensation compensation_of(const int64_t* table, int64_t streaming_head) {
  if (table == nullptr) return {-1, false};
  return {table[2 * streaming_head], table[2 * streaming_head + 1] != 0};
}

// The compensation key's logit from softmax_scale * q . k_mean and its count (n >= 1).
template <typename acc_t, typename Log>
HEADOPS_HD acc_t compensation_logit(acc_t scaled_dot, int64_t count, bool weighted, Log log_fn) {
  return weighted ? scaled_dot + log_fn(static_cast<acc_t>(count)) : scaled_dot;
}

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
