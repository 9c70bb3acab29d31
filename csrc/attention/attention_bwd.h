#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace headops {

using OptTensor = std::optional<at::Tensor>;

// Order of needs_grad and of the returned gradients (an empty tensor where not wanted).
enum BackwardGrad : int {
  kGradQ = 0, kGradK, kGradV, kGradSoftmaxScale, kGradAlpha, kGradKeyBias, kGradSinkLogit, kGradOutScale,
  kGradOutBias, kGradGate, kNumBackwardGrads
};
// The attention_fwd argument each gradient belongs to, in BackwardGrad order: the autograd glue
// (python/headops/_autograd.py) places the gradients by these names.
inline constexpr const char* kBackwardGradNames[kNumBackwardGrads] = {
    "q", "k", "v", "softmax_scale", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate"};

// headops::attention_bwd: the gradients of attention_fwd's inputs from dL/dout (and dL/dlse),
// the inputs and what the forward saved. Checks every argument (TORCH_CHECK). sequence_ids: the
// forward's (packed rows, packed_sequences.h), key_lengths too (key_lengths.h).
std::vector<at::Tensor> attention_bwd(
    const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o_stream, const at::Tensor& lse, const OptTensor& o_full, const OptTensor& lse_full,
    bool causal, bool heads_first, double default_scale, const OptTensor& softmax_scale, const OptTensor& window,
    const OptTensor& sinks, const OptTensor& alpha, const OptTensor& key_bias, const OptTensor& sink_logit,
    const OptTensor& out_scale, const OptTensor& out_bias, const OptTensor& gate, bool skip_zero_gate,
    at::IntArrayRef needs_grad, const OptTensor& sequence_ids, const OptTensor& key_lengths);

}  // namespace headops
