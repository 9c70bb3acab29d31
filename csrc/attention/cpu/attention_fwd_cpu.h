#pragma once

#include <c10/core/ScalarType.h>

#include <string>

#include "../attention_params.h"

namespace headops::cpu {

struct TileShape {
  int64_t block_q;
  int64_t block_k;
};

// Query/key tile sizes the CPU kernel uses for a dtype and head dim (tests read them to
// bound the work a window may cost).
TileShape tile_shape(at::ScalarType dtype, int64_t head_dim);

// "DEFAULT", "AVX2" or "AVX512": the kernel variant this process runs.
const std::string& cpu_capability();

// Whether bfloat16/float16 run through oneDNN brgemm on VNNI-packed K/V (else: via float).
bool uses_packed_operands(at::ScalarType dtype, int64_t head_dim);

// Fills p.out and p.lse. Inputs are checked by the caller.
void attention_forward(const AttentionParams& p, at::ScalarType dtype);

}  // namespace headops::cpu
