// Where a call of the attention ops is split into parts (call_parts.h), in one place for the
// forward and the backward: sequences packed into its rows (sequence_ids, packed_sequences.h) or
// rows whose keys end before the buffer does (key_lengths, key_lengths.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention_args.h"
#include "key_lengths.h"
#include "packed_sequences.h"

namespace headops {

// on_parts(parts, view, keys, dims, keys_left_out) where the call splits, nullopt where it is one
// call. For a part: `view(t, part, heads_first)` is its view of a tensor of the call with q's
// positions (heads_first: heads before the sequence, as lse and the saved averages), `keys(t,
// part)` its view of k or v (or their gradients), `dims(part)` its sizes; `keys_left_out`: some
// key is in no part (the slots past key_lengths).
template <typename Result, typename OnParts>
std::optional<Result> split_call(const char* op, const Dims& d, const at::Tensor& q, bool heads_first,
                                 const OptTensor& sequence_ids, const OptTensor& key_lengths, OnParts on_parts) {
  TORCH_CHECK(!(sequence_ids.has_value() && key_lengths.has_value()), op,
              "sequence_ids (packed self-attention) and key_lengths cannot be combined");
  const std::vector<SequenceRun> runs = packed_runs(op, sequence_ids, d, q);
  if (!runs.empty())
    return on_parts(
        runs, run_view, [&](const at::Tensor& t, const SequenceRun& run) { return run_view(t, run, heads_first); },
        [&](const SequenceRun& run) { return Dims{run.count, run.length, run.length, d.Hq, d.Hkv, d.D}; },
        /*keys_left_out=*/false);
  const std::vector<KeyLengthGroup> groups = key_length_groups(op, key_lengths, d, q);
  if (!groups.empty()) {
    const int64_t seq = heads_first ? 2 : 1;
    return on_parts(
        groups, [](const at::Tensor& t, const KeyLengthGroup& group, bool) { return group_view(t, group); },
        [&](const at::Tensor& t, const KeyLengthGroup& group) { return group_view(t, group, seq); },
        [&](const KeyLengthGroup& group) { return Dims{group.rows, d.Sq, group.length, d.Hq, d.Hkv, d.D}; },
        /*keys_left_out=*/true);
  }
  return std::nullopt;
}

}  // namespace headops
