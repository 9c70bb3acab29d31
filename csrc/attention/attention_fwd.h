#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace headops {

// headops::attention_fwd: checks every argument (TORCH_CHECK), lays the tensors out as an
// AttentionParams and runs the kernel of q's device. Returns (out, lse).
std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, bool heads_first,
    double default_scale, const std::optional<at::Tensor>& softmax_scale, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_bias,
    const std::optional<at::Tensor>& gate, bool skip_zero_gate);

}  // namespace headops
