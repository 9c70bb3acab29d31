// The CPU backward kernel, portable build (see backward_kernel.h).
#define CPU_CAPABILITY DEFAULT
#include "backward_kernel.h"
