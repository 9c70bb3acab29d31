#include "packed_sequences.h"

#include <ATen/ATen.h>

namespace headops {
namespace {

// The keys and values one run may hold: sequences of one length side by side join a run (one call
// over a view) only up to this. A call packs all its K/V blocks before its tiles read them, so a
// larger run leaves the caches between the two: 64 sequences of 64 tokens (H = 16, D = 128, float32,
// 1 MiB of K and V each) took 35 ms forward and 182 ms forward+backward as one run of 64 against
// 22-24 ms and 83-91 ms as runs of 1, 4 or 16 (bench/packed.py --lengths 64x64, the Zen 5 EPYC);
// bfloat16 92 ms forward+backward against 45 ms as runs of 4.
constexpr int64_t kRunKeyValueBytes = int64_t{4} << 20;

void append_runs(const int64_t* ids, int64_t row, int64_t S, int64_t key_value_bytes_per_token,
                 std::vector<SequenceRun>& runs, bool& packed) {
  int64_t start = 0;
  while (start < S) {
    int64_t end = start + 1;
    while (end < S && ids[end] == ids[start]) ++end;
    const int64_t length = end - start;
    if (end < S || start > 0) packed = true;
    SequenceRun* last = runs.empty() ? nullptr : &runs.back();
    const bool fits = (last != nullptr) && (last->count + 1) * length * key_value_bytes_per_token <= kRunKeyValueBytes;
    if (last != nullptr && last->row == row && last->length == length && fits &&
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
  const int64_t key_value_bytes_per_token = 2 * d.Hkv * d.D * static_cast<int64_t>(q.element_size());
  for (int64_t b = 0; b < d.B; ++b) append_runs(all + b * d.Sq, b, d.Sq, key_value_bytes_per_token, runs, packed);
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
