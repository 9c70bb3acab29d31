#include "isa_dispatch.h"

#include "amx_tiles.h"

#include <ATen/Context.h>
#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>
#include <cpuinfo.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace headops::cpu {

const std::string& cpu_capability() {
  static const std::string capability = at::get_cpu_capability();
  return capability;
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    if (!cpuinfo_initialize()) return int64_t(0);
    const cpuinfo_cache* l2 = cpuinfo_get_l2_cache(0);
    return l2 != nullptr ? int64_t(l2->size) : int64_t(0);
  }();
  return bytes;
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

namespace {

// One small product through brgemm with B in the layout `pairs` names (2: VNNI pairs, 1: plain
// rows), checked exactly (small integers): whether this torch's oneDNN runs such tiles on this
// CPU, reading B that way, rather than refusing them or reading another layout.
template <typename scalar_t>
bool brgemm_product_runs(int64_t pairs) {
  const bool vnni = pairs == 2;
  constexpr int64_t M = 4, N = 16, K = 4;
  std::vector<scalar_t> a(M * K), b(K * N);
  std::vector<float> c(M * N, 0.f);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = scalar_t(float(i + k));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j)
      b[vnni ? ((k / 2) * N + j) * 2 + k % 2 : k * N + j] = scalar_t(float((j + 2 * k) % 5));
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data(), vnni);
    at::native::cpublas::brgemm_release(vnni);
  } catch (const c10::Error&) {
    return false;
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float want = 0.f;
      for (int64_t k = 0; k < K; ++k) want += float(i + k) * float((j + 2 * k) % 5);
      if (c[i * N + j] != want) return false;
    }
  return true;
}

// The B layout on which brgemm runs `dtype`'s tiles natively on this CPU: 2 (VNNI pairs), 1
// (plain rows) or 0 (not natively; HEADOPS_CPU_NO_PACKED=1: never). torch's could_pack answers
// for AMX's 16-bit tiles only (VNNI); AVX512-BF16 (vdpbf16ps) runs bfloat16 in VNNI pairs too,
// at about twice the float32 tile rate. float16 without AMX-FP16: torch's brgemm hands it to
// MKL's float16 gemm (perf: mkl_blas_avx512_hgemm_hfcopy and sgemm kernels, float accumulation),
// which reads B as plain rows whatever is_vnni says, so a VNNI-packed B gives wrong products;
// the self-test tells the layouts apart. On AVX512-FP16 (the 2-core Emerald Rapids Xeon) that
// took the float16 forward 8-9 % less time than converting its tiles to float (S = 1024-4096,
// B=1, H=16, D=128, causal, one process alternating); without AVX512-FP16 it is not measured and
// not taken. Float tiles run on any AVX-512 CPU: on the 2-core Zen 5 EPYC one core ran
// 64x64x128 ... 256x256x128 float products at 235-255 GFLOPS through brgemm (B packed
// beforehand) against 88-106 through MKL's sgemm, which packs its operands on every call (and
// takes its AVX2 path on AMD CPUs). AVX2-only CPUs keep sgemm (brgemm not measured there).
int64_t native_brgemm_pairs(at::ScalarType dtype) {
  if (std::getenv("HEADOPS_CPU_NO_PACKED") != nullptr) return 0;
  if (dtype != at::kFloat && at::native::cpublas::could_pack(dtype)) return 2;
#if defined(__x86_64__)
  switch (dtype) {
    case at::kFloat: return __builtin_cpu_supports("avx512f") && brgemm_product_runs<float>(1) ? 1 : 0;
    case at::kBFloat16: return __builtin_cpu_supports("avx512bf16") && brgemm_product_runs<at::BFloat16>(2) ? 2 : 0;
    default:
      if (!__builtin_cpu_supports("avx512fp16")) return 0;
      if (brgemm_product_runs<at::Half>(2)) return 2;
      return brgemm_product_runs<at::Half>(1) ? 1 : 0;
  }
#else
  return 0;
#endif
}

}  // namespace

// Each dtype's self-test runs on its first query only: a float32 process never JIT-compiles a
// 16-bit brgemm kernel.
int64_t brgemm_pairs(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: {
      static const int64_t f32 = native_brgemm_pairs(at::kFloat);
      return f32;
    }
    case at::kBFloat16: {
      static const int64_t bf16 = native_brgemm_pairs(at::kBFloat16);
      return bf16;
    }
    case at::kHalf: {
      static const int64_t f16 = native_brgemm_pairs(at::kHalf);
      return f16;
    }
    default: return 0;
  }
}

bool uses_packed_operands(at::ScalarType dtype, int64_t head_dim) {
  if (brgemm_pairs(dtype) == 0) return false;
  // 16-bit types: an even head dim, which K^T's VNNI pairs need (plain float16 keeps the rule:
  // its odd head dims have not run through brgemm)
  return dtype == at::kFloat || head_dim % 2 == 0;
}

bool uses_amx_tiles(at::ScalarType dtype, int64_t head_dim) {
  return dtype != at::kFloat && uses_packed_operands(dtype, head_dim) && at::native::cpublas::could_pack(dtype);
}

bool runs_own_amx_tiles(at::ScalarType dtype, int64_t head_dim) {
  return dtype == at::kBFloat16 && AMX::fits_head_dim(head_dim) && uses_amx_tiles(dtype, head_dim) &&
         AMX::bf16_tiles_available();
}

bool splits_half_into_bf16_tiles(int64_t head_dim) {
  return runs_own_amx_tiles(at::kBFloat16, head_dim) && brgemm_pairs(at::kHalf) != 2;
}

bool call_splits_half_into_bf16_tiles(int64_t head_dim, int64_t rows_per_key) {
  return rows_per_key >= kHalfSplitRows && splits_half_into_bf16_tiles(head_dim);
}

bool widens_half_to_float_tiles(int64_t head_dim) {
  return brgemm_pairs(at::kHalf) == 0 && uses_packed_operands(at::kFloat, head_dim);
}

bool call_widens_half_to_float_tiles(int64_t head_dim, int64_t rows_per_key) {
  return widens_half_to_float_tiles(head_dim) && call_uses_packed_operands(at::kFloat, head_dim, rows_per_key, false);
}

int64_t float_packing_rows(bool backward) {
  static const char* forced = std::getenv("HEADOPS_CPU_FLOAT_PACKING_ROWS");
  if (forced != nullptr) return std::max<int64_t>(1, std::atoll(forced));
  static const bool intel_mkl = [] {
    if (!at::hasMKL() || !cpuinfo_initialize()) return false;
    const cpuinfo_core* core = cpuinfo_get_core(0);
    return core != nullptr && core->vendor == cpuinfo_vendor_intel;
  }();
  if (!intel_mkl) return 24;
  return backward ? 512 : 192;
}

bool call_uses_packed_operands(at::ScalarType dtype, int64_t head_dim, int64_t rows_per_key, bool backward) {
  if (!uses_packed_operands(dtype, head_dim)) return false;
  return dtype != at::kFloat || rows_per_key >= float_packing_rows(backward);
}

}  // namespace headops::cpu
