// CUDA side of headops::attention_fwd (compiled only when HEADOPS_WITH_CUDA is defined).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../attention_params.h"

namespace headops::cuda {

// Fills p.out and p.lse (and the saved branch averages when their pointers are set) for CUDA
// tensors; the caller has checked every argument. gate, window, sinks and alpha are the same
// tensors as p's pointers (the host reads them to build the work list: heads gated off exactly
// and key blocks nobody sees are never launched).
void attention_forward(const AttentionParams& p, const at::Tensor& q, const std::optional<at::Tensor>& gate,
                       const std::optional<at::Tensor>& window, const std::optional<at::Tensor>& sinks,
                       const std::optional<at::Tensor>& alpha);

// "tensor_core" or "generic": the kernel a call with these inputs runs (tests and benchmarks).
const char* kernel_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool heads_first);

}  // namespace headops::cuda
