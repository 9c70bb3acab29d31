#pragma once

#include <c10/core/ScalarType.h>

#include "../attention_params.h"
#include "attention_fwd_cpu.h"

namespace headops::cpu {

// Query/key tile sizes of the CPU backward (float/double BLAS tiles).
TileShape backward_tile_shape(int64_t head_dim);

// Fills the gradients BackwardParams asks for. Every input is in `acc_dtype` (float or double)
// and checked by the caller; gradient buffers arrive zeroed.
void attention_backward(const BackwardParams& p, at::ScalarType acc_dtype);

}  // namespace headops::cpu
