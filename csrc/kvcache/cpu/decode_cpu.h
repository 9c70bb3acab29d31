#pragma once

#include <c10/core/ScalarType.h>

#include "../decode_params.h"

namespace headops::cpu {

// Fills p.attn.out. Inputs are checked by the caller (csrc/kvcache/decode_attention.cpp).
void decode_attention(const DecodeParams& p, at::ScalarType dtype);

}  // namespace headops::cpu
