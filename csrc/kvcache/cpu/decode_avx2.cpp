// The CPU decode-attention kernel compiled for AVX2 (see decode_kernel.h).
#define HEADOPS_TARGET_AVX2 1
#include "../../cpu/isa_target.h"
#ifdef HEADOPS_ISA_AVAILABLE
#include "decode_kernel.h"
#endif
