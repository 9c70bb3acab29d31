// Sequences packed into the rows of one self-attention call (a training batch flattened by
// transformers' DataCollatorWithFlattening, FlashAttention's variable-length rows): sequence_ids
// [B, S] gives each token its sequence, a sequence being a run of one id. Each sequence is
// attended alone, its positions counted from its first token (its sinks, its key_bias by
// position), as it would be in a batch of its own. The ops split the call into runs of
// consecutive sequences of one length, each a strided view of the row (no copy of q, k, v), and
// run the unchanged kernels on them: no S x S memory, no work across sequences.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention_args.h"

namespace headops {

// `count` consecutive sequences of `length` tokens each, from token `start` of batch row `row`.
struct SequenceRun {
  int64_t row, start, length, count;
};

// The runs of every row, in row and token order; empty where no row holds more than one sequence
// (the call is then one ordinary call). Checks sequence_ids (an integer [B, S] tensor on the CPU
// or q's device; S = Sq = Sk); a CUDA tensor is read with one device-to-host copy, refused while
// a CUDA graph is captured.
std::vector<SequenceRun> packed_runs(const char* op, const std::optional<at::Tensor>& sequence_ids, const Dims& d,
                                     const at::Tensor& q);

// A run's [count, ...] view of a tensor of the call: q, k, v, out or dout in their layout
// (heads_first: [B, H, S, D], else [B, S, H, D]), or one with heads before the sequence whatever
// the layout ([B, H, S] lse, [B, H, S, D] saved averages: heads_first = true).
at::Tensor run_view(const at::Tensor& t, const SequenceRun& run, bool heads_first);

// The per-head arguments of a run: its row's, repeated for its `count` sequences (an expand),
// key_bias over the first `length` keys (its positions from each sequence's first token).
struct RunHeadArgs {
  OptTensor softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate;
  RunHeadArgs(const PerHeadArgs& args, const SequenceRun& run);
  PerHeadArgs view() const {
    return {softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate};
  }
};

// Adds a run's gradient of a per-head argument ([count, Hq, ...]; key_bias, `over_keys`: [count,
// Hq, length]) into the call's ([B, Hq, ...]) at the run's row (key_bias: its first `length`
// keys), summed over the run's sequences in order. Nothing where either is empty (not wanted).
void add_run_gradient(at::Tensor& whole, const at::Tensor& run_grad, const SequenceRun& run, bool over_keys = false);

}  // namespace headops
