// Raw-pointer description of one decode-attention call over a head-sparse KV cache layer.
#pragma once

#include <cstdint>

#include "../attention/attention_params.h"

namespace headops {

struct DecodeParams {
  // q ([B, Sq, Hq, D] addressing), out, per-head parameters and sizes; seqlen_k is the
  // length of key_bias's last axis (the longest row); query row i of batch b sits at
  // position lengths[b] - Sq + i
  AttentionParams attn;
  // full heads: segment s ([B, Hf, n_s, D] contiguous) holds positions [full_starts[s], full_starts[s + 1])
  const void* const* full_k = nullptr;
  const void* const* full_v = nullptr;
  const int64_t* full_starts = nullptr;  // full_segments + 1 entries
  int64_t full_segments = 0, full_heads = 0;
  const void* ring_k = nullptr;  // [B, ring_slots, D] contiguous
  const void* ring_v = nullptr;
  int64_t ring_slots = 0;
  const int64_t* lengths = nullptr;      // [B] tokens written per row, the new ones included
  const int64_t* kv_kind = nullptr;      // [Hkv] KvKind
  const int64_t* kv_index = nullptr;     // [Hkv] index among the full heads or the streaming heads
  const int64_t* ring_offset = nullptr;  // [Hs]
  const int64_t* ring_sinks = nullptr;   // [Hs]
  const int64_t* ring_size = nullptr;    // [Hs]
  int64_t ring_heads = 0;                // Hs (read by the CUDA kernels' range guards)
  int64_t split_keys = 1024;             // keys per work item on long full heads (split-K)
  // budget heads (kv_kind 2): kv_index selects an entry of budget_table [B, Hb, 4] (per batch
  // row: budget_layout_of); their slots in
  // the streaming storage hold the positions slot_pos [B, ring_slots] (-1 empty); the decode
  // adds each kept token's attention probability (summed over the group's query rows) to
  // slot_mass [B, ring_slots]
  const int64_t* budget_table = nullptr;
  int64_t budget_heads = 0;
  const int64_t* slot_pos = nullptr;
  float* slot_mass = nullptr;
  // compensated streaming heads: comp_table [Hs, 2] (kv_layout.h: Compensation), the float64
  // sums comp_k / comp_v [B, comp_heads, D] and counts comp_n [B, comp_heads] of what they evicted
  const int64_t* comp_table = nullptr;
  int64_t comp_heads = 0;
  const double* comp_k = nullptr;
  const double* comp_v = nullptr;
  const int64_t* comp_n = nullptr;
};

}  // namespace headops
