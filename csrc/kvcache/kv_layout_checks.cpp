#include "kv_layout_checks.h"

#include <ATen/ATen.h>

#include "kv_layout.h"

namespace headops {

LayerLayout check_layer_layout(const char* op, at::ScalarType dtype, int64_t B, int64_t Hkv, int64_t D,
                               const at::Tensor& full_k, const at::Tensor& full_v, const at::Tensor& ring_k,
                               const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
                               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
                               const at::Tensor& ring_size) {
  for (const at::Tensor* t : {&full_k, &full_v, &ring_k, &ring_v}) {
    TORCH_CHECK(t->scalar_type() == dtype, op, "the storages must have dtype ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), op, "the storages must be contiguous CPU tensors");
  }
  TORCH_CHECK(full_k.dim() == 4 && full_k.sizes() == full_v.sizes() && full_k.size(0) == B && full_k.size(3) == D, op,
              "full_k/full_v must be [B, Hf, capacity, D] = [", B, ", Hf, capacity, ", D, "], got ", full_k.sizes(),
              " and ", full_v.sizes());
  TORCH_CHECK(ring_k.dim() == 3 && ring_k.sizes() == ring_v.sizes() && ring_k.size(0) == B && ring_k.size(2) == D, op,
              "ring_k/ring_v must be [B, slots, D] = [", B, ", slots, ", D, "], got ", ring_k.sizes(), " and ",
              ring_v.sizes());
  for (const at::Tensor* t : {&lengths, &kv_kind, &kv_index, &ring_offset, &ring_sinks, &ring_size})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->device().is_cpu(), op,
                "lengths and the layout tables must be contiguous 1-D int64 CPU tensors");
  LayerLayout l{B, Hkv, D, full_k.size(1), full_k.size(2), ring_k.size(1), ring_offset.size(0)};
  TORCH_CHECK(lengths.size(0) == B, op, "lengths must have ", B, " entries, got ", lengths.size(0));
  TORCH_CHECK(kv_kind.size(0) == Hkv && kv_index.size(0) == Hkv, op, "kv_kind and kv_index must have ", Hkv,
              " entries (one per KV head)");
  TORCH_CHECK(ring_sinks.size(0) == l.ring_heads && ring_size.size(0) == l.ring_heads, op,
              "ring_offset, ring_sinks and ring_size must have one entry per streaming head");
  const int64_t* kind = kv_kind.data_ptr<int64_t>();
  const int64_t* index = kv_index.data_ptr<int64_t>();
  for (int64_t h = 0; h < Hkv; ++h) {
    TORCH_CHECK(kind[h] == kKvFull || kind[h] == kKvStreaming, op, "kv_kind[", h, "] must be 0 (full) or 1 (streaming)");
    const int64_t limit = kind[h] == kKvFull ? l.full_heads : l.ring_heads;
    TORCH_CHECK(index[h] >= 0 && index[h] < limit, op, "kv_index[", h, "] = ", index[h], " is out of range [0, ", limit,
                ")");
  }
  const int64_t* off = ring_offset.data_ptr<int64_t>();
  const int64_t* snk = ring_sinks.data_ptr<int64_t>();
  const int64_t* size = ring_size.data_ptr<int64_t>();
  for (int64_t s = 0; s < l.ring_heads; ++s)
    TORCH_CHECK(off[s] >= 0 && snk[s] >= 0 && size[s] >= 1 && off[s] + snk[s] + size[s] <= l.ring_slots, op,
                "streaming head ", s, ": offset ", off[s], ", sinks ", snk[s], ", ring ", size[s],
                " must be >= 0, >= 0, >= 1 and fit in ", l.ring_slots, " slots");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(len[b] >= 0, op, "lengths must be >= 0");
  return l;
}

}  // namespace headops
