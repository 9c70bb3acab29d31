#include "packed_sequences.h"

#include <ATen/ATen.h>

#ifdef HEADOPS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace headops {
namespace {

void check_not_capturing(const char* op, const at::Tensor& ids) {
#ifdef HEADOPS_WITH_CUDA
  if (!ids.is_cuda()) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(ids.device().index()), &status);
  TORCH_CHECK(err == cudaSuccess, op, "cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op,
              "sequence_ids on the GPU are read on the host, which a CUDA graph capture cannot do; pass them "
              "as a CPU tensor");
#else
  (void)op;
  (void)ids;
#endif
}

template <typename T>
void append_runs(const T* ids, int64_t row, int64_t S, std::vector<SequenceRun>& runs, bool& packed) {
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
  TORCH_CHECK(!ids.is_floating_point() && !ids.is_complex() && ids.scalar_type() != at::kBool, op,
              "sequence_ids must be an integer tensor, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == d.B && ids.size(1) == d.Sq, op, "sequence_ids must have shape [",
              d.B, ", ", d.Sq, "] ([B, S]), got ", ids.sizes());
  TORCH_CHECK(d.Sq == d.Sk, op, "sequence_ids are for self-attention over packed rows: q has ", d.Sq,
              " positions, k ", d.Sk);
  TORCH_CHECK(ids.is_cpu() || ids.device() == q.device(), op, "sequence_ids must be on the CPU or on q's device ",
              q.device(), ", got ", ids.device());
  check_not_capturing(op, ids);
  const at::Tensor host = ids.to(at::kCPU, at::kLong).contiguous();
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

RunHeadArgs::RunHeadArgs(const PerHeadArgs& args, const SequenceRun& run) {
  auto of_row = [&](const OptTensor& t) -> OptTensor {
    if (!t.has_value()) return std::nullopt;
    at::Tensor row = t->narrow(0, run.row, 1);
    std::vector<int64_t> shape(row.sizes().begin(), row.sizes().end());
    shape[0] = run.count;
    return row.expand(shape);
  };
  softmax_scale = of_row(args.softmax_scale);
  window = of_row(args.window);
  sinks = of_row(args.sinks);
  alpha = of_row(args.alpha);
  sink_logit = of_row(args.sink_logit);
  out_scale = of_row(args.out_scale);
  out_bias = of_row(args.out_bias);
  gate = of_row(args.gate);
  if (args.key_bias.has_value()) key_bias = of_row(args.key_bias->narrow(2, 0, run.length));
}

void add_run_gradient(at::Tensor& whole, const at::Tensor& run_grad, const SequenceRun& run, bool over_keys) {
  if (whole.numel() == 0 || run_grad.numel() == 0) return;
  at::Tensor row = whole.narrow(0, run.row, 1);
  if (over_keys) row = row.narrow(2, 0, run.length);
  row.add_(run_grad.sum(0, /*keepdim=*/true));
}

}  // namespace headops
