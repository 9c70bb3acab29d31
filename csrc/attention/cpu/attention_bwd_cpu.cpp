// Chooses the CPU backward variant (cpu/isa_dispatch.h).
#include "attention_bwd_cpu.h"

#include "../../cpu/isa_dispatch.h"

namespace headops::cpu {

HEADOPS_ISA_VARIANTS(void, attention_backward_isa, (const BackwardParams& p, at::ScalarType acc_dtype))

// measured on the 2-core Sapphire Rapids (B=1, H=16, S=2048, D=128, fp32, forward+backward):
// 64x256 ... 256x512 all within 3 % of each other (the five sgemm calls dominate)
TileShape backward_tile_shape(int64_t /*head_dim*/) { return {128, 256}; }

void attention_backward(const BackwardParams& p, at::ScalarType acc_dtype) {
  static const auto variants = HEADOPS_ISA_TABLE(attention_backward_isa);
  variants.pick(acc_dtype)(p, acc_dtype);
}

}  // namespace headops::cpu
