// The CPU forward kernel compiled for AVX-512 (see forward_kernel.h).
#define HEADOPS_TARGET_AVX512 1
#include "../../cpu/isa_target.h"
#ifdef HEADOPS_ISA_AVAILABLE
#include "forward_kernel.h"
#endif
