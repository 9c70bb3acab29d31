// bfloat16 tile products on AMX, written for the attention kernels' two shapes: S = Q K^T
// (reduced over the head dim, 128 or so) and O += P V (reduced over a key block). oneDNN's brgemm
// ran them at 0.46 and 0.74 ms per 16 blocks of 256 x 256 (D = 128) on one core of the AMX Xeon,
// where these loops take 0.43 and 0.28 ms: its O += P V reached 11 % of the matrix unit's peak.
//
// A thread holds the tile registers between bind_thread() and release_thread(): bind drops
// oneDNN's brgemm context first (at::native::cpublas::brgemm_release, which makes brgemm
// configure the tiles again on its next call), so the two never share a configuration. No brgemm
// call may come between the two in that thread.
//
// Operands: A row-major bfloat16 (lda elements per row); B in brgemm's VNNI layout (pairs of
// consecutive reduction-dim elements interleaved: element (k, n) at ((k / 2) * ldb + n) * 2 + k % 2);
// C row-major float. bfloat16 values travel as uint16_t so this header needs no torch type.
#pragma once

#include <cstdint>

namespace headops::cpu::AMX {

// Whether the CPU runs AMX bfloat16 tiles and the OS lets this process use them
// (HEADOPS_CPU_AMX_BY_ONEDNN=1: never, so tests can sweep both paths on one machine).
bool bf16_tiles_available();

// Whether scores/accumulate take a head dim (reduction of S = Q K^T, columns of O): whole tiles.
constexpr bool fits_head_dim(int64_t head_dim) { return head_dim > 0 && head_dim % 32 == 0; }

void bind_thread();
void release_thread();

// C[M x N] = A[M x K] B. M a multiple of 16 and K of 32 (the caller pads A's rows with zeros).
// N is rounded up to 16: B's columns and C's columns up to that are read and written (the extra
// columns of C hold junk the caller ignores; B must be readable there).
void scores(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
            float* c, int64_t ldc);

// C[M x N] += A[M x K] B, B with ldb = N. N a multiple of 32, K even (any multiple of 2: a last
// partial step of 32 goes through zero-padded copies). M is rounded up to 16: A's rows and C's
// rows up to that are read and written (junk rows the caller ignores).
void accumulate(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
                int64_t ldc);

}  // namespace headops::cpu::AMX
