// TORCH_CHECKs of a head-sparse layer layout, shared by kv_append and decode_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace headops {

struct LayerLayout {
  int64_t batch, heads_kv, head_dim, full_heads, ring_slots, ring_heads;
  // full storage segment s holds positions [full_starts[s], full_starts[s + 1]) of every full head
  std::vector<int64_t> full_starts;
  std::vector<const void*> full_k, full_v;
  // budget heads (optional): [B, Hb, 4] entries of BudgetLayout, slot positions and masses
  const int64_t* budget_table = nullptr;
  int64_t budget_heads = 0;
  int64_t* slot_pos = nullptr;
  float* slot_mass = nullptr;
  // compensated streaming heads (optional): [Hs, 2] table, float64 sums [B, Hc, D], counts [B, Hc]
  const int64_t* comp_table = nullptr;
  int64_t comp_heads = 0;
  double* comp_k = nullptr;
  double* comp_v = nullptr;
  int64_t* comp_n = nullptr;
  int64_t full_capacity() const { return full_starts.back(); }
  int64_t segment_of(int64_t position) const;  // requires 0 <= position < full_capacity()
};

// Storages contiguous and of `dtype` (full segments [B, Hf, n_s, D], the streaming one [B, slots, D]), tables int64 with consistent sizes and in-range values.
LayerLayout check_layer_layout(const char* op, at::ScalarType dtype, int64_t batch, int64_t heads_kv, int64_t head_dim,
                               at::TensorList full_k, at::TensorList full_v, const at::Tensor& ring_k,
                               const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
                               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
                               const at::Tensor& ring_size, const std::optional<at::Tensor>& budget_table,
                               const std::optional<at::Tensor>& slot_pos, const std::optional<at::Tensor>& slot_mass,
                               const std::optional<at::Tensor>& comp_table, const std::optional<at::Tensor>& comp_k,
                               const std::optional<at::Tensor>& comp_v, const std::optional<at::Tensor>& comp_n);

}  // namespace headops
