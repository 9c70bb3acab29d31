// TORCH_CHECKs of a head-sparse layer layout, shared by kv_append and decode_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace headops {

// A layer's storages and layout tables as the raw ops (kv_append, decode_attention) take them.
struct LayerTensors {
  at::TensorList full_k, full_v;
  const at::Tensor& ring_k;
  const at::Tensor& ring_v;
  const at::Tensor& lengths;
  const at::Tensor& kv_kind;
  const at::Tensor& kv_index;
  const at::Tensor& ring_offset;
  const at::Tensor& ring_sinks;
  const at::Tensor& ring_size;
  const std::optional<at::Tensor>& budget_table;
  const std::optional<at::Tensor>& slot_pos;
  const std::optional<at::Tensor>& slot_mass;
  const std::optional<at::Tensor>& comp_table;
  const std::optional<at::Tensor>& comp_k;
  const std::optional<at::Tensor>& comp_v;
  const std::optional<at::Tensor>& comp_n;
};

// What a layer's tensors say about its shape, read from sizes alone.
struct LayerShapes {
  int64_t full_heads = 0;  // of the full segments (0 when there are none)
  int64_t ring_slots = 0, ring_heads = 0, budget_heads = 0, comp_heads = 0;
  std::vector<int64_t> full_starts{0};  // segment s holds positions [full_starts[s], full_starts[s + 1])
};

// A layer's shapes with its tables' values checked (check_layer_layout), and its host pointers.
// (full_heads is kv_kind's count of full heads, also where no full segment exists yet.)
struct LayerLayout : LayerShapes {
  int64_t batch = 0, heads_kv = 0, head_dim = 0;
  std::vector<const void*> full_k, full_v;
  // budget heads (optional): [B, Hb, 4] entries of BudgetLayout, slot positions and masses
  const int64_t* budget_table = nullptr;
  int64_t* slot_pos = nullptr;
  float* slot_mass = nullptr;
  // compensated streaming heads (optional): [Hs, 2] table, float64 sums [B, Hc, D], counts [B, Hc]
  const int64_t* comp_table = nullptr;
  double* comp_k = nullptr;
  double* comp_v = nullptr;
  int64_t* comp_n = nullptr;
  int64_t full_capacity() const { return full_starts.back(); }
  int64_t segment_of(int64_t position) const;  // requires 0 <= position < full_capacity()
};

// Dtypes, contiguity, devices and shapes of a layer's storages and tables; reads no values, so the
// CUDA ops run it on device tensors (the CPU ops too, before their value checks).
LayerShapes check_layer_shapes(const char* op, at::ScalarType dtype, const at::Device& device, int64_t batch,
                               int64_t heads_kv, int64_t head_dim, const LayerTensors& t);

// check_layer_shapes on the CPU, then the tables' values: kinds and indices in range, the full
// segments holding every full head, ring and budget layouts fitting their slots, lengths and
// compensation counts >= 0.
LayerLayout check_layer_layout(const char* op, at::ScalarType dtype, int64_t batch, int64_t heads_kv, int64_t head_dim,
                               const LayerTensors& t);

}  // namespace headops
