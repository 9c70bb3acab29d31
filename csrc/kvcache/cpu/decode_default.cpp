// The CPU decode-attention kernel, portable build (see decode_kernel.h).
#define CPU_CAPABILITY DEFAULT
#include "decode_kernel.h"
