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

// One budget KV head's layout: `size` slots from `offset`; the first `sinks` positions and
// the `recent` most recent ones are never evicted. Row of the budget table: [offset, size,
// sinks, recent].
struct BudgetLayout {
  int64_t offset, size, sinks, recent;
};

// One streaming KV head's layout.
struct RingLayout {
  int64_t offset;  // first slot in the streaming storage
  int64_t sinks;   // slots [0, sinks) hold positions [0, sinks)
  int64_t ring;    // slots [sinks, sinks + ring) are a ring over the positions >= sinks

  // The slot (relative to offset) that position p is written to.
  HEADOPS_HD int64_t slot_of(int64_t p) const { return p < sinks ? p : sinks + (p - sinks) % ring; }
};

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
