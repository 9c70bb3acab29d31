// The layouts brgemm takes for its B operand: VNNI pairs (consecutive elements along the
// reduction dimension interleaved) for 16-bit types on AMX and AVX512-BF16, plain rows (groups
// of one) for float and for float16 on AVX512-FP16 (brgemm_pairs, cpu/isa_dispatch.h, says which
// this CPU takes). One home for both ways a tile of rows (row r at row_of(r), D elements each)
// becomes a B operand:
//  - pack_columns_vnni: B = X^T, reduced over the D elements of a row (K^T in S = Q K^T, V^T
//    in dP = dO V^T): element (r, d) at ((d / P) * ld + r) * P + d % P;
//  - pack_rows_vnni: B = X, reduced over the rows (V in O = P V, K in dQ = dS K, Q and dO in
//    dK = dS^T Q and dV = P^T dO): element (r, d) at ((r / P) * D + d) * P + r % P;
// with P the group (`pairs`: 2 or 1). Rows [real, count) are written as zeros, so a padded
// reduction adds nothing.
// headops' own AMX loops (cpu/amx_tiles.h) read 16-bit B operands tile-major instead, so that
// every 16-row x 64-byte tile is one contiguous KiB:
//  - K^T: pack_columns_vnni with ld = 16, once per group of 16 rows (keys): element (r, d) at
//    (r / 16) * 16 D + ((d / 2) * 16 + r % 16) * 2 + d % 2;
//  - V: pack_rows_amx_tiles, per step of 32 rows (keys): element (r, d) at
//    (r / 32) * 32 D + ((d / 16) * 16 + (r % 32) / 2) * 32 + (d % 16) * 2 + r % 2.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/vnni_pack.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/cpu/vec/vec.h>

#include "amx_tiles.h"
#include "transpose.h"

// in the instruction set's namespace: instantiated per variant, never shared across them
namespace headops::cpu::CPU_CAPABILITY {

// Elements of one VNNI group, 2 for 16-bit types and 1 for float: the layout of the 16-bit
// backward (bfloat16 only, whose brgemm always takes pairs) and of headops' own AMX loops. The
// forward packs in the layout brgemm_pairs finds.
template <typename scalar_t>
constexpr int64_t vnni_pairs() {
  static_assert(sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4, "brgemm operands of 16-bit types or float");
  return 4 / int64_t(sizeof(scalar_t));
}

template <typename scalar_t>
constexpr bool is_vnni() {
  return vnni_pairs<scalar_t>() == 2;
}

// Where key j's column starts in a packed X^T (K^T, V^T) of D rows: in groups of `pairs`, or
// AMX's tile-major groups of 16 keys.
constexpr int64_t transposed_key_offset(int64_t j, int64_t D, bool amx_tile_major, int64_t pairs) {
  return amx_tile_major ? j * D : j * pairs;
}

// The keys a packed key block starts and ends on: whole groups (VNNI pairs); whole steps of 32
// for AMX's tile-major V (ranges are widened to them; the softmax masks the extra keys).
constexpr int64_t packed_key_alignment(bool amx_tile_major, int64_t pairs) {
  return amx_tile_major ? AMX::kKeyStep : pairs;
}

// Whether rows[0 .. n) lie at one stride from each other (then *stride is it).
template <typename scalar_t>
bool uniform_stride(const scalar_t* const* rows, int64_t n, int64_t* stride) {
  *stride = n > 1 ? rows[1] - rows[0] : 0;
  for (int64_t r = 2; r < n; ++r)
    if (rows[r] - rows[r - 1] != *stride) return false;
  return true;
}

// pack_columns_vnni by groups (`pairs` elements) of Group's size: 4 bytes (a float, a VNNI pair)
// or 2 (a 16-bit element of a plain layout).
template <typename scalar_t, typename Group, typename RowOf>
void pack_columns_in_groups(RowOf row_of, int64_t real, int64_t count, int64_t D, int64_t ld, scalar_t* dst) {
  constexpr int64_t P = int64_t(sizeof(Group) / sizeof(scalar_t));
  Group* out = reinterpret_cast<Group*>(dst);
  constexpr int64_t kRowsAtOnce = 64;  // rows whose groups are gathered while they stay in L1
  for (int64_t r0 = 0; r0 < count; r0 += kRowsAtOnce) {
    const int64_t n = std::min(kRowsAtOnce, count - r0);
    const scalar_t* rows[kRowsAtOnce];
    for (int64_t r = 0; r < n; ++r) rows[r] = r0 + r < real ? row_of(r0 + r) : nullptr;
    // rows at one stride (K and V of a head): register transposes of blocks of groups (element
    // by element, a float call with 16 heads, 4096 keys and 64 queries took 11.6 ms on the Zen 5
    // EPYC, 7.3 ms with them; the pairs of a bf16 forward's K were 4.6 % of its time on the AMX
    // Xeon, gathered one by one). A group is read as one unit, so the rows must start on its
    // boundaries.
    const int64_t n_real = std::clamp<int64_t>(real - r0, 0, n);
    int64_t stride = 0;
    if (n_real > 0 && uniform_stride(rows, n_real, &stride) && stride > 0 && stride % P == 0 &&
        reinterpret_cast<uintptr_t>(rows[0]) % sizeof(Group) == 0) {
      if constexpr (sizeof(Group) == 4) {
        at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(rows[0]), stride / P,
                                      reinterpret_cast<float*>(out) + r0, ld, static_cast<int>(n_real),
                                      static_cast<int>(D / P));
      } else {
        transpose(n_real, D, reinterpret_cast<const uint16_t*>(rows[0]), stride, reinterpret_cast<uint16_t*>(out) + r0,
                  ld);
      }
      for (int64_t dp = 0; dp < D / P; ++dp) std::fill(out + dp * ld + r0 + n_real, out + dp * ld + r0 + n, Group(0));
      continue;
    }
    for (int64_t dp = 0; dp < D / P; ++dp) {
      Group* col = out + dp * ld + r0;
      // a row may start at any 2-byte boundary (strided views), so the group is read by memcpy
      for (int64_t r = 0; r < n; ++r) {
        if (rows[r])
          std::memcpy(&col[r], rows[r] + P * dp, sizeof(Group));
        else
          col[r] = 0;
      }
    }
  }
}

template <typename scalar_t, typename RowOf>
void pack_columns_vnni(RowOf row_of, int64_t real, int64_t count, int64_t D, int64_t ld, int64_t pairs,
                       scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4, "brgemm operands of 16-bit types or float");
  if (pairs * int64_t(sizeof(scalar_t)) == 4)
    return pack_columns_in_groups<scalar_t, uint32_t>(row_of, real, count, D, ld, dst);
  if constexpr (sizeof(scalar_t) == 2) pack_columns_in_groups<scalar_t, uint16_t>(row_of, real, count, D, ld, dst);
}

template <typename scalar_t, typename RowOf>
void pack_rows_vnni(RowOf row_of, int64_t real, int64_t count, int64_t D, int64_t pairs, scalar_t* dst) {
  if (pairs == 1) {
    for (int64_t r = 0; r < count; ++r) {
      if (r < real)
        std::memcpy(dst + r * D, row_of(r), D * sizeof(scalar_t));
      else
        std::memset(dst + r * D, 0, D * sizeof(scalar_t));
    }
  } else if constexpr (sizeof(scalar_t) == 2) {
    for (int64_t r = 0; r < count; r += 2) {
      // rows r and r + 1 interleaved: one 4-byte group per d, row r in its low half (the
      // compiler vectorises this form; the element-by-element stores it did not)
      uint32_t* pair = reinterpret_cast<uint32_t*>(dst + r * D);
      const uint16_t* a = r < real ? reinterpret_cast<const uint16_t*>(row_of(r)) : nullptr;
      const uint16_t* b = r + 1 < real ? reinterpret_cast<const uint16_t*>(row_of(r + 1)) : nullptr;
      if (a && b) {
        for (int64_t d = 0; d < D; ++d) pair[d] = uint32_t(a[d]) | (uint32_t(b[d]) << 16);
      } else {
        for (int64_t d = 0; d < D; ++d) pair[d] = a ? uint32_t(a[d]) : 0u;
      }
    }
  }
}

// `count` rows (a multiple of 32; row r at row_of(r), rows [real, count) zeros) as AMX's
// tile-major B reduced over them (see the top): per step of 32 rows, 16 pairs of rows for each 16
// columns of D, D a multiple of 16.
template <typename scalar_t, typename RowOf>
void pack_rows_amx_tiles(RowOf row_of, int64_t real, int64_t count, int64_t D, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2, "AMX tiles of 16-bit types");
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t r = 0; r < count; r += 2) {
    const uint16_t* a = r < real ? reinterpret_cast<const uint16_t*>(row_of(r)) : nullptr;
    const uint16_t* b = r + 1 < real ? reinterpret_cast<const uint16_t*>(row_of(r + 1)) : nullptr;
    uint32_t* step = out + (r / 32) * 16 * D;  // 32 rows of D elements: 16 D pairs
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      uint32_t* pair = step + (d0 + (r % 32) / 2) * 16;
      if (a && b) {
        for (int64_t c = 0; c < 16; ++c) pair[c] = uint32_t(a[d0 + c]) | (uint32_t(b[d0 + c]) << 16);
      } else {
        for (int64_t c = 0; c < 16; ++c) pair[c] = a ? uint32_t(a[d0 + c]) : 0u;
      }
    }
  }
}

// `count` rows (a multiple of 16) as AMX's tile-major X^T (see the top): pack_columns_vnni once
// per group of 16 rows, with ld = 16.
template <typename scalar_t, typename RowOf>
void pack_columns_amx_tiles(RowOf row_of, int64_t real, int64_t count, int64_t D, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2, "AMX tiles of 16-bit types");
  for (int64_t r0 = 0; r0 < count; r0 += 16)
    pack_columns_vnni<scalar_t>([&](int64_t r) { return row_of(r0 + r); }, std::clamp<int64_t>(real - r0, 0, 16), 16,
                                D, 16, 2, dst + r0 * D);
}

}  // namespace headops::cpu::CPU_CAPABILITY
