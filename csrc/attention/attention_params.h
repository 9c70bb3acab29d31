// Raw-pointer description of one attention call, filled from tensors by the dispatcher and
// read by the CPU and CUDA kernels. No torch headers: .cu files include it cheaply.
#pragma once

#include <cstdint>

#include "probe_params.h"

// The accessors are callable from CUDA kernels too (the struct is passed by value to them).
#if defined(__CUDACC__)
#define HEADOPS_PARAMS_HD __host__ __device__ __forceinline__
#else
#define HEADOPS_PARAMS_HD inline
#endif

namespace headops {

// A per-head value laid out as [B, Hq] with element strides (stride 0 = broadcast).
struct PerHead {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_h = 0;
  HEADOPS_PARAMS_HD bool present() const { return ptr != nullptr; }
  template <typename T>
  HEADOPS_PARAMS_HD T at(int64_t b, int64_t h) const { return static_cast<const T*>(ptr)[b * stride_b + h * stride_h]; }
};

// A per-head row laid out as [B, Hq, N] (out_scale/out_bias: N = D; key_bias: N = Sk).
struct PerHeadRow {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_h = 0;
  int64_t stride_n = 0;
  HEADOPS_PARAMS_HD bool present() const { return ptr != nullptr; }
  template <typename T>
  HEADOPS_PARAMS_HD const T* row(int64_t b, int64_t h) const { return static_cast<const T*>(ptr) + b * stride_b + h * stride_h; }
};

// [B, S, H, D] addressing with element strides; the last dim is contiguous.
struct HeadTensor {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_s = 0;
  int64_t stride_h = 0;
  template <typename T>
  HEADOPS_PARAMS_HD const T* row(int64_t b, int64_t s, int64_t h) const {
    return static_cast<const T*>(ptr) + b * stride_b + s * stride_s + h * stride_h;
  }
};

struct AttentionParams {
  HeadTensor q, k, v;
  HeadTensor out;  // written through a const-cast in the kernels
  void* lse = nullptr;  // [B, Hq, Sq] contiguous, acc dtype: the streaming branch's (the full one's if absent)
  // kept for the backward when not null ([B, Hq, Sq, D] / [B, Hq, Sq] contiguous, acc dtype):
  // each branch's attention average before mixing and epilogue, and the full branch's lse
  void* o_stream = nullptr;
  void* o_full = nullptr;
  void* lse_full = nullptr;
  bool saves_for_backward() const { return o_stream != nullptr; }
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  bool causal = true;
  double default_softmax_scale = 1.0;
  bool skip_zero_gate = true;      // false when the gate's gradient is wanted even where it is 0
  bool skip_unused_branch = true;  // false when alpha's gradient is wanted even where it is 0 or 1
  bool precise_probabilities = false;  // 16-bit inputs: P V reads P to ~2**-17, not rounded

  // float per-head values are stored in the accumulation dtype (float, or double for float64)
  PerHead softmax_scale, window, sinks, alpha, sink_logit, gate;  // window/sinks: int64
  PerHeadRow key_bias, out_scale, out_bias;

  const ProbeParams* probe = nullptr;  // the statistics a probe call computes (CPU only), or none

  HEADOPS_PARAMS_HD int64_t group() const { return heads_q / heads_kv; }
};

// The backward of one call: the forward's description (inputs in the accumulation dtype, the
// saved branch averages and lse) plus the output gradient, and where each gradient goes.
// A null output pointer means that gradient is not wanted (and not computed).
struct BackwardParams {
  AttentionParams fwd;
  HeadTensor dout;             // [B, S, Hq, D] addressing of dL/dout, acc dtype (on the CPU a broadcast
                               // gradient keeps stride 0 across batch, sequence or heads)
  const void* dlse = nullptr;  // [B, Hq, Sq] contiguous dL/dlse (streaming branch), or null
  bool skipped_zero_gate = true;  // the forward skipped heads whose gate is 0: nothing of them is saved

  // q's layout; dk, dv: k's layout but with Hq heads (per query head, the caller sums GQA
  // groups). The CPU kernel writes every element of them (the dispatcher allocates them
  // uninitialised); the CUDA kernel accumulates into zeros.
  HeadTensor dq;
  HeadTensor dk, dv;
  bool want_dq = false, want_dk = false, want_dv = false;
  // [B, Hq] contiguous
  void* dsoftmax_scale = nullptr;
  void* dalpha = nullptr;
  void* dsink_logit = nullptr;
  void* dgate = nullptr;
  void* dkey_bias = nullptr;  // [B, Hq, Sk] contiguous (key_bias itself is passed contiguous)
  void* dout_scale = nullptr;  // [B, Hq, D] contiguous (out_scale/out_bias passed contiguous)
  void* dout_bias = nullptr;

  bool needs_key_loop() const { return want_dq || want_dk || want_dv || dsoftmax_scale || dkey_bias; }
};

}  // namespace headops
