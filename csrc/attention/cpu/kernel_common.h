// Pieces shared by the CPU forward and backward kernels: reading a head's parameters, the key
// ranges a query tile walks, the visible part of one row of a key block, and the dynamic
// scheduler. Compiled per instruction set like the kernels that include it.
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernel_common.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#ifndef HEADOPS_ISA_NAMESPACE
#define HEADOPS_ISA_NAMESPACE CPU_CAPABILITY
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>

#include "../attention_params.h"
#include "../head_semantics.h"

namespace headops::cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// read_head (a head's scalars with their defaults) is head_semantics.h's, shared with CUDA.
using headops::read_head;

// The keys a tile of queries [q0, q1) walks: the full branch's (causal) range when the head
// has one, else the streaming ranges (window and sinks), widened to the operand's alignment.
template <typename acc_t>
VisibleKeys tile_keys(const AttentionParams& p, const HeadScalars<acc_t>& hs, int64_t q0, int64_t q1,
                      int64_t alignment, int64_t padded_keys) {
  const BranchPlan plan = plan_branches(hs);
  const HeadVisibility vis = plan.full ? full_visibility(p.causal) : HeadVisibility{p.causal, hs.window, hs.sinks};
  const int64_t shift = p.seqlen_k - p.seqlen_q;
  VisibleKeys keys = vis.keys_for_positions(q0 + shift, q1 - 1 + shift, p.seqlen_k);
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

// The keys of block [j0, j0 + nk) that the query at position `pos` sees, relative to j0, as
// up to two ranges (the first non-empty one first). `whole_block`: the caller knows every key
// of the block is visible to every query of the tile.
inline void visible_parts(const HeadVisibility& vis, int64_t pos, int64_t Sk, int64_t j0, int64_t nk,
                          bool whole_block, KeyRange (&parts)[2]) {
  if (whole_block) {
    parts[0] = {0, nk};
    parts[1] = {0, 0};
    return;
  }
  const VisibleKeys vk = vis.keys_for_query(pos, Sk);
  parts[0] = vk.sinks.clip(j0, j0 + nk);
  parts[1] = vk.window.clip(j0, j0 + nk);
  for (KeyRange& part : parts) part = part.empty() ? KeyRange{0, 0} : KeyRange{part.lo - j0, part.hi - j0};
  if (parts[0].empty()) std::swap(parts[0], parts[1]);
}

// Runs every item on at::parallel_for's threads, each thread taking the next item from a
// shared counter. Results do not depend on which thread ran an item (each item writes only
// its own outputs).
template <typename Fn>
void run_dynamic(int64_t n_items, Fn&& make_worker) {
  if (n_items == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) worker.run(i);
    worker.finish();
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
