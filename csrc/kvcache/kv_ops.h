// The head-sparse KV cache ops: kv_append (write new tokens into each KV head's storage) and
// decode_attention (attention of a few new query tokens over every head's storage, one call).
// The full heads' storage is a list of segments ([B, Hf, n_s, D] each, positions in order),
// so that it grows without copying what it holds. Compensated streaming heads (comp_table,
// comp_k, comp_v, comp_n; kv_layout.h) fold what they evict into one more key.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace headops {

using OptTensor = std::optional<at::Tensor>;

void kv_append(const at::Tensor& k_new, const at::Tensor& v_new, at::TensorList full_k, at::TensorList full_v,
               const at::Tensor& ring_k, const at::Tensor& ring_v, const at::Tensor& lengths, const at::Tensor& kv_kind,
               const at::Tensor& kv_index, const at::Tensor& ring_offset, const at::Tensor& ring_sinks,
               const at::Tensor& ring_size, const OptTensor& budget_table, const OptTensor& slot_pos,
               const OptTensor& slot_mass, bool write_budget, const OptTensor& comp_table,
               const OptTensor& comp_k, const OptTensor& comp_v, const OptTensor& comp_n);

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

}  // namespace headops
