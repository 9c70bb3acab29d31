// Chooses the CPU backward variant (cpu/isa_dispatch.h).
#include "attention_bwd_cpu.h"

#include "../../cpu/isa_dispatch.h"

namespace headops::cpu {

HEADOPS_ISA_VARIANTS(void, attention_backward_isa, (const BackwardParams& p, at::ScalarType input_dtype))

// measured on the 2-core Sapphire Rapids (B=1, H=16, S=2048, D=128, fp32, forward+backward):
// 64x256 ... 256x512 all within 3 % of each other (the five sgemm calls dominate). bfloat16 on
// AMX takes 128 x 128: on a 2-core AMX Xeon (2026-12-04, same shape, bf16, 7 interleaved calls)
// forward+backward took 0.93x SDPA's time where 128 x 256 took 0.97x (128 x 64 0.95x, 256 x 128
// 1.02x, 64 x 128 1.01x; fp32 within 2 % for 128 x 128 ... 256 x 256).
TileShape backward_tile_shape(at::ScalarType dtype, int64_t head_dim) {
  if (backward_reads_input_dtype(dtype, head_dim) && uses_amx_tiles(dtype, head_dim)) return {128, 128};
  if (dtype == at::kHalf && splits_half_into_bf16_tiles(head_dim)) return {128, 128};  // the same loops
  return {128, 256};
}

// bfloat16 only, whose brgemm reads VNNI pairs (the backward's 16-bit operands are packed so):
// float16's range (65504) would need its own look at dS and the scaled dL/do, and its brgemm
// reads plain rows on AVX512-FP16 (its forward runs there; its backward converts to float, or on
// AMX splits into bfloat16 parts: backward_splits_half)
bool backward_reads_input_dtype(at::ScalarType dtype, int64_t head_dim) {
  return dtype == at::kBFloat16 && uses_packed_operands(dtype, head_dim) && brgemm_pairs(dtype) == 2;
}

bool backward_splits_half(at::ScalarType dtype, int64_t head_dim, int64_t rows_per_key, bool sums_ds) {
  return dtype == at::kHalf && !sums_ds && call_splits_half_into_bf16_tiles(head_dim, rows_per_key);
}

bool backward_writes_key_grads_once(at::ScalarType input_dtype, int64_t head_dim, int64_t rows_per_key) {
  return input_dtype == at::kFloat && call_uses_packed_operands(input_dtype, head_dim, rows_per_key, true);
}

void attention_backward(const BackwardParams& p, at::ScalarType input_dtype) {
  static const auto variants = HEADOPS_ISA_TABLE_WITH_BF16(attention_backward_isa);
  variants.pick(input_dtype)(p, input_dtype);
}

}  // namespace headops::cpu
