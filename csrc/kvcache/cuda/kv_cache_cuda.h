// CUDA side of headops::kv_append and headops::decode_attention (compiled only when
// HEADOPS_WITH_CUDA is defined): the ops hand CUDA tensors here. NOT YET RUN ON A GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include "../kv_ops.h"

namespace headops::cuda {

void kv_append(const at::Tensor& k_new, const at::Tensor& v_new, at::TensorList full_k, at::TensorList full_v,
               const at::Tensor& ring_k, const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
               const at::Tensor& ring_size, const OptTensor& budget_table, const OptTensor& slot_pos,
               const OptTensor& slot_mass, bool write_budget, const OptTensor& comp_table, const OptTensor& comp_k,
               const OptTensor& comp_v, const OptTensor& comp_n);

at::Tensor decode_attention(const at::Tensor& q, at::TensorList full_k, at::TensorList full_v,
                            const at::Tensor& ring_k, const at::Tensor& ring_v, const at::Tensor& lengths,
                            const at::Tensor& kv_kind, const at::Tensor& kv_index, const at::Tensor& ring_offset,
                            const at::Tensor& ring_sinks, const at::Tensor& ring_size, bool causal,
                            double default_scale, const OptTensor& softmax_scale, const OptTensor& window,
                            const OptTensor& sinks, const OptTensor& alpha, const OptTensor& key_bias,
                            const OptTensor& sink_logit, const OptTensor& out_scale, const OptTensor& out_bias,
                            const OptTensor& gate, int64_t split_keys, const OptTensor& budget_table,
                            const OptTensor& slot_pos, const OptTensor& slot_mass, const OptTensor& comp_table,
                            const OptTensor& comp_k, const OptTensor& comp_v, const OptTensor& comp_n);

}  // namespace headops::cuda
