#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace headops {

using OptTensor = std::optional<at::Tensor>;

// headops::attention_probe: the forward (no alpha) and the probe statistics of DESIGN section 5,
// in the same pass over the keys (the key mass in one more pass with the lse). Returns (out,
// lse, span_mass, distance_mass, sink_mass, entropy, topk_index, topk_prob, key_mass); a
// statistic not asked for is an empty tensor. CPU only: CUDA tensors raise NotImplementedError.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_probe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, bool heads_first,
                double default_scale, const OptTensor& softmax_scale, const OptTensor& window, const OptTensor& sinks,
                const OptTensor& key_bias, const OptTensor& sink_logit, const OptTensor& out_scale,
                const OptTensor& out_bias, const OptTensor& gate, const OptTensor& spans, const OptTensor& distances,
                bool sink_mass, int64_t topk, bool entropy, at::OptionalIntArrayRef key_mass_rows);

}  // namespace headops
