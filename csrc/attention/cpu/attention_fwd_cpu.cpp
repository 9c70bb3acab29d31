// Chooses the CPU forward variant (cpu/isa_dispatch.h) and the tile shape.
#include "attention_fwd_cpu.h"

#include "../../cpu/isa_dispatch.h"

namespace headops::cpu {

HEADOPS_ISA_VARIANTS(void, attention_forward_isa, (const AttentionParams& p, at::ScalarType dtype))

TileShape tile_shape(at::ScalarType dtype, int64_t head_dim) {
  // measured on a 2-core Sapphire Rapids (B=1, H=16, D=128, causal, S=4096 and 8192):
  // brgemm (AMX) tiles are cheap, so the softmax dominates and 128 x 256 balances it best;
  // BLAS sgemm prefers big tiles (256 x 512: 0.99x SDPA at S=8192 where 128 x 512 gave 1.13x).
  // float tiles through brgemm (AVX-512) take 128 x 256 too; so does a float call that
  // call_uses_packed_operands sends to BLAS for its few rows per key (its query tile fits its
  // few rows anyway, fit_to_call; its key blocks are 256 instead of 512).
  // On AMX, 256 x 256: on a 2-core AMX Xeon (2026-12-04, B=1, H=16, D=128, causal, bf16, 7
  // interleaved calls against SDPA) 0.89x / 0.96x SDPA at S = 2048 / 4096 where 128 x 256 gave
  // 0.97x / 1.01x (at 4096: 128 x 128 1.07x, 256 x 128 1.01x, 128 x 512 0.99x, 256 x 512 1.01x).
  if (uses_amx_tiles(dtype, head_dim)) return {256, 256};
  if (uses_packed_operands(dtype, head_dim)) return {128, 256};
  return {256, 512};
}

void attention_forward(const AttentionParams& p, at::ScalarType dtype) {
  static const auto variants = HEADOPS_ISA_TABLE_WITH_BF16(attention_forward_isa);
  variants.pick(dtype)(p, dtype);
}

}  // namespace headops::cpu
