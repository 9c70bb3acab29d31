#pragma once

#include <c10/core/ScalarType.h>

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

// Fills p.out and p.lse. Inputs are checked by the caller.
void attention_forward(const AttentionParams& p, at::ScalarType dtype);

}  // namespace headops::cpu
