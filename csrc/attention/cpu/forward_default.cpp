// The CPU forward kernel compiled without SIMD extensions (any CPU; see forward_kernel.h).
#define CPU_CAPABILITY DEFAULT
#include "forward_kernel.h"
