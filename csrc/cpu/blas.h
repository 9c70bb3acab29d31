// Row-major tile products on the CPU through the BLAS that torch itself links
// (MKL or OpenBLAS Fortran symbols, found at run time), with ATen's portable gemm as the
// fallback when a build exports no BLAS. Tiles are small and run one per thread, so the
// BLAS call is single-threaded inside at::parallel_for.
#pragma once

#include <cstdint>

namespace headops::cpu {

// C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C     (all row-major, leading dims given)
void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc);
void gemm_nt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
             int64_t ldb, double beta, double* c, int64_t ldc);

// C[m, n] = alpha * A[m, k] * B[k, n] + beta * C      (all row-major, leading dims given)
void gemm_nn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc);
void gemm_nn(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
             int64_t ldb, double beta, double* c, int64_t ldc);

// C[m, n] = alpha * A[k, m]^T * B[k, n] + beta * C    (all row-major, leading dims given)
void gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc);
void gemm_tn(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
             int64_t ldb, double beta, double* c, int64_t ldc);

// Whether the Fortran BLAS was found (false: ATen's slower portable gemm is used).
bool have_native_blas();

}  // namespace headops::cpu
