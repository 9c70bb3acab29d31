// TORCH_CHECKs of a head-sparse layer layout, shared by kv_append and decode_attention.
#pragma once

#include <ATen/core/Tensor.h>

namespace headops {

struct LayerLayout {
  int64_t batch, heads_kv, head_dim, full_heads, full_capacity, ring_slots, ring_heads;
};

// Storages contiguous and of `dtype`, tables int64 with consistent sizes and in-range values.
LayerLayout check_layer_layout(const char* op, at::ScalarType dtype, int64_t batch, int64_t heads_kv, int64_t head_dim,
                               const at::Tensor& full_k, const at::Tensor& full_v, const at::Tensor& ring_k,
                               const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
                               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
                               const at::Tensor& ring_size);

}  // namespace headops
