// Raw-pointer description of one attention call, filled from tensors by the dispatcher and
// read by the CPU and CUDA kernels. No torch headers: .cu files include it cheaply.
#pragma once

#include <cstdint>

namespace headops {

// A per-head value laid out as [B, Hq] with element strides (stride 0 = broadcast).
struct PerHead {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_h = 0;
  bool present() const { return ptr != nullptr; }
  template <typename T>
  T at(int64_t b, int64_t h) const { return static_cast<const T*>(ptr)[b * stride_b + h * stride_h]; }
};

// A per-head row laid out as [B, Hq, N] (out_scale/out_bias: N = D; key_bias: N = Sk).
struct PerHeadRow {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_h = 0;
  int64_t stride_n = 0;
  bool present() const { return ptr != nullptr; }
  template <typename T>
  const T* row(int64_t b, int64_t h) const { return static_cast<const T*>(ptr) + b * stride_b + h * stride_h; }
};

// [B, S, H, D] addressing with element strides; the last dim is contiguous.
struct HeadTensor {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_s = 0;
  int64_t stride_h = 0;
  template <typename T>
  const T* row(int64_t b, int64_t s, int64_t h) const {
    return static_cast<const T*>(ptr) + b * stride_b + s * stride_s + h * stride_h;
  }
};

struct AttentionParams {
  HeadTensor q, k, v;
  HeadTensor out;  // written through a const-cast in the kernels
  void* lse = nullptr;  // [B, Hq, Sq] contiguous, acc dtype
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  bool causal = true;
  double default_softmax_scale = 1.0;
  bool skip_zero_gate = true;  // false when the gate's gradient is wanted even where it is 0

  // float per-head values are stored in the accumulation dtype (float, or double for float64)
  PerHead softmax_scale, window, sinks, alpha, sink_logit, gate;  // window/sinks: int64
  PerHeadRow key_bias, out_scale, out_bias;

  int64_t group() const { return heads_q / heads_kv; }
};

}  // namespace headops
