// The VNNI layout brgemm takes for a 16-bit B operand: pairs of consecutive elements along the
// reduction dimension interleaved. One home for both ways a tile of rows (row r at row_of(r),
// D elements each) becomes a B operand:
//  - pack_columns_vnni: B = X^T, reduced over the D elements of a row (K^T in S = Q K^T, V^T
//    in dP = dO V^T): element (r, d) at ((d / 2) * ld + r) * 2 + d % 2;
//  - pack_rows_vnni: B = X, reduced over the rows (V in O = P V, K in dQ = dS K, Q and dO in
//    dK = dS^T Q and dV = P^T dO): element (r, d) at ((r / 2) * D + d) * 2 + r % 2.
// Rows [real, count) are written as zeros, so a padded reduction adds nothing.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/vnni_pack.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

// in the instruction set's namespace: instantiated per variant, never shared across them
namespace headops::cpu::CPU_CAPABILITY {

template <typename scalar_t, typename RowOf>
void pack_columns_vnni(RowOf row_of, int64_t real, int64_t count, int64_t D, int64_t ld, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2, "VNNI packing of 16-bit types");
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  constexpr int64_t kRowsAtOnce = 64;  // rows whose pairs are gathered while they stay in L1
  for (int64_t r0 = 0; r0 < count; r0 += kRowsAtOnce) {
    const int64_t n = std::min(kRowsAtOnce, count - r0);
    const scalar_t* rows[kRowsAtOnce];
    for (int64_t r = 0; r < n; ++r) rows[r] = r0 + r < real ? row_of(r0 + r) : nullptr;
    for (int64_t dp = 0; dp < D / 2; ++dp) {
      uint32_t* col = out + dp * ld + r0;
      // a row may start at any 2-byte boundary (strided views), so the pair is read by memcpy
      for (int64_t r = 0; r < n; ++r) {
        if (rows[r])
          std::memcpy(&col[r], rows[r] + 2 * dp, sizeof(uint32_t));
        else
          col[r] = 0;
      }
    }
  }
}

template <typename scalar_t, typename RowOf>
void pack_rows_vnni(RowOf row_of, int64_t real, int64_t count, int64_t D, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2, "VNNI packing of 16-bit types");
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t r = 0; r < count; r += 2) {
    uint16_t* pair = out + r * D;  // rows r and r + 1, interleaved
    const uint16_t* a = r < real ? reinterpret_cast<const uint16_t*>(row_of(r)) : nullptr;
    const uint16_t* b = r + 1 < real ? reinterpret_cast<const uint16_t*>(row_of(r + 1)) : nullptr;
    if (a && b) {
      for (int64_t d = 0; d < D; ++d) {
        pair[2 * d] = a[d];
        pair[2 * d + 1] = b[d];
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        pair[2 * d] = a ? a[d] : uint16_t(0);
        pair[2 * d + 1] = 0;
      }
    }
  }
}

}  // namespace headops::cpu::CPU_CAPABILITY
