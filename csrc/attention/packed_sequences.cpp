#include "packed_sequences.h"

#include <ATen/ATen.h>

namespace headops {
namespace {

void append_runs(const int64_t* ids, int64_t row, int64_t S, std::vector<SequenceRun>& runs, bool& packed) {
  int64_t start = 0;
  while (start < S) {
    int64_t end = start + 1;
    while (end < S && ids[end] == ids[start]) ++end;
    const int64_t length = end - start;
    if (end < S || start > 0) packed = true;
    SequenceRun* last = runs.empty() ? nullptr : &runs.back();
    if (last != nullptr && last->row == row && last->length == length &&
        last->start + last->count * last->length == start)
      ++last->count;
    else
      runs.push_back({row, start, length, 1});
    start = end;
  }
}

}  // namespace

std::vector<SequenceRun> packed_runs(const char* op, const std::optional<at::Tensor>& sequence_ids, const Dims& d,
                                     const at::Tensor& q) {
  if (!sequence_ids.has_value()) return {};
  const at::Tensor& ids = *sequence_ids;
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == d.B && ids.size(1) == d.Sq, op, "sequence_ids must have shape [",
              d.B, ", ", d.Sq, "] ([B, S]), got ", ids.sizes());
  TORCH_CHECK(d.Sq == d.Sk, op, "sequence_ids are for self-attention over packed rows: q has ", d.Sq,
              " positions, k ", d.Sk);
  const at::Tensor host = integers_on_host(op, ids, "sequence_ids", q);
  const int64_t* all = host.data_ptr<int64_t>();
  std::vector<SequenceRun> runs;
  bool packed = false;
  for (int64_t b = 0; b < d.B; ++b) append_runs(all + b * d.Sq, b, d.Sq, runs, packed);
  if (!packed) runs.clear();
  return runs;
}

at::Tensor run_view(const at::Tensor& t, const SequenceRun& run, bool heads_first) {
  const int64_t seq = heads_first ? 2 : 1;
  at::Tensor row = t.narrow(0, run.row, 1).narrow(seq, run.start, run.count * run.length);
  // [1, ..., count * length, ...] -> [1, ..., count, length, ...] -> the count in front
  at::Tensor split = row.unflatten(seq, {run.count, run.length}).squeeze(0);
  return heads_first ? split.transpose(0, 1) : split;
}

}  // namespace headops
