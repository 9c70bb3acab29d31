// A call of the attention ops split into parts that each run the unchanged kernels over views of
// the call's tensors: sequences packed into a row (packed_sequences.h), rows whose keys end
// before the buffer does (key_lengths.h). A part's per-head arguments are its rows' (a view);
// its gradients go back into the call's.
#pragma once

#include <ATen/core/Tensor.h>

#include "attention_args.h"

namespace headops {

// Rows [row, row + rows) of the call, each repeated `repeat` times (the sequences of a packed
// row), over their first `keys` keys (key_bias's first `keys` positions).
struct CallPart {
  int64_t row, rows, repeat, keys;
};

// The per-head arguments of a part ([rows * repeat, ...] views of the call's [B, ...] ones).
struct PartHeadArgs {
  OptTensor softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate;
  PartHeadArgs(const PerHeadArgs& args, const CallPart& part);
  PerHeadArgs view() const {
    return {softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate};
  }
};

// An integer tensor the host splits the call by (sequence_ids, key_lengths) as a contiguous int64
// CPU tensor: a CPU one as it is, one on q's device copied (a sync; refused while a CUDA graph is
// captured, naming `name`). Checks its dtype and device.
at::Tensor integers_on_host(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q);

// Adds a part's gradient of a per-head argument ([rows * repeat, Hq, ...]; key_bias, `over_keys`:
// [rows * repeat, Hq, keys]) into the call's ([B, Hq, ...]) at the part's rows, each row's
// repeats summed in order (deterministic). Nothing where either is empty (not wanted).
void add_part_gradient(at::Tensor& whole, const at::Tensor& part_grad, const CallPart& part, bool over_keys = false);

}  // namespace headops
