#include "kv_layout_checks.h"

#include <ATen/ATen.h>

#include "kv_layout.h"

#include <algorithm>

namespace headops {

namespace {

void check_storage(const char* op, const at::Tensor& t, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device() == device, op,
              "the storages must be contiguous tensors of dtype ", dtype, " on ", device, ", got a ",
              t.is_contiguous() ? "contiguous " : "non-contiguous ", t.scalar_type(), " tensor on ", t.device());
}

// a table: contiguous, of `dtype` (int64 unless said), on `device`, of `shape`
void check_table(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                 const at::Device& device, at::ScalarType dtype = at::kLong) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device() == device && t.sizes() == shape, op, name,
              " must be a contiguous ", dtype == at::kLong ? "int64" : c10::toString(dtype), " tensor of shape ",
              shape, " on ", device, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

LayerShapes check_layer_shapes(const char* op, at::ScalarType dtype, const at::Device& device, int64_t B, int64_t Hkv,
                               int64_t D, const LayerTensors& t) {
  LayerShapes l;
  for (const at::Tensor* ring : {&t.ring_k, &t.ring_v}) check_storage(op, *ring, dtype, device);
  TORCH_CHECK(t.ring_k.dim() == 3 && t.ring_k.sizes() == t.ring_v.sizes() && t.ring_k.size(0) == B &&
                  t.ring_k.size(2) == D,
              op, "ring_k/ring_v must be [B, slots, D] = [", B, ", slots, ", D, "], got ", t.ring_k.sizes(), " and ",
              t.ring_v.sizes());
  l.ring_slots = t.ring_k.size(1);
  check_table(op, t.lengths, "lengths", {B}, device);
  check_table(op, t.kv_kind, "kv_kind (one entry per KV head)", {Hkv}, device);
  check_table(op, t.kv_index, "kv_index (one entry per KV head, as kv_kind)", {Hkv}, device);
  TORCH_CHECK(t.ring_offset.dim() == 1, op, "ring_offset must be 1-D (one entry per streaming head), got ",
              t.ring_offset.sizes());
  l.ring_heads = t.ring_offset.size(0);
  check_table(op, t.ring_offset, "ring_offset", {l.ring_heads}, device);
  check_table(op, t.ring_sinks, "ring_sinks (one entry per streaming head, as ring_offset)", {l.ring_heads}, device);
  check_table(op, t.ring_size, "ring_size (one entry per streaming head, as ring_offset)", {l.ring_heads}, device);
  TORCH_CHECK(t.full_k.size() == t.full_v.size(), op, "full_k and full_v must have as many segments");
  l.full_heads = t.full_k.empty() ? 0 : t.full_k[0].dim() == 4 ? t.full_k[0].size(1) : -1;
  for (size_t s = 0; s < t.full_k.size(); ++s) {
    const at::Tensor& k = t.full_k[s];
    const at::Tensor& v = t.full_v[s];
    check_storage(op, k, dtype, device);
    check_storage(op, v, dtype, device);
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == l.full_heads &&
                    k.size(3) == D,
                op, "full segment ", s, " must be [B, Hf, n, D] = [", B, ", ", l.full_heads, ", n, ", D,
                "] in k and v, got ", k.sizes(), " and ", v.sizes());
    l.full_starts.push_back(l.full_starts.back() + k.size(2));
  }
  if (t.budget_table.has_value()) {
    l.budget_heads = t.budget_table->dim() == 3 ? t.budget_table->size(1) : -1;
    check_table(op, *t.budget_table, "budget_table", {B, l.budget_heads, 4}, device);
    TORCH_CHECK(t.slot_pos.has_value() && t.slot_mass.has_value(), op, "budget heads need slot_pos and slot_mass");
    check_table(op, *t.slot_pos, "slot_pos", {B, l.ring_slots}, device);
    check_table(op, *t.slot_mass, "slot_mass", {B, l.ring_slots}, device, at::kFloat);
  }
  if (t.comp_table.has_value()) {
    check_table(op, *t.comp_table, "comp_table", {l.ring_heads, 2}, device);
    TORCH_CHECK(t.comp_k.has_value() && t.comp_v.has_value() && t.comp_n.has_value(), op,
                "compensated heads need comp_k, comp_v and comp_n");
    l.comp_heads = t.comp_n->dim() == 2 ? t.comp_n->size(1) : -1;
    check_table(op, *t.comp_n, "comp_n", {B, l.comp_heads}, device);
    check_table(op, *t.comp_k, "comp_k", {B, l.comp_heads, D}, device, at::kDouble);
    check_table(op, *t.comp_v, "comp_v", {B, l.comp_heads, D}, device, at::kDouble);
  }
  return l;
}

LayerLayout check_layer_layout(const char* op, at::ScalarType dtype, int64_t B, int64_t Hkv, int64_t D,
                               const LayerTensors& t) {
  const LayerShapes shapes = check_layer_shapes(op, dtype, at::Device(at::kCPU), B, Hkv, D, t);
  const int64_t* kind = t.kv_kind.data_ptr<int64_t>();
  int64_t full_heads = 0;
  for (int64_t h = 0; h < Hkv; ++h) {
    TORCH_CHECK(kind[h] == kKvFull || kind[h] == kKvStreaming || (kind[h] == kKvBudget && t.budget_table.has_value()),
                op, "kv_kind[", h, "] must be 0 (full), 1 (streaming) or 2 (budget, with a budget table)");
    full_heads += kind[h] == kKvFull;
  }
  TORCH_CHECK(t.full_k.empty() || shapes.full_heads == full_heads, op, "the full segments must hold the ", full_heads,
              " full heads kv_kind names ([B, Hf, n, D] with Hf = ", full_heads, "), got Hf = ", shapes.full_heads);
  LayerLayout l;
  static_cast<LayerShapes&>(l) = shapes;
  l.full_heads = full_heads;
  l.batch = B;
  l.heads_kv = Hkv;
  l.head_dim = D;
  for (size_t s = 0; s < t.full_k.size(); ++s) {
    l.full_k.push_back(t.full_k[s].data_ptr());
    l.full_v.push_back(t.full_v[s].data_ptr());
  }
  if (t.budget_table.has_value()) {
    l.budget_table = t.budget_table->data_ptr<int64_t>();
    l.slot_pos = t.slot_pos->data_ptr<int64_t>();
    l.slot_mass = t.slot_mass->data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < l.budget_heads; ++i) {
        const BudgetLayout r = budget_layout_of(l.budget_table, l.budget_heads, b, i);
        TORCH_CHECK(r.offset >= 0 && r.size >= 1 && r.sinks >= 0 && r.recent >= 0 && r.offset <= l.ring_slots &&
                        r.size <= l.ring_slots - r.offset && r.sinks < r.size && r.recent < r.size - r.sinks,
                    op, "budget head ", i, " of row ", b, ": offset ", r.offset, ", size ", r.size, ", sinks ", r.sinks,
                    ", recent ", r.recent, " must fit in ", l.ring_slots, " slots with sinks + recent < size");
      }
  }
  const int64_t* index = t.kv_index.data_ptr<int64_t>();
  for (int64_t h = 0; h < Hkv; ++h) {
    const int64_t limit = kind[h] == kKvFull ? l.full_heads : kind[h] == kKvStreaming ? l.ring_heads : l.budget_heads;
    TORCH_CHECK(index[h] >= 0 && index[h] < limit, op, "kv_index[", h, "] = ", index[h], " is out of range [0, ", limit,
                ")");
  }
  const int64_t* off = t.ring_offset.data_ptr<int64_t>();
  const int64_t* snk = t.ring_sinks.data_ptr<int64_t>();
  const int64_t* size = t.ring_size.data_ptr<int64_t>();
  for (int64_t s = 0; s < l.ring_heads; ++s)
    // compared one term at a time: a sum of huge entries must not wrap around
    TORCH_CHECK(off[s] >= 0 && snk[s] >= 0 && size[s] >= 1 && off[s] <= l.ring_slots && snk[s] <= l.ring_slots - off[s] &&
                    size[s] <= l.ring_slots - off[s] - snk[s],
                op,
                "streaming head ", s, ": offset ", off[s], ", sinks ", snk[s], ", ring ", size[s],
                " must be >= 0, >= 0, >= 1 and fit in ", l.ring_slots, " slots");
  const int64_t* len = t.lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(len[b] >= 0, op, "lengths must be >= 0");
  if (t.comp_table.has_value()) {
    l.comp_table = t.comp_table->data_ptr<int64_t>();
    for (int64_t s = 0; s < l.ring_heads; ++s) {
      const Compensation c = compensation_of(l.comp_table, s);
      TORCH_CHECK(c.index >= -1 && c.index < l.comp_heads &&
                      (l.comp_table[2 * s + 1] == 0 || l.comp_table[2 * s + 1] == 1),
                  op, "comp_table[", s, "] = [", c.index, ", ", l.comp_table[2 * s + 1], "] must be [index in [-1, ",
                  l.comp_heads, "), 0 or 1]");
    }
    l.comp_k = t.comp_k->data_ptr<double>();
    l.comp_v = t.comp_v->data_ptr<double>();
    l.comp_n = t.comp_n->data_ptr<int64_t>();
    for (int64_t i = 0; i < B * l.comp_heads; ++i) TORCH_CHECK(l.comp_n[i] >= 0, op, "comp_n must be >= 0");
  }
  return l;
}

int64_t LayerLayout::segment_of(int64_t position) const {
  return std::upper_bound(full_starts.begin(), full_starts.end(), position) - full_starts.begin() - 1;
}

}  // namespace headops
