// Keys held in a buffer longer than what is written (a static KV cache's slots; FlashAttention's
// cache_seqlens): key_lengths[b] keys of row b exist, its queries are the last Sq positions of
// those (bottom-right aligned), and the slots past them are neither read nor seen. The ops run
// each group of consecutive rows with one key length as a call of its own over views
// (call_parts.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention_args.h"
#include "call_parts.h"

namespace headops {

// Consecutive rows [row, row + rows) whose keys end at `length`.
struct KeyLengthGroup {
  int64_t row, rows, length;
  CallPart part() const { return {row, rows, 1, length}; }
};

// The groups of the call, in row order; empty where every row's keys fill the buffer (one
// ordinary call). Checks key_lengths (an integer [B] tensor, values in [0, Sk], on the CPU or q's
// device: a CUDA one is read with one device-to-host copy, refused while a CUDA graph is captured).
std::vector<KeyLengthGroup> key_length_groups(const char* op, const std::optional<at::Tensor>& key_lengths,
                                              const Dims& d, const at::Tensor& q);

// A group's rows of a tensor of the call, over its first `length` keys where `seq_dim` >= 0
// (k, v in their layout: the sequence dim; -1: every position, as q, out, lse).
at::Tensor group_view(const at::Tensor& t, const KeyLengthGroup& group, int64_t seq_dim = -1);

}  // namespace headops
