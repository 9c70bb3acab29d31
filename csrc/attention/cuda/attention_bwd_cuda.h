// CUDA side of headops::attention_bwd (compiled only when HEADOPS_WITH_CUDA is defined).
#pragma once

#include <ATen/core/Tensor.h>

#include "../attention_params.h"

namespace headops::cuda {

// Fills the gradients p points to (zero-filled by the caller) for CUDA tensors in float32 (the
// dispatcher converts bfloat16/float16 inputs); the caller has checked every argument. `q` gives
// the device (guard) and the tensor options of the scratch buffers.
void attention_backward(const BackwardParams& p, const at::Tensor& q);

}  // namespace headops::cuda
