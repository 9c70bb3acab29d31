// The CPU forward kernel compiled for DEFAULT (see forward_kernel.h).

#define CPU_CAPABILITY DEFAULT
#include "forward_kernel.h"
