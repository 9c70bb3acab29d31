// Raw-pointer description of the probe statistics one attention call computes (DESIGN
// section 5), read by the kernels beside AttentionParams. No torch headers.
#pragma once

#include <cstdint>

namespace headops {

struct ProbeParams {
  // what is asked
  const int64_t* spans = nullptr;  // [B or 1, n_spans, 2] absolute key positions [start, end)
  int64_t n_spans = 0;
  int64_t spans_stride_b = 0;       // 0: one set of spans for every batch row
  const int64_t* distances = nullptr;  // [n_distances, 2] ranges [d0, d1) of pos_i - j
  int64_t n_distances = 0;
  bool sink_mass = false;
  int64_t topk = 0;  // 0: none; at most kMaxTopk
  bool entropy = false;
  bool key_mass = false;  // per key, the mass from query rows [key_mass_r0, key_mass_r1)
  int64_t key_mass_r0 = 0, key_mass_r1 = 0;

  // where it goes (contiguous float32; indices int64), null when not asked
  float* span_mass = nullptr;      // [B, Hq, Sq, n_spans]
  float* distance_mass = nullptr;  // [B, Hq, Sq, n_distances]
  float* sink_mass_out = nullptr;  // [B, Hq, Sq]
  float* entropy_out = nullptr;    // [B, Hq, Sq]
  int64_t* topk_index = nullptr;   // [B, Hq, Sq, topk]
  float* topk_prob = nullptr;      // [B, Hq, Sq, topk]
  float* key_mass_out = nullptr;   // [B, Hq, Sk]

  static constexpr int64_t kMaxTopk = 8;

  // statistics of a query row that ride along the forward's pass over the keys
  bool row_statistics() const { return n_spans > 0 || n_distances > 0 || sink_mass || topk > 0 || entropy; }
};

}  // namespace headops
