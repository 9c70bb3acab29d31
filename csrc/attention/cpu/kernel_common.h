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
#include <cstdint>
#include <vector>

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

// One group of a query tile's rows and the first keys of a key block its products cover.
struct RowGroup {
  int64_t r0, rows, keys;
};
constexpr int64_t kRowGroup = 32;      // a multiple of AMX's 16-row tiles
constexpr int64_t kGroupKeyStep = 32;  // a multiple of every operand's key alignment

// The products of one key block (nk keys) for a query tile of nq rows, forward and backward. A
// block that every row sees whole (`whole`) is one product. On a block the causal diagonal (or
// a window's edge) crosses, each group of kRowGroup rows multiplies only up to the last key one
// of its rows sees, rounded up to kGroupKeyStep keys: the rows above the diagonal skip the keys
// past it, and a group that sees nothing of the block is left out. seen(r): keys [0, seen(r))
// of the block hold every key row r sees. row_keys[r] (nq entries): the keys its group covers;
// a row's scores past them are never computed.
template <typename Seen>
void plan_row_groups(std::vector<RowGroup>& groups, int64_t* row_keys, int64_t nq, int64_t nk, bool whole,
                     const Seen& seen) {
  groups.clear();
  if (whole) {
    groups.push_back({0, nq, nk});
    std::fill(row_keys, row_keys + nq, nk);
    return;
  }
  for (int64_t r0 = 0; r0 < nq; r0 += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, nq - r0);
    int64_t last = 0;
    for (int64_t r = r0; r < r0 + rows; ++r) last = std::max(last, seen(r));
    const int64_t keys = std::min(nk, (last + kGroupKeyStep - 1) / kGroupKeyStep * kGroupKeyStep);
    std::fill(row_keys + r0, row_keys + r0 + rows, keys);
    if (keys > 0) groups.push_back({r0, rows, keys});
  }
}

// plan_row_groups' seen(r) for one visibility: the end of the keys of the block [j0, j0 + nk)
// that the query at position pos sees (0 for none).
inline int64_t seen_in_block(const HeadVisibility& vis, int64_t pos, int64_t Sk, int64_t j0, int64_t nk) {
  KeyRange parts[2];
  vis.visible_in_block(pos, Sk, j0, nk, false, parts);
  return std::max(parts[0].hi, parts[1].hi);
}

// One chunk of a key block's dV and dK products (the backward's reductions over the tile's
// rows): keys [k0, k1) of the block, reduced over the rows [r0, nq).
struct KeyChunk {
  int64_t k0, k1, r0;
};

// The row groups seen from the keys' side: the keys past the first g.keys of the block are seen
// by no row of group g (its P and dS are zeros there), so a chunk of keys reduces over the rows
// from the first group that covers it. On a causal diagonal a 128-row tile's dV and dK then
// multiply 10240 of its 16384 (row, key) pairs where one product took all of them. Keys no group
// covers, or past the `real` ones, are in no chunk: their gradients get nothing from this block.
inline void plan_key_chunks(std::vector<KeyChunk>& chunks, const std::vector<RowGroup>& groups, int64_t nq,
                            int64_t real) {
  chunks.clear();
  int64_t k0 = 0;
  while (true) {
    // the next boundary: the fewest keys any group covers past k0; the rows from the first such group
    int64_t k1 = 0, r0 = nq;
    for (const RowGroup& g : groups) {
      if (g.keys <= k0) continue;
      k1 = k1 == 0 ? g.keys : std::min(k1, g.keys);
      r0 = std::min(r0, g.r0);
    }
    k1 = std::min(k1, real);
    if (k1 <= k0) return;
    chunks.push_back({k0, k1, r0});
    k0 = k1;
  }
}

// The (row, key) pairs a block's dV or dK product reduces over.
inline int64_t chunk_elements(const std::vector<KeyChunk>& chunks, int64_t nq) {
  int64_t n = 0;
  for (const KeyChunk& c : chunks) n += (c.k1 - c.k0) * (nq - c.r0);
  return n;
}

// The score elements a block's products compute.
inline int64_t group_elements(const std::vector<RowGroup>& groups) {
  int64_t n = 0;
  for (const RowGroup& g : groups) n += g.rows * g.keys;
  return n;
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
