#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>

#include "../../cpu/isa_dispatch.h"
#include "../attention_params.h"

namespace headops::cpu {

struct TileShape {
  int64_t block_q;
  int64_t block_k;
};

// Query/key tile sizes the CPU kernel uses for a dtype and head dim (tests read them to
// bound the work a window may cost).
TileShape tile_shape(at::ScalarType dtype, int64_t head_dim);

// The tile for one call: no larger than its queries and keys need, so that a call with a few
// queries allocates a few rows of per-thread scratch, not block_q x block_k (a 256 x 512 float64
// tile is 1 MiB, paged in and zeroed on every call). Rounded up so that the call's tiling, and
// with it every bit of the result, stays the full tile's: queries to a power of two of at least
// 16 (head_query_tile's doubling then stops at the same tile or at one that holds every query),
// keys to whole 64-key blocks (the packed operands' unit).
inline TileShape fit_to_call(TileShape tile, int64_t seqlen_q, int64_t seqlen_k) {
  int64_t rows = 16;
  while (rows < seqlen_q && rows < tile.block_q) rows *= 2;
  const int64_t keys = (std::max<int64_t>(seqlen_k, 1) + 63) / 64 * 64;
  return {std::min(tile.block_q, rows), std::min(tile.block_k, keys)};
}

// Fills p.out and p.lse. Inputs are checked by the caller.
void attention_forward(const AttentionParams& p, at::ScalarType dtype);

}  // namespace headops::cpu
