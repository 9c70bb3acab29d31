#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <limits>

#include "kv_layout.h"
#include "kv_layout_checks.h"
#include "kv_ops.h"
#ifdef HEADOPS_WITH_CUDA
#include "cuda/kv_cache_cuda.h"
#endif

namespace headops {

namespace {

// The slot (relative to the streaming storage's row) that budget head `i` gives position p:
// the first empty one, else the evictable token (not a sink, not among the `recent` latest)
// with the least attention mass, the oldest on ties. Its mass restarts at 0.
int64_t budget_slot(const LayerLayout& l, int64_t b, int64_t i, int64_t p) {
  const BudgetLayout bl = budget_layout_of(l.budget_table, l.budget_heads, b, i);
  int64_t* pos = l.slot_pos + b * l.ring_slots + bl.offset;
  float* mass = l.slot_mass + b * l.ring_slots + bl.offset;
  int64_t slot = -1;
  for (int64_t j = 0; j < bl.size && slot < 0; ++j)
    if (pos[j] < 0) slot = j;
  if (slot < 0) {
    for (int64_t j = 0; j < bl.size; ++j) {
      const int64_t q = pos[j];
      if (q < bl.sinks || q > p - bl.recent) continue;
      if (slot < 0 || mass[j] < mass[slot] || (mass[j] == mass[slot] && q < pos[slot])) slot = j;
    }
  }
  TORCH_CHECK(slot >= 0, "headops.kv_append: budget head ", i, " has no evictable token");
  pos[slot] = p;
  mass[slot] = 0.f;
  return bl.offset + slot;
}

// sum[0, D) += row[0, D) in float64 (a row of the cache's dtype).
template <typename scalar_t>
void fold_row(double* sum, const char* row, int64_t D) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(row);
  for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<double>(x[d]);
}
using FoldRow = void (*)(double*, const char*, int64_t);

}  // namespace

// Writes k_new/v_new ([B, Sq, Hkv, D], any strides with a contiguous last dim) at positions
// lengths[b] .. lengths[b] + Sq - 1 of every KV head's storage. A streaming head skips the
// tokens its ring would overwrite within the same call (a long prefill writes only what stays);
// a compensated one first folds every token it evicts (from its ring, or from the new tokens)
// into its compensation sums and count (kv_layout.h).
void kv_append(const at::Tensor& k_new, const at::Tensor& v_new, at::TensorList full_k, at::TensorList full_v,
               const at::Tensor& ring_k, const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
               const at::Tensor& ring_size, const OptTensor& budget_table, const OptTensor& slot_pos,
               const OptTensor& slot_mass, bool write_budget, const OptTensor& comp_table,
               const OptTensor& comp_k, const OptTensor& comp_v, const OptTensor& comp_n) {
  const char* op = "headops.kv_append: ";
  TORCH_CHECK(k_new.dim() == 4 && k_new.sizes() == v_new.sizes(), op, "k_new and v_new must be [B, Sq, Hkv, D] of one "
              "shape, got ", k_new.sizes(), " and ", v_new.sizes());
  TORCH_CHECK(k_new.scalar_type() == v_new.scalar_type(), op, "k_new and v_new must have one dtype");
  const LayerTensors layer{full_k, full_v, ring_k, ring_v, lengths, kv_kind, kv_index, ring_offset, ring_sinks,
                           ring_size, budget_table, slot_pos, slot_mass, comp_table, comp_k, comp_v, comp_n};
#ifdef HEADOPS_WITH_CUDA
  if (k_new.is_cuda()) {  // csrc/kvcache/cuda/: no host reads of device data (the value checks below are skipped)
    cuda::kv_append(k_new, v_new, layer, write_budget);
    return;
  }
#endif
  const int64_t B = k_new.size(0), Sq = k_new.size(1), Hkv = k_new.size(2), D = k_new.size(3);
  const LayerLayout l = check_layer_layout(op, k_new.scalar_type(), B, Hkv, D, layer);
  const at::Tensor k = k_new.stride(3) == 1 ? k_new : k_new.contiguous();
  const at::Tensor v = v_new.stride(3) == 1 ? v_new : v_new.contiguous();
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* kind = kv_kind.data_ptr<int64_t>();
  const int64_t* index = kv_index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)  // positions len[b] .. len[b] + Sq - 1 must not overflow int64
    TORCH_CHECK(len[b] <= std::numeric_limits<int64_t>::max() - Sq, op, "row ", b, " holds ", len[b], " tokens: ", Sq,
                " more would overflow the int64 positions");
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      if (kind[h] == kKvFull)
        TORCH_CHECK(len[b] + Sq <= l.full_capacity(), op, "row ", b, " would hold ", len[b] + Sq,
                    " tokens, past the full storage's capacity ", l.full_capacity());
  const int64_t row_bytes = D * k.element_size();
  const int64_t* off = ring_offset.data_ptr<int64_t>();
  const int64_t* snk = ring_sinks.data_ptr<int64_t>();
  const int64_t* size = ring_size.data_ptr<int64_t>();
  char* rk = static_cast<char*>(ring_k.data_ptr());
  char* rv = static_cast<char*>(ring_v.data_ptr());
  FoldRow fold = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "headops kv_append fold",
                                  [&] { fold = &fold_row<scalar_t>; });
  const auto new_row = [&](const at::Tensor& t, int64_t b, int64_t i, int64_t h) {
    return static_cast<const char*>(t.data_ptr()) + (b * t.stride(0) + i * t.stride(1) + h * t.stride(2)) * t.element_size();
  };
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const int64_t first = len[b], last = len[b] + Sq;  // positions [first, last) are new
      const Compensation comp = kind[h] == kKvStreaming ? compensation_of(l.comp_table, index[h]) : Compensation{-1, false};
      if (comp.index >= 0) {  // fold what this call evicts, before the ring slots are overwritten
        const RingLayout ring{off[index[h]], snk[index[h]], size[index[h]]};
        const KeyRange gone = ring.evicted_between(first, last);
        const int64_t c = b * l.comp_heads + comp.index;
        for (int64_t p = gone.lo; p < gone.hi; ++p) {
          const int64_t slot = b * l.ring_slots + ring.offset + ring.slot_of(p);
          fold(l.comp_k + c * D, p < first ? rk + slot * row_bytes : new_row(k, b, p - first, h), D);
          fold(l.comp_v + c * D, p < first ? rv + slot * row_bytes : new_row(v, b, p - first, h), D);
        }
        l.comp_n[c] += gone.size();
      }
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t p = first + i;
        int64_t slot;
        char *dk, *dv;
        if (kind[h] == kKvFull) {
          const int64_t seg = l.segment_of(p);
          const int64_t n = l.full_starts[seg + 1] - l.full_starts[seg];
          slot = (b * l.full_heads + index[h]) * n + (p - l.full_starts[seg]);
          dk = static_cast<char*>(const_cast<void*>(l.full_k[seg]));
          dv = static_cast<char*>(const_cast<void*>(l.full_v[seg]));
        } else if (kind[h] == kKvBudget) {
          if (!write_budget) break;
          slot = b * l.ring_slots + budget_slot(l, b, index[h], p);
          dk = rk;
          dv = rv;
        } else {
          const RingLayout ring{off[index[h]], snk[index[h]], size[index[h]]};
          if (p >= ring.sinks && p < last - ring.ring) continue;  // overwritten before this call returns
          slot = b * l.ring_slots + ring.offset + ring.slot_of(p);
          dk = rk;
          dv = rv;
        }
        std::memcpy(dk + slot * row_bytes, new_row(k, b, i, h), row_bytes);
        std::memcpy(dv + slot * row_bytes, new_row(v, b, i, h), row_bytes);
      }
    }
  });
}

}  // namespace headops
