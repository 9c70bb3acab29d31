// The CUDA kernels' float conversions of the stored dtypes and the exp/log functors their
// online softmaxes take (online_softmax.h): one home for the attention forward and backward
// and the cache's decode. The kernels accumulate in float whatever the stored dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace headops {
namespace cuda {

template <typename T>
struct TypeOps;

template <>
struct TypeOps<float> {
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
};
template <>
struct TypeOps<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  // two floats rounded into one 32-bit register (an mma.sync operand)
  __device__ static uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct TypeOps<__half> {
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static uint32_t pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// natural units (the generic kernels, the backward, the decode) ...
struct FastExp {
  __device__ __forceinline__ float operator()(float x) const { return __expf(x); }
};
struct FastLog {
  __device__ __forceinline__ float operator()(float x) const { return __logf(x); }
};
// ... and log2 units (the tensor-core forward: logits pre-multiplied by log2 e)
struct Exp2 {
  __device__ __forceinline__ float operator()(float x) const { return exp2f(x); }
};
struct Log2 {
  __device__ __forceinline__ float operator()(float x) const { return log2f(x); }
};

}  // namespace cuda
}  // namespace headops
