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

// Whether a float16 backward reads q, k, v as they are and runs each product as two bfloat16
// parts on headops' own AMX loops (backward_products.h, SplitHalfTileProducts): where the forward
// would split (call_splits_half_into_bf16_tiles) and the call learns neither softmax_scale nor
// key_bias, whose gradients sum dS over rows, terms that cancel: with the split their error
// reached 2.7e-3 and 3.4e-5 of their size where float32 tiles leave 1.2e-4 and 1.6e-6 (30 draws,
// S = 333 and 600, all features). sink_logit and alpha come from the row pass, which the split
// does not touch. The caller also checks that q, k and v are finite.
bool backward_splits_half(at::ScalarType dtype, int64_t head_dim, int64_t rows_per_key, bool sums_ds);

// Whether the CPU backward of q, k, v in `input_dtype` (with rows_per_key query rows per key:
// seqlen_q * group) writes each head's dk and dv rows once, at its end (float through brgemm:
// backward_products.h), rather than accumulating into them per key block. Rows written once
// may lie in any layout; accumulated ones are wanted heads-first.
bool backward_writes_key_grads_once(at::ScalarType input_dtype, int64_t head_dim, int64_t rows_per_key);

// Fills the gradients BackwardParams asks for. q, k, v are in `input_dtype` (float or double,
// or bfloat16 where backward_reads_input_dtype says so, float16 where backward_splits_half does);
// everything else is in the
// accumulation dtype (float, double for double) and checked by the caller; gradient buffers
// arrive zeroed.
void attention_backward(const BackwardParams& p, at::ScalarType input_dtype);

}  // namespace headops::cpu
