// The CPU decode-attention kernel compiled for AVX-512 with the BF16 extension, bfloat16 only:
// its score product multiplies stored pairs with vdpbf16ps (see decode_kernel.h).
#define HEADOPS_TARGET_AVX512_BF16 1
#include "../../cpu/isa_target.h"
#define HEADOPS_BF16_ONLY 1
#ifdef HEADOPS_ISA_AVAILABLE
#include "decode_kernel.h"
#endif
