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
// The tile of products through BLAS (float tiles, or 16-bit ones converted to float).
TileShape blas_tile_shape();

// The tile for one call: no larger than its queries and keys need, so that a call with a few
// queries allocates a few rows of per-thread scratch, not block_q x block_k (a 256 x 512 float64
// tile is 1 MiB, paged in and zeroed on every call): queries to a power of two of at least 16,
// keys to whole 64-key blocks (the packed operands' unit). A causal call's query tiles hold
// about an eighth of its queries (at least 32 rows): a tile computes every key up to its last
// row, so one tile over a short causal call does twice the products it needs (2-core Zen 5,
// B=1, H=16, D=128: S=256 fp32 1.05x SDPA with one 256-row tile, 0.74-0.79x with 32-64 rows;
// from S=2048 on the full tile is as fast or faster).
inline TileShape fit_to_call(TileShape tile, int64_t seqlen_q, int64_t seqlen_k, bool causal) {
  const int64_t most = causal ? std::max<int64_t>(32, seqlen_q / 8) : tile.block_q;
  int64_t rows = 16;
  while (rows < seqlen_q && rows < tile.block_q && rows < most) rows *= 2;
  const int64_t keys = (std::max<int64_t>(seqlen_k, 1) + 63) / 64 * 64;
  return {std::min(tile.block_q, rows), std::min(tile.block_k, keys)};
}

// Fills p.out and p.lse. Inputs are checked by the caller.
void attention_forward(const AttentionParams& p, at::ScalarType dtype);

}  // namespace headops::cpu
