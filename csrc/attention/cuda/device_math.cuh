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

// The floats held by 32-bit words of a stored dtype (kPerWord per word, in memory order): how
// the decode reads key and value rows staged in shared memory by 16-byte copies.
template <typename T>
struct WordFloats;
template <>
struct WordFloats<float> {
  static constexpr int kPerWord = 1;
  __device__ static void unpack(uint32_t w, float* out) { out[0] = __uint_as_float(w); }
};
template <>
struct WordFloats<__nv_bfloat16> {
  static constexpr int kPerWord = 2;
  // a bfloat16 is the high half of a float's bits (little-endian: the first element is the low half)
  __device__ static void unpack(uint32_t w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
};
template <>
struct WordFloats<__half> {
  static constexpr int kPerWord = 2;
  __device__ static void unpack(uint32_t w, float* out) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    out[0] = f.x;
    out[1] = f.y;
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
