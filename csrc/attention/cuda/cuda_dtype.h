// The CUDA kernels' dtype tag (forward_kernel.cuh's DType) of a tensor's scalar type, for the
// host code of every CUDA op (attention forward, cache append and decode). Host only: torch
// headers stay out of the .cu files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "forward_kernel.cuh"

namespace headops::cuda {

// `op`: the refusing op's name prefix ("headops.decode_attention: "); float64 is CPU only.
inline DType dtype_of(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: TORCH_CHECK(false, op, "float64 is CPU only (CUDA: float32, bfloat16, float16)");
    default: TORCH_CHECK(false, op, "dtype ", t, " is not supported on CUDA (float32, bfloat16, float16)");
  }
  return DType::kFloat32;
}

}  // namespace headops::cuda
