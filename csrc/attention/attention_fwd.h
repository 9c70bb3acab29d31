#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "attention_args.h"
#include "attention_params.h"

namespace headops {

using OptTensor = std::optional<at::Tensor>;

// A forward call checked and laid out: the inputs as the kernels read them, the output and lse
// allocated, the params filled (the saved branches and probes left to the op).
struct ForwardCall {
  Dims d;
  at::ScalarType acc;
  at::Tensor q, k, v, out, lse;
  AttentionParams p;
};
ForwardCall prepare_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            bool heads_first, double default_scale, const PerHeadArgs& args);

// headops::attention_fwd: checks every argument (TORCH_CHECK), lays the tensors out as an
// AttentionParams and runs the kernel of q's device. Returns (out, lse, o_stream, o_full,
// lse_full); the last three (each branch's average and the full branch's lse, kept for the
// backward) are empty unless save_for_backward. precise_probabilities: 16-bit inputs read the
// probabilities of P V to ~2**-17 rather than rounded to their dtype: on the CPU in two bfloat16
// parts or float (float16 does so whenever it saves for the backward), on CUDA in float (the
// generic kernel). sequence_ids ([B, S] integer, or none): sequences packed into each row, each
// attended alone from its first token (packed_sequences.h). key_lengths ([B] integer, or none):
// each row's keys end there, its queries the last positions before it (key_lengths.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, bool heads_first,
    double default_scale, const OptTensor& softmax_scale, const OptTensor& window, const OptTensor& sinks,
    const OptTensor& alpha, const OptTensor& key_bias, const OptTensor& sink_logit, const OptTensor& out_scale,
    const OptTensor& out_bias, const OptTensor& gate, bool skip_zero_gate, bool skip_unused_branch,
    bool save_for_backward, bool precise_probabilities, const OptTensor& sequence_ids,
    const OptTensor& key_lengths);

}  // namespace headops
