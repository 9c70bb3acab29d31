// Chooses the CPU forward variant for the running processor and the tile shape.
#include "attention_fwd_cpu.h"

#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace headops::cpu {

namespace DEFAULT {
void attention_forward_isa(const AttentionParams& p, at::ScalarType dtype);
}
#if defined(__x86_64__)
namespace AVX2 {
void attention_forward_isa(const AttentionParams& p, at::ScalarType dtype);
}
namespace AVX512 {
void attention_forward_isa(const AttentionParams& p, at::ScalarType dtype);
}
namespace AVX512_BF16 {
void attention_forward_isa(const AttentionParams& p, at::ScalarType dtype);
}
#endif

// ATen's own choice (honours ATEN_CPU_CAPABILITY), so headops vectorises like torch does.
const std::string& cpu_capability() {
  static const std::string capability = at::get_cpu_capability();
  return capability;
}

bool uses_packed_operands(at::ScalarType dtype, int64_t head_dim) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (head_dim % 2 != 0) return false;
  static const bool bf16 = at::native::cpublas::could_pack(at::kBFloat16);
  static const bool f16 = at::native::cpublas::could_pack(at::kHalf);
  return dtype == at::kBFloat16 ? bf16 : f16;
}

TileShape tile_shape(at::ScalarType dtype, int64_t head_dim) {
  // measured on a 2-core Sapphire Rapids (B=1, H=16, D=128, causal, S=4096 and 8192):
  // brgemm (AMX) tiles are cheap, so the softmax dominates and 128 x 256 balances it best;
  // BLAS sgemm prefers big tiles (256 x 512: 0.99x SDPA at S=8192 where 128 x 512 gave 1.13x)
  if (uses_packed_operands(dtype, head_dim)) return {128, 256};
  return {256, 512};
}

void attention_forward(const AttentionParams& p, at::ScalarType dtype) {
#if defined(__x86_64__)
  const std::string& cap = cpu_capability();
  if (cap == "AVX512") {
    // HEADOPS_CPU_NO_BF16_VARIANT=1 runs bfloat16 through the plain AVX-512 variant (tests)
    static const bool has_bf16 =
        __builtin_cpu_supports("avx512bf16") && std::getenv("HEADOPS_CPU_NO_BF16_VARIANT") == nullptr;
    if (dtype == at::kBFloat16 && has_bf16) return AVX512_BF16::attention_forward_isa(p, dtype);
    return AVX512::attention_forward_isa(p, dtype);
  }
  if (cap == "AVX2") return AVX2::attention_forward_isa(p, dtype);
#endif
  DEFAULT::attention_forward_isa(p, dtype);
}

}  // namespace headops::cpu
