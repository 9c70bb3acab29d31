#include "isa_dispatch.h"

#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>

#include <cstdlib>

namespace headops::cpu {

const std::string& cpu_capability() {
  static const std::string capability = at::get_cpu_capability();
  return capability;
}

bool runs_avx512_bf16_variant() {
#if defined(__x86_64__)
  static const bool runs =
      __builtin_cpu_supports("avx512bf16") && std::getenv("HEADOPS_CPU_NO_BF16_VARIANT") == nullptr;
  return runs;
#else
  return false;
#endif
}

bool uses_packed_operands(at::ScalarType dtype, int64_t head_dim) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (head_dim % 2 != 0) return false;
  static const bool bf16 = at::native::cpublas::could_pack(at::kBFloat16);
  static const bool f16 = at::native::cpublas::could_pack(at::kHalf);
  return dtype == at::kBFloat16 ? bf16 : f16;
}

}  // namespace headops::cpu
