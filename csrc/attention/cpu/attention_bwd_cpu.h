#pragma once

#include <c10/core/ScalarType.h>

#include "../attention_params.h"
#include "attention_fwd_cpu.h"

namespace headops::cpu {

// Query/key tile sizes of the CPU backward for inputs of `dtype`.
TileShape backward_tile_shape(at::ScalarType dtype, int64_t head_dim);

// Whether the CPU backward reads bfloat16/float16 q, k, v as they are (brgemm tiles in the input
// dtype); otherwise the caller converts them to float.
bool backward_reads_input_dtype(at::ScalarType dtype, int64_t head_dim);

// Fills the gradients BackwardParams asks for. q, k, v are in `input_dtype` (float or double,
// or bfloat16/float16 where backward_reads_input_dtype says so); everything else is in the
// accumulation dtype (float, double for double) and checked by the caller; gradient buffers
// arrive zeroed.
void attention_backward(const BackwardParams& p, at::ScalarType input_dtype);

}  // namespace headops::cpu
