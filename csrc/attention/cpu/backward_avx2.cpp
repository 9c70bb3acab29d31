// The CPU backward kernel compiled for AVX2 (see backward_kernel.h).
#define HEADOPS_TARGET_AVX2 1
#include "../../cpu/isa_target.h"
#ifdef HEADOPS_ISA_AVAILABLE
#include "backward_kernel.h"
#endif
