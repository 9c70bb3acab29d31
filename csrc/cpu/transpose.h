// Matrix transposes for the CPU kernels' tile operands, through fbgemm's SIMD transpose where
// torch links it (x86 builds), else a plain loop.
#pragma once

#include <cstdint>

namespace headops::cpu {

// dst[j, i] = src[i, j] for i < m, j < n (row-major, leading dimensions given). 16-bit element
// types (bfloat16, float16) are moved as their bits.
void transpose(int64_t m, int64_t n, const float* src, int64_t ld_src, float* dst, int64_t ld_dst);
void transpose(int64_t m, int64_t n, const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst);

}  // namespace headops::cpu
