#include "blas.h"

#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <algorithm>
#include <climits>
#include <mutex>

namespace headops::cpu {
namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
};

// torch links its BLAS into libtorch_cpu; look the symbols up in the library that holds
// ATen's own code rather than in the global scope (Python loads extensions RTLD_LOCAL).
const Blas& blas() {
  static Blas table;
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info;
    void* handle = nullptr;
    if (dladdr(reinterpret_cast<void*>(&at::native::cpublas::could_pack), &info) && info.dli_fname)
      handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    for (void* h : {handle, RTLD_DEFAULT}) {
      if (!h) continue;
      if (!table.sgemm) table.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "sgemm_"));
      if (!table.dgemm) table.dgemm = reinterpret_cast<dgemm_fn>(dlsym(h, "dgemm_"));
    }
  });
  return table;
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <typename T, typename Fn>
bool call_fortran(Fn fn, char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (!fn || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) || !fits_int(ldc))
    return false;
  int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  fn(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  return true;
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands (a
// row-major matrix read column-major is its transpose).
template <typename T, typename Fn>
void gemm_rowmajor(Fn fn, bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha,
                   const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = a_transposed ? 'T' : 'N', tb = b_transposed ? 'T' : 'N';
  if (call_fortran<T>(fn, tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc)) return;
  // no BLAS exported by this torch build: a plain loop (correct, not fast)
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p)
        sum += (a_transposed ? a[p * lda + i] : a[i * lda + p]) * (b_transposed ? b[j * ldb + p] : b[p * ldb + j]);
      T& out = c[i * ldc + j];
      out = alpha * sum + (beta == T(0) ? T(0) : beta * out);
    }
  }
}

}  // namespace

bool have_native_blas() { return blas().sgemm != nullptr && blas().dgemm != nullptr; }

void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_rowmajor<float>(blas().sgemm, false, true, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm_nt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
             int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_rowmajor<double>(blas().dgemm, false, true, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm_nn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_rowmajor<float>(blas().sgemm, false, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm_nn(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
             int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_rowmajor<double>(blas().dgemm, false, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_rowmajor<float>(blas().sgemm, true, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm_tn(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
             int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_rowmajor<double>(blas().dgemm, true, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace headops::cpu
