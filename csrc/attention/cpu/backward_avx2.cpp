// The CPU backward kernel compiled for AVX2 (see backward_kernel.h).
#define HEADOPS_TARGET_AVX2 1
#include "isa_target.h"
#define CPU_CAPABILITY AVX2
#ifdef HEADOPS_ISA_AVAILABLE
#include "backward_kernel.h"
#endif
