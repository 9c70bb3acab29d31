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
  // Float tiles through brgemm take 256 x 256 too where a core's L2 holds that tile's working set
  // (scores, probabilities, accumulator, a K and a V block: ~1 MiB; 2 MiB L2 or more): each query
  // tile streams the packed K and V of all the keys it sees, so taller tiles halve that traffic.
  // On the 2-core AMX Xeon (2026-12-05, fp32, B=1, H=16, D=128, causal, alternating runs, its
  // memory shared with busy neighbours) S = 4096 took 395-416 ms where 128 x 256 took 414-447 ms,
  // in three sets of five (S = 2048 and forward+backward: no difference). CPUs with smaller L2s
  // (the Zen 4/5 EPYCs: 1 MiB) keep 128 x 256, untimed at 256 x 256.
  // bfloat16 through headops' own AMX loops (cpu/amx_tiles.h) takes 128 x 256: its query tile
  // (32 KiB at D = 128) stays in L1 while the key blocks pass. On the 2-core AMX Xeon (2026-12-05,
  // one process alternating shapes call by call, 10-16 rounds), against 128 x 256: 256 x 256
  // 1.04x at S = 2048, 1.00x at 4096, 0.95x at 8192; at 4096 128 x 512 1.03x, 128 x 128 1.11x,
  // 64 x 256 1.13x.
  if (runs_own_amx_tiles(dtype, head_dim)) return {128, 256};
  // float16 in two bfloat16 parts runs the same loops (only 128 x 256 timed)
  if (dtype == at::kHalf && splits_half_into_bf16_tiles(head_dim)) return {128, 256};
  // float16 widened to float tiles (call_widens_half_to_float_tiles) takes float's shape
  if (dtype == at::kHalf && widens_half_to_float_tiles(head_dim)) return tile_shape(at::kFloat, head_dim);
  if (uses_amx_tiles(dtype, head_dim)) return {256, 256};
  if (dtype == at::kFloat && uses_packed_operands(dtype, head_dim) && l2_cache_bytes() >= (int64_t(2) << 20))
    return {256, 256};
  if (uses_packed_operands(dtype, head_dim)) return {128, 256};
  return blas_tile_shape();
}

// BLAS sgemm prefers big tiles (above). float16 calls that keep P in float for their backward
// take it too: through converted tiles, their forward took 10-16 % longer at 128 x 256 (2-core
// Emerald Rapids Xeon, B=1, H=16, D=128, causal, S = 2048 / 4096, one process alternating).
TileShape blas_tile_shape() { return {256, 512}; }

void attention_forward(const AttentionParams& p, at::ScalarType dtype) {
  static const auto variants = HEADOPS_ISA_TABLE_WITH_BF16(attention_forward_isa);
  variants.pick(dtype)(p, dtype);
}

}  // namespace headops::cpu
