// Sequences packed into the rows of one self-attention call (a training batch flattened by
// transformers' DataCollatorWithFlattening, FlashAttention's variable-length rows): sequence_ids
// [B, S] gives each token its sequence, a sequence being a run of one id. Each sequence is
// attended alone, its positions counted from its first token (its sinks, its key_bias by
// position), as it would be in a batch of its own. The ops split the call into runs of
// consecutive sequences of one length, each a strided view of the row (no copy of q, k, v), and
// run the unchanged kernels on them (call_parts.h): no S x S memory, no work across sequences.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention_args.h"
#include "call_parts.h"

namespace headops {

// `count` consecutive sequences of `length` tokens each, from token `start` of batch row `row`.
struct SequenceRun {
  int64_t row, start, length, count;
  // its part of the call: its row repeated for its sequences, over their `length` keys each
  CallPart part() const { return {row, 1, count, length}; }
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

}  // namespace headops
