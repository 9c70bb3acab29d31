#include "key_lengths.h"

#include <ATen/ATen.h>

namespace headops {

std::vector<KeyLengthGroup> key_length_groups(const char* op, const std::optional<at::Tensor>& key_lengths,
                                              const Dims& d, const at::Tensor& q) {
  if (!key_lengths.has_value()) return {};
  TORCH_CHECK(key_lengths->dim() == 1 && key_lengths->size(0) == d.B, op, "key_lengths must have shape [", d.B,
              "] ([B]), got ", key_lengths->sizes());
  const at::Tensor host = integers_on_host(op, *key_lengths, "key_lengths", q);
  const int64_t* n = host.data_ptr<int64_t>();
  std::vector<KeyLengthGroup> groups;
  bool shorter = false;
  for (int64_t b = 0; b < d.B; ++b) {
    TORCH_CHECK(n[b] >= 0 && n[b] <= d.Sk, op, "key_lengths must be in [0, ", d.Sk, "] (the keys given), got ", n[b],
                " for row ", b);
    shorter = shorter || n[b] < d.Sk;
    if (!groups.empty() && groups.back().length == n[b])
      ++groups.back().rows;
    else
      groups.push_back({b, 1, n[b]});
  }
  if (!shorter) groups.clear();
  return groups;
}

at::Tensor group_view(const at::Tensor& t, const KeyLengthGroup& group, int64_t seq_dim) {
  at::Tensor rows = t.narrow(0, group.row, group.rows);
  return seq_dim < 0 ? rows : rows.narrow(seq_dim, 0, group.length);
}

}  // namespace headops
