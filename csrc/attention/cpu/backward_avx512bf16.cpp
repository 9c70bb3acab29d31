// The CPU backward kernel compiled for AVX-512 with the BF16 extension, bfloat16 only: one
// instruction rounds the float rows the brgemm products read (dS, P, dL/do) to bfloat16 (see
// backward_products.h).
#define HEADOPS_TARGET_AVX512_BF16 1
#include "../../cpu/isa_target.h"
#define HEADOPS_BF16_ONLY 1
#ifdef HEADOPS_ISA_AVAILABLE
#include "backward_kernel.h"
#endif
