// Compiles the rest of a translation unit for one x86 instruction set: included first by the
// <kernel>_<isa>.cpp files with HEADOPS_TARGET_AVX2, _AVX512 or _AVX512_BF16 defined, and
// defines CPU_CAPABILITY (the variant's namespace: AVX2, AVX512, AVX512_BF16). Includes
// the baseline prelude (isa_prelude.h: why), then sets the code generation target and the
// feature macros (sleef.h and ATen's vec headers select code by them; the pragma alone does
// not set them).
#pragma once

#include "isa_prelude.h"

#if defined(__x86_64__)
#define HEADOPS_ISA_AVAILABLE 1

#if defined(HEADOPS_TARGET_AVX512_BF16)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define HEADOPS_TARGET_AVX512 1
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif
#elif defined(HEADOPS_TARGET_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

#if defined(HEADOPS_TARGET_AVX512_BF16)
#define CPU_CAPABILITY AVX512_BF16
#elif defined(HEADOPS_TARGET_AVX512)
#define CPU_CAPABILITY AVX512
#else
#define CPU_CAPABILITY AVX2
#endif

#if defined(HEADOPS_TARGET_AVX512)
// GCC 12 reports '__Y is used uninitialized' inside its own avx512fintrin.h for every inlined
// _mm512_undefined_* that ATen's vec512 code reaches (GCC bug 105593; hundreds per build). The
// same kernel code is compiled with the warning on in the AVX2 and DEFAULT translation units.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#else
#define CPU_CAPABILITY_AVX2
#endif

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif  // __x86_64__
