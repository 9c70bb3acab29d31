// The one place that decides which instruction-set variant of a CPU kernel runs, as ATen's
// DispatchStub does: ATen's own choice (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), so headops vectorises like torch, plus the AVX512-BF16 variant for
// bfloat16 where the CPU has it.
//
// A kernel is compiled once per variant into namespaces DEFAULT, AVX2, AVX512 (and
// AVX512_BF16) by its <kernel>_<isa>.cpp files; its dispatcher declares them with
// HEADOPS_ISA_VARIANTS and calls HEADOPS_ISA_TABLE(fn).pick(dtype).
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace headops::cpu {

// "DEFAULT", "AVX2" or "AVX512": the variant this process runs.
const std::string& cpu_capability();

// Whether the bfloat16 variant compiled for AVX512-BF16 runs (HEADOPS_CPU_NO_BF16_VARIANT=1
// sends bfloat16 through the plain AVX-512 variant: tests).
bool runs_avx512_bf16_variant();

// Whether tiles run through oneDNN's brgemm on packed operands: bfloat16/float16 on AMX and
// AVX512-BF16/FP16, float on AVX-512; else float tiles run through BLAS sgemm and 16-bit ones are
// converted to float for it. HEADOPS_CPU_NO_PACKED=1 forces BLAS (tests sweep both paths on one
// machine).
bool uses_packed_operands(at::ScalarType dtype, int64_t head_dim);

// The layout of the B operands brgemm reads for `dtype` on this CPU, as the elements of one
// group along the reduction (cpu/vnni_pack.h): 2, VNNI pairs (16-bit types on AMX, bfloat16 on
// AVX512-BF16); 1, plain rows (float; float16 on AVX512-FP16 without AMX-FP16); 0 where brgemm
// does not run `dtype` natively. Measured once per process by a small exact product.
int64_t brgemm_pairs(at::ScalarType dtype);

// Whether `dtype`'s packed tiles run on AMX (torch's could_pack; 16-bit types only): the tile
// shapes that suit AMX differ from those of AVX512-BF16 (attention_fwd_cpu.cpp, attention_bwd_cpu.cpp).
bool uses_amx_tiles(at::ScalarType dtype, int64_t head_dim);

// Whether `dtype`'s AMX tiles run through headops' own loops (cpu/amx_tiles.h) rather than
// brgemm: bfloat16 with a head dim of whole tiles (HEADOPS_CPU_AMX_BY_ONEDNN=1: never).
bool runs_own_amx_tiles(at::ScalarType dtype, int64_t head_dim);

// Whether float16 tiles run as two bfloat16 parts each on headops' own AMX loops (the forward's
// SplitHalfOperands): where AMX has bfloat16 tiles but no float16 ones (brgemm_pairs(kHalf) is
// not 2), and the head dim is whole tiles.
bool splits_half_into_bf16_tiles(int64_t head_dim);

// Whether one float16 call takes that split: splits_half_into_bf16_tiles, and each key read by at
// least kHalfSplitRows query rows (seqlen_q x the GQA group), since the split packs two copies of
// K and V. On the AMX Xeon (2026-12-06, 4096 keys, D = 128, causal, alternating processes) the
// split against brgemm's float16: 1 query row of 16 heads 6.6-7.0 ms vs 4.0-4.1, 32 rows 7.8-8.0
// vs 6.4-6.6, 48 rows 8.6 vs 8.9, 64 rows 9.2-9.5 vs 10.4-10.6 (GQA: 16 queries x 4 heads a key
// 5.7-5.9 vs 6.9), 128 rows 13.7-15.5 vs 18.4-19.7.
constexpr int64_t kHalfSplitRows = 48;
bool call_splits_half_into_bf16_tiles(int64_t head_dim, int64_t rows_per_key);

// Whether float16 forward tiles are widened to float and run through float brgemm on K and V
// packed once (the forward's WidenedHalfOperands): where brgemm runs float tiles but has no
// float16 layout (brgemm_pairs(kHalf) == 0: AVX-512 without AVX512-FP16, the Zen 4/5 EPYCs).
// Without it such a call converts each tile to float for MKL's sgemm, which ran the float16
// forward at half the float32 forward's speed on the Zen 5 EPYC (it packs its operands on every
// call, and takes its AVX2 path on AMD CPUs).
bool widens_half_to_float_tiles(int64_t head_dim);
// ... and whether one call does: as many rows per key as a float call packs for
// (call_uses_packed_operands).
bool call_widens_half_to_float_tiles(int64_t head_dim, int64_t rows_per_key);

// The size of one core's L2 cache in bytes (cpuinfo, as torch reads it), or 0 where unknown:
// whether a tile's working set stays there decides some tile shapes.
int64_t l2_cache_bytes();

// Whether one call's tiles run through brgemm: uses_packed_operands, and for float only when each
// key is read by at least float_packing_rows(backward) query rows (seqlen_q x the GQA group):
// packing K and V costs a pass over them that BLAS, reading them in place, does not pay; with a
// few rows per key (a decode step through headops.attention, a chunk of a prefill over a long
// cache) that pass is most of the call. 16-bit types keep brgemm whatever the rows: on the AMX
// Xeon (2026-12-06, bfloat16, 4096 keys, D = 128, 16 / 16 heads) against float tiles through
// BLAS (converted), forward 1-8 rows 3.1-4.2 / 2.8-3.3 ms, 32 rows 3.0-4.4 / 5.0-5.4, 512 rows
// 14.1-14.8 / 52.0-52.7; backward 1 row 17.5-23.1 / 29.8-31.8, 512 rows 48.8-52.1 / 163-166.
bool call_uses_packed_operands(at::ScalarType dtype, int64_t head_dim, int64_t rows_per_key, bool backward);

// Where BLAS sgemm stops paying against packed brgemm tiles, by what runs the sgemm:
//  - MKL on an Intel CPU (its own AVX-512 kernels): forward from 192 rows, backward from 512.
//    2-core Emerald Rapids Xeon (2026-12-06, 4096 keys, D = 128, 16 / 16 heads, causal, one
//    process per setting, two rounds), packed / BLAS ms: forward 32 rows 14.3-14.7 / 5.7-5.9, 64
//    18.7-19.2 / 11.3-11.7, 128 24.1-27.0 / 19.3-20.0, 192 30.7-33.1 / 30.2-33.1, 256 37.7-40.2 /
//    39.7-43.0, 512 56.4-58.2 / 65.2-66.9; backward 32 rows 74-81 / 41, 128 104-110 / 72-73, 512
//    180-185 / 156-157, 1024 264-265 / 231-252. Causal self-attention, keys = rows, packs better
//    in the backward (each key meets half the rows on average): 512 rows 11.0-13.0 / 11.5-14.7 ms,
//    1024 rows 37.6-38.1 / 38.5-39.1 (2048: 131-136 / 132-134); hence 512, not the ~1024 of the
//    first table.
//  - elsewhere (MKL's generic AVX2 path on AMD, which packs its operands on every call; other
//    BLAS): 24 rows. Zen 5 (4096 keys, D = 64: 9 query / 3 KV heads, 1 query 0.5-0.7 ms packed vs
//    0.3 ms through sgemm; 16 / 16 heads, 16 queries 4.7 vs 4.4 ms, 32 queries 5.3 vs 6.3 ms).
// HEADOPS_CPU_FLOAT_PACKING_ROWS=N sets both (tests sweep the packed float path with N = 1).
int64_t float_packing_rows(bool backward);

template <typename Fn>
struct IsaVariants {
  Fn* portable;
  Fn* avx2;         // nullptr where the build has no x86 variants
  Fn* avx512;
  Fn* avx512_bf16;  // nullptr: bfloat16 runs the AVX512 variant

  Fn* pick(at::ScalarType dtype) const {
    const std::string& capability = cpu_capability();
    if (capability == "AVX512" && avx512 != nullptr) {
      if (dtype == at::kBFloat16 && avx512_bf16 != nullptr && runs_avx512_bf16_variant()) return avx512_bf16;
      return avx512;
    }
    if (capability == "AVX2" && avx2 != nullptr) return avx2;
    return portable;
  }
};

}  // namespace headops::cpu

// Declares `ret fn params` in every variant namespace of the enclosing namespace.
#define HEADOPS_ISA_VARIANTS(ret, fn, params) \
  namespace DEFAULT {                         \
  ret fn params;                              \
  }                                           \
  namespace AVX2 {                            \
  ret fn params;                              \
  }                                           \
  namespace AVX512 {                          \
  ret fn params;                              \
  }                                           \
  namespace AVX512_BF16 {                     \
  ret fn params;                              \
  }

// The variants of fn (declared by HEADOPS_ISA_VARIANTS); _WITH_BF16 when fn also has an
// AVX512_BF16 variant. The x86 variants exist only in x86-64 builds (isa_target.h).
#if defined(__x86_64__)
#define HEADOPS_ISA_TABLE(fn) \
  ::headops::cpu::IsaVariants<decltype(DEFAULT::fn)>{&DEFAULT::fn, &AVX2::fn, &AVX512::fn, nullptr}
#define HEADOPS_ISA_TABLE_WITH_BF16(fn) \
  ::headops::cpu::IsaVariants<decltype(DEFAULT::fn)>{&DEFAULT::fn, &AVX2::fn, &AVX512::fn, &AVX512_BF16::fn}
#else
#define HEADOPS_ISA_TABLE(fn) ::headops::cpu::IsaVariants<decltype(DEFAULT::fn)>{&DEFAULT::fn, nullptr, nullptr, nullptr}
#define HEADOPS_ISA_TABLE_WITH_BF16(fn) HEADOPS_ISA_TABLE(fn)
#endif
