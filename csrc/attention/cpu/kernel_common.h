// Pieces shared by the CPU forward and backward kernels: the key ranges a query tile walks and
// its height. Compiled per instruction set like the kernels that include it.
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernel_common.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#ifndef HEADOPS_ISA_NAMESPACE
#define HEADOPS_ISA_NAMESPACE CPU_CAPABILITY
#endif

#include <algorithm>

#include "../../cpu/parallel.h"
#include "../../cpu/row_ops.h"
#include "../attention_params.h"
#include "../head_semantics.h"

namespace headops::cpu {
namespace CPU_CAPABILITY {

// The keys a tile of queries [q0, q1) walks: the full branch's (causal) range when the head
// has one, else the streaming ranges (window and sinks), widened to the operand's alignment.
template <typename acc_t>
VisibleKeys tile_keys(const AttentionParams& p, const HeadScalars<acc_t>& hs, int64_t q0, int64_t q1,
                      int64_t alignment, int64_t padded_keys) {
  VisibleKeys keys = tile_walk(p, hs, q0, q1);
  if (alignment > 1) {
    auto widen = [&](KeyRange r) -> KeyRange {
      if (r.empty()) return {0, 0};
      return {r.lo - r.lo % alignment, std::min(padded_keys, (r.hi + alignment - 1) / alignment * alignment)};
    };
    keys.sinks = widen(keys.sinks);
    keys.window = widen(keys.window);
    if (!keys.sinks.empty() && keys.sinks.hi >= keys.window.lo) {
      keys.window = {0, std::max(keys.sinks.hi, keys.window.hi)};
      keys.sinks = {0, 0};
    }
  }
  return keys;
}

// A tile of queries walks the union of their windows: about window + rows keys per row. A
// head with a short window (and no full branch) gets shorter tiles so that this stays
// within ~1.5x of the keys it really sees.
template <typename acc_t>
int64_t head_query_tile(const HeadScalars<acc_t>& hs, int64_t block_q) {
  if (hs.window < 0 || (hs.has_alpha && plan_branches(hs).full)) return block_q;
  int64_t rows = 16;
  while (rows * 2 <= block_q && rows * 4 <= hs.window) rows *= 2;  // rows <= window / 2
  return rows;
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
