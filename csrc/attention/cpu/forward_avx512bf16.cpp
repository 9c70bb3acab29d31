// The CPU forward kernel compiled for AVX512 with the BF16 extension (bfloat16 only; see forward_kernel.h).
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY_AVX512
#define HEADOPS_ISA_AVAILABLE 1
// headers (sleef.h, ATen's vec) select code by these macros; the pragma does not set them
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
#define CPU_CAPABILITY AVX512_BF16
#define HEADOPS_BF16_ONLY 1
#ifdef HEADOPS_ISA_AVAILABLE
#include "forward_kernel.h"
#endif
