// bfloat16 tile products on AMX, written for the attention kernels' two shapes: S = Q K^T
// (reduced over the head dim, 128 or so) and O += P V (reduced over a key block). On one core of
// the AMX Xeon (peak 3.2 TFLOP/s: 16 cycles a tile product) oneDNN's brgemm ran 256 x 256 x 128
// blocks at 0.54 (S) and 0.36 TFLOP/s (O); these loops, over tile-major K and V (each B tile one
// contiguous KiB), ran 128 x 256 x 128 blocks of 4 heads' 4096 keys at 0.78 and 1.0 TFLOP/s,
// against 0.58 and 0.89 reading the same blocks in brgemm's row layout.
//
// A thread holds the tile registers between bind_thread() and end_products(): bind drops
// oneDNN's brgemm context first (at::native::cpublas::brgemm_release, which makes brgemm
// configure the tiles again on its next call), so the two never share a configuration. No brgemm
// call may come between the two in that thread.
//
// Operands: A row-major bfloat16 (lda elements per row); B tile-major (cpu/vnni_pack.h: K^T in
// groups of kKeyGroup keys, V in steps of kKeyStep keys, each 16-row B tile one contiguous KiB);
// C row-major float. bfloat16 values travel as uint16_t so this header needs no torch type.
#pragma once

#include <cstdint>

namespace headops::cpu::AMX {

constexpr int64_t kKeyGroup = 16;  // keys of one K^T group (a B tile's columns)
constexpr int64_t kKeyStep = 32;   // keys of one step of O += P V (a B tile's pair rows x 2)

// Whether the CPU runs AMX bfloat16 tiles and the OS lets this process use them
// (HEADOPS_CPU_AMX_BY_ONEDNN=1: never, so tests can sweep both paths on one machine).
bool bf16_tiles_available();

// Whether scores/accumulate take a head dim (reduction of S = Q K^T, columns of O): whole tiles.
constexpr bool fits_head_dim(int64_t head_dim) { return head_dim > 0 && head_dim % 32 == 0; }

void bind_thread();
// Ends a worker's tile products: releases the tiles headops' loops held (own_loops), or else
// brgemm's context (brgemm_release(brgemm_vnni)).
void end_products(bool own_loops, bool brgemm_vnni);

// The A operand of S = Q K^T (and of dP = dO V^T): `rows` rows of `cols` bfloat16 from src (row
// stride ld) copied to dst, followed by zero rows up to padded_rows(rows).
constexpr int64_t padded_rows(int64_t rows) { return (rows + 15) / 16 * 16; }
void copy_padded_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint16_t* dst);

// bfloat16 (any 16-bit type) as the bits these functions take
template <typename T>
const uint16_t* bits(const T* x) {
  static_assert(sizeof(T) == 2, "AMX tiles of 16-bit types");
  return reinterpret_cast<const uint16_t*>(x);
}
template <typename T>
uint16_t* bits(T* x) {
  static_assert(sizeof(T) == 2, "AMX tiles of 16-bit types");
  return reinterpret_cast<uint16_t*>(x);
}

// C[M x N] = A[M x K] B (C += A B with add_c), B = K^T from its first key group. M a multiple of
// 16 (the caller pads A's rows with zeros), N of kKeyGroup, K of 32.
void scores(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, float* c, int64_t ldc,
            bool add_c = false);

// C[M x N] += A[M x K] B, B from its first reduction step (V's keys; or, for dK and dV, a query
// tile's Q or dO rows packed the same way). N a multiple of 32, K of kKeyStep. C's rows past M
// are left alone; A's rows are read up to M rounded up to 16 (their products are dropped).
void accumulate(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
                int64_t ldc);

// The same two products over operands held as two bfloat16 parts each (hi + lo: float16 split
// exactly, float to ~2**-17; row_ops.h split_row): hi·hi + hi·lo + lo·hi, three products of the
// plain ones, summed in the tile registers (C loaded and stored once). The dropped lo·lo term is
// at most 2**-18 of each element product. split_scores writes C (adds into it with add_c),
// split_accumulate adds into it; shapes as above.
void split_scores(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                  const uint16_t* b_hi, const uint16_t* b_lo, float* c, int64_t ldc);
void split_accumulate(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                      const uint16_t* b_hi, const uint16_t* b_lo, float* c, int64_t ldc);

// C = A_hi B + A_lo B (scores) and C += A_hi B + A_lo B (accumulate) of an A held in two parts
// for a bfloat16 B, in one pass: the forward's probabilities (SplitProbabilityOperands) and the
// backward's dL/do (split_dout) where a call learns a sum that cancels.
void scores_split_a(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                    const uint16_t* b, float* c, int64_t ldc);
void accumulate_split_a(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                        const uint16_t* b, float* c, int64_t ldc);

}  // namespace headops::cpu::AMX
