#include "call_parts.h"

#include <ATen/ATen.h>

#include <vector>

#ifdef HEADOPS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace headops {

at::Tensor integers_on_host(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool, op, name,
              " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.is_cpu() || t.device() == q.device(), op, name, " must be on the CPU or on q's device ", q.device(),
              ", got ", t.device());
#ifdef HEADOPS_WITH_CUDA
  if (t.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(t.device().index()), &status);
    TORCH_CHECK(err == cudaSuccess, op, "cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
    TORCH_CHECK(status == cudaStreamCaptureStatusNone, op, name, " on the GPU are read on the host, which a CUDA "
                "graph capture cannot do; pass them as a CPU tensor");
  }
#endif
  return t.to(at::kCPU, at::kLong).contiguous();
}

PartHeadArgs::PartHeadArgs(const PerHeadArgs& args, const CallPart& part) {
  auto of_rows = [&](const OptTensor& t) -> OptTensor {
    if (!t.has_value()) return std::nullopt;
    at::Tensor rows = t->narrow(0, part.row, part.rows);
    if (part.repeat == 1) return rows;
    // [rows, ...] -> [rows, repeat, ...] (stride 0) -> [rows * repeat, ...]; a view for one row
    std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
    shape.insert(shape.begin() + 1, part.repeat);
    at::Tensor repeated = rows.unsqueeze(1).expand(shape);
    shape.erase(shape.begin() + 1);
    shape[0] = part.rows * part.repeat;
    return repeated.reshape(shape);
  };
  softmax_scale = of_rows(args.softmax_scale);
  window = of_rows(args.window);
  sinks = of_rows(args.sinks);
  alpha = of_rows(args.alpha);
  sink_logit = of_rows(args.sink_logit);
  out_scale = of_rows(args.out_scale);
  out_bias = of_rows(args.out_bias);
  gate = of_rows(args.gate);
  if (args.key_bias.has_value()) key_bias = of_rows(args.key_bias->narrow(2, 0, part.keys));
}

void add_part_gradient(at::Tensor& whole, const at::Tensor& part_grad, const CallPart& part, bool over_keys) {
  if (whole.numel() == 0 || part_grad.numel() == 0) return;
  at::Tensor rows = whole.narrow(0, part.row, part.rows);
  if (over_keys) rows = rows.narrow(2, 0, part.keys);
  std::vector<int64_t> shape(part_grad.sizes().begin(), part_grad.sizes().end());
  shape[0] = part.repeat;
  shape.insert(shape.begin(), part.rows);
  rows.add_(part_grad.reshape(shape).sum(1));
}

}  // namespace headops
