#include "kv_layout_checks.h"

#include <ATen/ATen.h>

#include "kv_layout.h"

#include <algorithm>

namespace headops {

LayerLayout check_layer_layout(const char* op, at::ScalarType dtype, int64_t B, int64_t Hkv, int64_t D,
                               at::TensorList full_k, at::TensorList full_v, const at::Tensor& ring_k,
                               const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
                               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
                               const at::Tensor& ring_size, const std::optional<at::Tensor>& budget_table,
                               const std::optional<at::Tensor>& slot_pos, const std::optional<at::Tensor>& slot_mass,
                               const std::optional<at::Tensor>& comp_table, const std::optional<at::Tensor>& comp_k,
                               const std::optional<at::Tensor>& comp_v, const std::optional<at::Tensor>& comp_n) {
  for (const at::Tensor* t : {&ring_k, &ring_v}) {
    TORCH_CHECK(t->scalar_type() == dtype, op, "the storages must have dtype ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), op, "the storages must be contiguous CPU tensors");
  }
  TORCH_CHECK(ring_k.dim() == 3 && ring_k.sizes() == ring_v.sizes() && ring_k.size(0) == B && ring_k.size(2) == D, op,
              "ring_k/ring_v must be [B, slots, D] = [", B, ", slots, ", D, "], got ", ring_k.sizes(), " and ",
              ring_v.sizes());
  for (const at::Tensor* t : {&lengths, &kv_kind, &kv_index, &ring_offset, &ring_sinks, &ring_size})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->device().is_cpu(), op,
                "lengths and the layout tables must be contiguous 1-D int64 CPU tensors");
  TORCH_CHECK(lengths.size(0) == B, op, "lengths must have ", B, " entries, got ", lengths.size(0));
  TORCH_CHECK(kv_kind.size(0) == Hkv && kv_index.size(0) == Hkv, op, "kv_kind and kv_index must have ", Hkv,
              " entries (one per KV head)");
  const int64_t* kind = kv_kind.data_ptr<int64_t>();
  int64_t full_heads = 0;
  for (int64_t h = 0; h < Hkv; ++h) {
    TORCH_CHECK(kind[h] == kKvFull || kind[h] == kKvStreaming || (kind[h] == kKvBudget && budget_table.has_value()), op,
                "kv_kind[", h, "] must be 0 (full), 1 (streaming) or 2 (budget, with a budget table)");
    full_heads += kind[h] == kKvFull;
  }
  LayerLayout l{B, Hkv, D, full_heads, ring_k.size(1), ring_offset.size(0), {0}, {}, {}};
  TORCH_CHECK(full_k.size() == full_v.size(), op, "full_k and full_v must have as many segments");
  for (size_t s = 0; s < full_k.size(); ++s) {
    const at::Tensor& k = full_k[s];
    const at::Tensor& v = full_v[s];
    for (const at::Tensor* t : {&k, &v}) {
      TORCH_CHECK(t->scalar_type() == dtype, op, "the storages must have dtype ", dtype, ", got ", t->scalar_type());
      TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), op, "the storages must be contiguous CPU tensors");
    }
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == full_heads && k.size(3) == D,
                op, "full segment ", s, " must be [B, Hf, n, D] = [", B, ", ", full_heads, ", n, ", D, "] in k and v, got ",
                k.sizes(), " and ", v.sizes());
    l.full_starts.push_back(l.full_starts.back() + k.size(2));
    l.full_k.push_back(k.data_ptr());
    l.full_v.push_back(v.data_ptr());
  }
  TORCH_CHECK(ring_sinks.size(0) == l.ring_heads && ring_size.size(0) == l.ring_heads, op,
              "ring_offset, ring_sinks and ring_size must have one entry per streaming head");
  if (budget_table.has_value()) {
    const at::Tensor& t = *budget_table;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 3 && t.size(0) == B && t.size(2) == 4 &&
                    t.is_contiguous() && t.device().is_cpu(),
                op, "budget_table must be a contiguous [B, Hb, 4] = [", B, ", Hb, 4] int64 CPU tensor");
    TORCH_CHECK(slot_pos.has_value() && slot_mass.has_value(), op, "budget heads need slot_pos and slot_mass");
    TORCH_CHECK(slot_pos->scalar_type() == at::kLong && slot_pos->is_contiguous() && slot_pos->dim() == 2 &&
                    slot_pos->size(0) == B && slot_pos->size(1) == l.ring_slots,
                op, "slot_pos must be a contiguous int64 [B, slots] = [", B, ", ", l.ring_slots, "] tensor");
    TORCH_CHECK(slot_mass->scalar_type() == at::kFloat && slot_mass->is_contiguous() && slot_mass->dim() == 2 &&
                    slot_mass->size(0) == B && slot_mass->size(1) == l.ring_slots,
                op, "slot_mass must be a contiguous float32 [B, slots] = [", B, ", ", l.ring_slots, "] tensor");
    l.budget_table = t.data_ptr<int64_t>();
    l.budget_heads = t.size(1);
    l.slot_pos = slot_pos->data_ptr<int64_t>();
    l.slot_mass = slot_mass->data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < l.budget_heads; ++i) {
        const BudgetLayout r = budget_layout_of(l.budget_table, l.budget_heads, b, i);
        TORCH_CHECK(r.offset >= 0 && r.size >= 1 && r.sinks >= 0 && r.recent >= 0 && r.offset <= l.ring_slots &&
                        r.size <= l.ring_slots - r.offset && r.sinks < r.size && r.recent < r.size - r.sinks,
                    op, "budget head ", i, " of row ", b, ": offset ", r.offset, ", size ", r.size, ", sinks ", r.sinks,
                    ", recent ", r.recent, " must fit in ", l.ring_slots, " slots with sinks + recent < size");
      }
  }
  const int64_t* index = kv_index.data_ptr<int64_t>();
  for (int64_t h = 0; h < Hkv; ++h) {
    const int64_t limit = kind[h] == kKvFull ? l.full_heads : kind[h] == kKvStreaming ? l.ring_heads : l.budget_heads;
    TORCH_CHECK(index[h] >= 0 && index[h] < limit, op, "kv_index[", h, "] = ", index[h], " is out of range [0, ", limit,
                ")");
  }
  const int64_t* off = ring_offset.data_ptr<int64_t>();
  const int64_t* snk = ring_sinks.data_ptr<int64_t>();
  const int64_t* size = ring_size.data_ptr<int64_t>();
  for (int64_t s = 0; s < l.ring_heads; ++s)
    // compared one term at a time: a sum of huge entries must not wrap around
    TORCH_CHECK(off[s] >= 0 && snk[s] >= 0 && size[s] >= 1 && off[s] <= l.ring_slots && snk[s] <= l.ring_slots - off[s] &&
                    size[s] <= l.ring_slots - off[s] - snk[s],
                op,
                "streaming head ", s, ": offset ", off[s], ", sinks ", snk[s], ", ring ", size[s],
                " must be >= 0, >= 0, >= 1 and fit in ", l.ring_slots, " slots");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(len[b] >= 0, op, "lengths must be >= 0");
  if (comp_table.has_value()) {
    const at::Tensor& t = *comp_table;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) == l.ring_heads && t.size(1) == 2 &&
                    t.is_contiguous() && t.device().is_cpu(),
                op, "comp_table must be a contiguous [Hs, 2] = [", l.ring_heads, ", 2] int64 CPU tensor");
    TORCH_CHECK(comp_k.has_value() && comp_v.has_value() && comp_n.has_value(), op,
                "compensated heads need comp_k, comp_v and comp_n");
    const int64_t Hc = comp_n->dim() == 2 ? comp_n->size(1) : -1;
    for (const at::Tensor* s : {&*comp_k, &*comp_v})
      TORCH_CHECK(s->scalar_type() == at::kDouble && s->dim() == 3 && s->size(0) == B && s->size(1) == Hc &&
                      s->size(2) == D && s->is_contiguous() && s->device().is_cpu(),
                  op, "comp_k and comp_v must be contiguous float64 [B, Hc, D] = [", B, ", ", Hc, ", ", D,
                  "] CPU tensors");
    TORCH_CHECK(comp_n->scalar_type() == at::kLong && comp_n->dim() == 2 && comp_n->size(0) == B &&
                    comp_n->is_contiguous() && comp_n->device().is_cpu(),
                op, "comp_n must be a contiguous int64 [B, Hc] CPU tensor");
    l.comp_table = t.data_ptr<int64_t>();
    l.comp_heads = Hc;
    for (int64_t s = 0; s < l.ring_heads; ++s) {
      const Compensation c = compensation_of(l.comp_table, s);
      TORCH_CHECK(c.index >= -1 && c.index < Hc && (l.comp_table[2 * s + 1] == 0 || l.comp_table[2 * s + 1] == 1),
                  op, "comp_table[", s, "] = [", c.index, ", ", l.comp_table[2 * s + 1], "] must be [index in [-1, ",
                  Hc, "), 0 or 1]");
    }
    l.comp_k = comp_k->data_ptr<double>();
    l.comp_v = comp_v->data_ptr<double>();
    l.comp_n = comp_n->data_ptr<int64_t>();
    for (int64_t i = 0; i < B * Hc; ++i) TORCH_CHECK(l.comp_n[i] >= 0, op, "comp_n must be >= 0");
  }
  return l;
}

int64_t LayerLayout::segment_of(int64_t position) const {
  return std::upper_bound(full_starts.begin(), full_starts.end(), position) - full_starts.begin() - 1;
}

}  // namespace headops
