// Chooses the CPU decode-attention variant (cpu/isa_dispatch.h).
#include "decode_cpu.h"

#include "../../cpu/isa_dispatch.h"

namespace headops::cpu {

HEADOPS_ISA_VARIANTS(void, decode_attention_isa, (const DecodeParams& p, at::ScalarType dtype))

void decode_attention(const DecodeParams& p, at::ScalarType dtype) {
  static const auto variants = HEADOPS_ISA_TABLE_WITH_BF16(decode_attention_isa);
  variants.pick(dtype)(p, dtype);
}

}  // namespace headops::cpu
