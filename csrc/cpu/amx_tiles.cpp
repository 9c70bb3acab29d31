// AMX bfloat16 tile products (amx_tiles.h). Every tile is configured as 16 rows of 64 bytes
// (16 x 32 bfloat16 for A, 16 pairs x 16 columns for B, 16 x 16 float for C), so one
// configuration serves every call: C tiles 0-3 as a 2 x 2 block, A tiles 4-5, B tiles 6-7.
// Partial shapes are padded (amx_tiles.h) rather than configured, since loading a configuration
// clears the tiles. B operands are tile-major (cpu/vnni_pack.h): each B tile one contiguous KiB.
#include "amx_tiles.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HEADOPS_AMX_BUILT 1
#pragma GCC target("amx-tile,amx-bf16")
#include <immintrin.h>
#endif

namespace headops::cpu::AMX {

#if defined(HEADOPS_AMX_BUILT)
namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kTileK = 32;     // bfloat16 elements of A's row in one tile (64 bytes)
constexpr int64_t kTileCols = 16;  // float columns of a C tile
constexpr int64_t kTileBytes = 64;  // bytes of a tile's row, and the stride of a contiguous tile

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

constexpr TileConfig every_tile_16_by_64() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.bytes_per_row[t] = kTileBytes;
  }
  return config;
}

// In static storage, not on the stack: GCC 12's _tile_loadconfig tells the compiler it reads 8
// bytes, so the stores that fill a local configuration were dropped as dead.
alignas(64) constexpr TileConfig kTileConfig = every_tile_16_by_64();

// CPUID leaf 7: AMX-BF16 is EDX bit 22, AMX-TILE bit 24 (read directly: the cpuinfo accessors
// torch's headers declare answered false on the AMX Xeon, and GCC 12's __builtin_cpu_supports
// does not know AMX).
bool cpu_has_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx >> 22 & 1) && (edx >> 24 & 1);
}

// Linux hands out the tile data state on request only (arch_prctl ARCH_REQ_XCOMP_PERM).
bool os_grants_tiles() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// C tiles (i, j) of a 2 x 2 block are 2i + j; A tiles 4 + i; B tiles 6 + j. The tile numbers
// are immediates (GCC's intrinsics paste them into the instruction's text as literals), hence
// the templates over the block's rows (MB) and columns (NB) of tiles, and the four spelled-out
// lines of each of zero_c, load_c and store_c.
template <int MB, int NB>
inline void zero_c() {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (MB > 1) _tile_zero(2);
  if constexpr (MB > 1 && NB > 1) _tile_zero(3);
}

template <int MB, int NB>
inline void load_c(const float* c, int64_t ldc) {
  const int64_t stride = ldc * 4;
  _tile_loadd(0, c, stride);
  if constexpr (NB > 1) _tile_loadd(1, c + kTileCols, stride);
  if constexpr (MB > 1) _tile_loadd(2, c + kTileRows * ldc, stride);
  if constexpr (MB > 1 && NB > 1) _tile_loadd(3, c + kTileRows * ldc + kTileCols, stride);
}

template <int MB, int NB>
inline void store_c(float* c, int64_t ldc) {
  const int64_t stride = ldc * 4;
  _tile_stored(0, c, stride);
  if constexpr (NB > 1) _tile_stored(1, c + kTileCols, stride);
  if constexpr (MB > 1) _tile_stored(2, c + kTileRows * ldc, stride);
  if constexpr (MB > 1 && NB > 1) _tile_stored(3, c + kTileRows * ldc + kTileCols, stride);
}

// One step of 32 along the reduction: a points at A's first row of the block at this step; b0
// and b1 at the step's B tiles of the block's two column tiles (contiguous, tile-major).
template <int MB, int NB>
inline void step(const uint16_t* a, int64_t lda, const uint16_t* b0, const uint16_t* b1) {
  const int64_t a_stride = lda * 2;
  _tile_loadd(4, a, a_stride);
  _tile_loadd(6, b0, kTileBytes);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (NB > 1) {
    _tile_loadd(7, b1, kTileBytes);
    _tile_dpbf16ps(1, 4, 7);
  }
  if constexpr (MB > 1) {
    _tile_loadd(5, a + kTileRows * lda, a_stride);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
}

// The T products a C block sums (one, or the three of two-part operands), as (A, B) pairs at
// the same offsets: the block's C stays in the tile registers across all of them, loaded and
// stored once. (Summing three products through C in memory, each pass storing the 128 KiB a
// float tile takes, made the whole float16 forward 1.14-1.2x as long on the AMX Xeon.)
template <int T>
struct Products {
  const uint16_t* a[T];
  const uint16_t* b[T];
  Products at(int64_t a_offset, int64_t b_offset) const {
    Products moved = *this;
    for (int t = 0; t < T; ++t) {
      moved.a[t] += a_offset;
      moved.b[t] += b_offset;
    }
    return moved;
  }
};

// S's block of rows [m, m + 16 MB) x keys [n, n + 16 NB); b at the block's first key group.
template <int MB, int NB, int T>
void scores_block(int64_t K, const Products<T>& x, int64_t lda, float* c, int64_t ldc, bool add_c) {
  if (add_c)
    load_c<MB, NB>(c, ldc);
  else
    zero_c<MB, NB>();
  const int64_t group = kKeyGroup * K;  // elements of one key group's K^T
  for (int t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; k += kTileK)
      step<MB, NB>(x.a[t] + k, lda, x.b[t] + k * kKeyGroup, x.b[t] + group + k * kKeyGroup);
  store_c<MB, NB>(c, ldc);
}

// The rows inner: a block of keys' B tiles stay in L1 while the rows pass over them.
template <int NB, int T>
void scores_columns(int64_t M, int64_t K, const Products<T>& x, int64_t lda, float* c, int64_t ldc, bool add_c) {
  int64_t m = 0;
  for (; m + 2 * kTileRows <= M; m += 2 * kTileRows)
    scores_block<2, NB>(K, x.at(m * lda, 0), lda, c + m * ldc, ldc, add_c);
  if (m < M) scores_block<1, NB>(K, x.at(m * lda, 0), lda, c + m * ldc, ldc, add_c);
}

template <int T>
void scores_of(int64_t M, int64_t N, int64_t K, const Products<T>& x, int64_t lda, float* c, int64_t ldc, bool add_c) {
  TORCH_CHECK(M % kTileRows == 0 && N % kKeyGroup == 0 && K % kTileK == 0, "headops: AMX scores of an unpadded shape");
  // rows in chunks whose A parts stay in L1 (32 KiB of it) while the key blocks pass
  const int64_t a_parts = T == 1 ? 1 : 2;
  const int64_t chunk =
      std::max<int64_t>(2 * kTileRows, 32768 / (K * 2 * a_parts) / (2 * kTileRows) * (2 * kTileRows));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    int64_t n = 0;
    for (; n + 2 * kKeyGroup <= N; n += 2 * kKeyGroup)
      scores_columns<2>(rows, K, x.at(m0 * lda, n * K), lda, c + m0 * ldc + n, ldc, add_c);
    if (n < N) scores_columns<1>(rows, K, x.at(m0 * lda, n * K), lda, c + m0 * ldc + n, ldc, add_c);
  }
}

// O's block of rows [0, 16 MB) x columns [n, n + 32), over every step of keys.
template <int MB, int T>
void accumulate_block(int64_t N, int64_t n, int64_t K, const Products<T>& x, int64_t lda, float* c, int64_t ldc) {
  load_c<MB, 2>(c + n, ldc);
  const int64_t tile = kTileRows * 2 * kTileCols;  // elements of one B tile
  for (int t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; k += kKeyStep) {
      const uint16_t* b_step = x.b[t] + k * N + (n / kTileCols) * tile;
      step<MB, 2>(x.a[t] + k, lda, b_step, b_step + tile);
    }
  store_c<MB, 2>(c + n, ldc);
}

template <int T>
void accumulate_of(int64_t M, int64_t N, int64_t K, const Products<T>& x, int64_t lda, float* c, int64_t ldc) {
  TORCH_CHECK(N % (2 * kTileCols) == 0 && K % kKeyStep == 0, "headops: AMX accumulate of an unpadded shape");
  const int64_t whole = M / kTileRows * kTileRows;
  // the rows outer: a block's A rows stay in L1 while B's column tiles pass (B outer, or B's
  // column tiles shared by 64 rows, were 2-4 % slower in the bf16 forward at S = 4096)
  for (int64_t m = 0; m < whole; m += 2 * kTileRows) {
    for (int64_t n = 0; n < N; n += 2 * kTileCols) {
      if (whole - m > kTileRows)
        accumulate_block<2>(N, n, K, x.at(m * lda, 0), lda, c + m * ldc, ldc);
      else
        accumulate_block<1>(N, n, K, x.at(m * lda, 0), lda, c + m * ldc, ldc);
    }
  }
  if (whole == M) return;
  // the last M % 16 rows of C through a tile of its own: C's rows past M may be someone else's
  const int64_t rows = M - whole;
  std::vector<float> tail(kTileRows * N, 0.f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(tail.data() + r * N, c + (whole + r) * ldc, N * sizeof(float));
  for (int64_t n = 0; n < N; n += 2 * kTileCols) accumulate_block<1>(N, n, K, x.at(whole * lda, 0), lda, tail.data(), N);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(c + (whole + r) * ldc, tail.data() + r * N, N * sizeof(float));
}

bool disabled_by_environment() { return std::getenv("HEADOPS_CPU_AMX_BY_ONEDNN") != nullptr; }

}  // namespace

bool bf16_tiles_available() {
  static const bool available = !disabled_by_environment() && cpu_has_amx_bf16() && os_grants_tiles();
  return available;
}

void bind_thread() {
  at::native::cpublas::brgemm_release(true);
  _tile_loadconfig(&kTileConfig);
}

void end_products(bool own_loops, bool brgemm_vnni) {
  if (own_loops)
    _tile_release();
  else
    at::native::cpublas::brgemm_release(brgemm_vnni);
}

void scores(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, float* c, int64_t ldc,
            bool add_c) {
  scores_of<1>(M, N, K, Products<1>{{a}, {b}}, lda, c, ldc, add_c);
}

void accumulate(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
                int64_t ldc) {
  accumulate_of<1>(M, N, K, Products<1>{{a}, {b}}, lda, c, ldc);
}

void split_scores(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                  const uint16_t* b_hi, const uint16_t* b_lo, float* c, int64_t ldc) {
  scores_of<3>(M, N, K, Products<3>{{a_hi, a_hi, a_lo}, {b_hi, b_lo, b_hi}}, lda, c, ldc, false);
}

void split_accumulate(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                      const uint16_t* b_hi, const uint16_t* b_lo, float* c, int64_t ldc) {
  accumulate_of<3>(M, N, K, Products<3>{{a_hi, a_hi, a_lo}, {b_hi, b_lo, b_hi}}, lda, c, ldc);
}

void scores_split_a(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                    const uint16_t* b, float* c, int64_t ldc) {
  scores_of<2>(M, N, K, Products<2>{{a_hi, a_lo}, {b, b}}, lda, c, ldc, false);
}

void accumulate_split_a(int64_t M, int64_t N, int64_t K, const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda,
                        const uint16_t* b, float* c, int64_t ldc) {
  accumulate_of<2>(M, N, K, Products<2>{{a_hi, a_lo}, {b, b}}, lda, c, ldc);
}

#else  // no AMX code in this build

bool bf16_tiles_available() { return false; }
void bind_thread() {}
void end_products(bool, bool brgemm_vnni) { at::native::cpublas::brgemm_release(brgemm_vnni); }
void scores(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t, bool) {
  TORCH_CHECK(false, "headops: this build has no AMX tiles");
}
void accumulate(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t) {
  TORCH_CHECK(false, "headops: this build has no AMX tiles");
}
void split_scores(int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*,
                  const uint16_t*, float*, int64_t) {
  TORCH_CHECK(false, "headops: this build has no AMX tiles");
}
void split_accumulate(int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*,
                      const uint16_t*, float*, int64_t) {
  TORCH_CHECK(false, "headops: this build has no AMX tiles");
}
void scores_split_a(int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*, float*,
                    int64_t) {
  TORCH_CHECK(false, "headops: this build has no AMX tiles");
}
void accumulate_split_a(int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*, float*,
                        int64_t) {
  TORCH_CHECK(false, "headops: this build has no AMX tiles");
}

#endif

void copy_padded_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * cols, src + r * ld, cols * sizeof(uint16_t));
  std::fill(dst + rows * cols, dst + padded_rows(rows) * cols, uint16_t(0));
}

}  // namespace headops::cpu::AMX
