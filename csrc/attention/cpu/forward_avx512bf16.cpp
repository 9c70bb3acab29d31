// The CPU forward kernel compiled for AVX-512 with the BF16 extension, bfloat16 only: one
// instruction rounds float probabilities to bfloat16 (see forward_kernel.h).
#define HEADOPS_TARGET_AVX512_BF16 1
#include "../../cpu/isa_target.h"
#define HEADOPS_BF16_ONLY 1
#ifdef HEADOPS_ISA_AVAILABLE
#include "forward_kernel.h"
#endif
