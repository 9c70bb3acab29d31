#include "finite_half.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>

namespace headops::cpu {

bool all_finite_half(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.device().is_cpu(), "headops: all_finite_half takes a CPU float16 tensor");
  if (t.numel() == 0) return true;
  // rows along the last dim where it is contiguous, else a contiguous copy (rare: the kernels'
  // inputs have contiguous rows)
  const at::Tensor rows = t.dim() > 0 && t.stride(-1) == 1 ? t : t.contiguous();
  const int64_t n = rows.dim() > 0 ? rows.size(-1) : 1, count = rows.numel() / n;
  const at::Tensor flat_rows = rows.dim() > 1 ? rows.flatten(0, -2) : rows.reshape({1, n});  // a view where it can be
  const c10::Half* base = flat_rows.data_ptr<c10::Half>();
  const int64_t stride = flat_rows.stride(0);
  std::atomic<bool> finite{true};
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end && finite.load(std::memory_order_relaxed); ++r)
      if (!all_finite_half(base + r * stride, n)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace headops::cpu
