// CUDA side of headops::kv_append and headops::decode_attention (compiled only when
// HEADOPS_WITH_CUDA is defined): the ops hand CUDA tensors here. Tested on an H200 (bench/gpu_suite.sh).
#pragma once

#include <ATen/core/Tensor.h>

#include "../../attention/attention_args.h"
#include "../kv_layout_checks.h"

namespace headops::cuda {

// `layer` as the CPU op took it (check_layer_shapes runs here; no values are read).
void kv_append(const at::Tensor& k_new, const at::Tensor& v_new, const LayerTensors& layer, bool write_budget);

at::Tensor decode_attention(const at::Tensor& q, const LayerTensors& layer, bool causal, double default_scale,
                            const PerHeadArgs& given, int64_t split_keys);

}  // namespace headops::cuda
