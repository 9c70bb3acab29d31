#include "transpose.h"

#if defined(__x86_64__) && __has_include(<fbgemm/Utils.h>)
#include <fbgemm/Utils.h>
#define HEADOPS_HAVE_FBGEMM_TRANSPOSE 1
#endif

namespace headops::cpu {
namespace {

template <typename T>
void transpose_loop(int64_t m, int64_t n, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
}

// fbgemm needs AVX2; ATen's own transpose (native/cpu/utils.h) calls the same function
template <typename T>
void transpose_any(int64_t m, int64_t n, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  if (m == 0 || n == 0) return;
#ifdef HEADOPS_HAVE_FBGEMM_TRANSPOSE
  static const bool simd = fbgemm::fbgemmHasAvx2Support();
  if (simd) return fbgemm::transpose_simd<T>(m, n, src, ld_src, dst, ld_dst);
#endif
  transpose_loop(m, n, src, ld_src, dst, ld_dst);
}

}  // namespace

void transpose(int64_t m, int64_t n, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  transpose_any(m, n, src, ld_src, dst, ld_dst);
}
void transpose(int64_t m, int64_t n, const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  transpose_any(m, n, src, ld_src, dst, ld_dst);
}

}  // namespace headops::cpu
