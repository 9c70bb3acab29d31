// The CPU forward kernel compiled for AVX2 (see forward_kernel.h).
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY_AVX2
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
#endif
#define CPU_CAPABILITY AVX2
#ifdef HEADOPS_ISA_AVAILABLE
#include "forward_kernel.h"
#endif
