#include <ATen/ATen.h>

#include <algorithm>

#include "../attention/attention_args.h"
#include "cpu/decode_cpu.h"
#include "decode_params.h"
#include "kv_layout.h"
#include "kv_layout_checks.h"
#include "kv_ops.h"
#ifdef HEADOPS_WITH_CUDA
#include "cuda/kv_cache_cuda.h"
#endif

namespace headops {

at::Tensor decode_attention(const at::Tensor& q_in, at::TensorList full_k, at::TensorList full_v,
                            const at::Tensor& ring_k, const at::Tensor& ring_v, const at::Tensor& lengths,
                            const at::Tensor& kv_kind, const at::Tensor& kv_index, const at::Tensor& ring_offset,
                            const at::Tensor& ring_sinks, const at::Tensor& ring_size, bool causal,
                            double default_scale, const OptTensor& softmax_scale, const OptTensor& window,
                            const OptTensor& sinks, const OptTensor& alpha, const OptTensor& key_bias_in,
                            const OptTensor& sink_logit, const OptTensor& out_scale, const OptTensor& out_bias,
                            const OptTensor& gate, int64_t split_keys, const OptTensor& budget_table,
                            const OptTensor& slot_pos, const OptTensor& slot_mass, const OptTensor& comp_table,
                            const OptTensor& comp_k, const OptTensor& comp_v, const OptTensor& comp_n) {
  const char* op = "headops.decode_attention: ";
  TORCH_CHECK(q_in.dim() == 4, op, "q must be [B, Sq, Hq, D], got ", q_in.sizes());
  const LayerTensors layer{full_k, full_v, ring_k, ring_v, lengths, kv_kind, kv_index, ring_offset, ring_sinks,
                           ring_size, budget_table, slot_pos, slot_mass, comp_table, comp_k, comp_v, comp_n};
  const PerHeadArgs given{softmax_scale, window, sinks, alpha, key_bias_in, sink_logit, out_scale, out_bias, gate};
#ifdef HEADOPS_WITH_CUDA
  if (q_in.is_cuda())  // csrc/kvcache/cuda/: no host reads of device data (the value checks below are skipped)
    return cuda::decode_attention(q_in, layer, causal, default_scale, given, split_keys);
#endif
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q_in.device().is_cpu(), op, "device ", q_in.device(), " is not supported by this build");
  TORCH_CHECK(split_keys >= 1, op, "split_keys must be >= 1");
  const int64_t B = q_in.size(0), Sq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(D >= 1, op, "head dim must be >= 1");
  const int64_t Hkv = kv_kind.dim() == 1 ? kv_kind.size(0) : 0;
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, "q heads (", Hq, ") must be a multiple of the KV heads (", Hkv, ")");
  const LayerLayout l = check_layer_layout(op, dtype, B, Hkv, D, layer);
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* kind = kv_kind.data_ptr<int64_t>();
  const int64_t* index = kv_index.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= Sq, op, "row ", b, " holds ", len[b], " tokens, fewer than the ", Sq, " new queries");
    longest = std::max(longest, len[b]);
  }
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // key_bias is indexed by original position: its last axis covers the longest row
  const int64_t bias_len = key_bias_in.has_value() && key_bias_in->dim() == 3 ? key_bias_in->size(2) : longest;
  TORCH_CHECK(bias_len >= longest, op, "key_bias must cover every position (", longest, "), got ", bias_len);
  const Dims dims{B, Sq, bias_len, Hq, Hkv, D};
  check_per_head_args(op, dims, acc, q_in, given);

  const at::Tensor q = q_in.size(3) <= 1 || q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const OptTensor key_bias = key_bias_in.has_value() ? OptTensor(key_bias_in->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({B, Sq, Hq, D}, q.options());
  DecodeParams p;
  AttentionParams& a = p.attn;
  a.q = head_tensor(q, false);
  a.out = head_tensor(out, false);
  fill_params(a, dims, causal, default_scale,
              PerHeadArgs{softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate});
  p.full_k = l.full_k.data();
  p.full_v = l.full_v.data();
  p.full_starts = l.full_starts.data();
  p.full_segments = static_cast<int64_t>(l.full_k.size());
  p.full_heads = l.full_heads;
  p.ring_k = ring_k.data_ptr();
  p.ring_v = ring_v.data_ptr();
  p.ring_slots = l.ring_slots;
  p.lengths = len;
  p.kv_kind = kind;
  p.kv_index = index;
  p.ring_offset = ring_offset.data_ptr<int64_t>();
  p.ring_sinks = ring_sinks.data_ptr<int64_t>();
  p.ring_size = ring_size.data_ptr<int64_t>();
  p.split_keys = split_keys;
  p.budget_table = l.budget_table;
  p.budget_heads = l.budget_heads;
  p.slot_pos = l.slot_pos;
  p.slot_mass = l.slot_mass;
  p.comp_table = l.comp_table;
  p.comp_heads = l.comp_heads;
  p.comp_k = l.comp_k;
  p.comp_v = l.comp_v;
  p.comp_n = l.comp_n;
  // what a streaming KV head keeps must cover what each of its query heads can see
  const int64_t group = Hq / Hkv;
  for (int64_t h = 0; h < Hq; ++h) {
    if (kind[h / group] == kKvBudget) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t w = a.window.present() ? a.window.at<int64_t>(b, h) : -1;
        const bool full_branch = a.alpha.present() && (acc == at::kDouble ? a.alpha.at<double>(b, h) != 0.0
                                                                            : a.alpha.at<float>(b, h) != 0.0f);
        TORCH_CHECK(w < 0 && !full_branch, op, "query head ", h, " is served by a budget KV head: it sees the kept "
                    "tokens, so its window must be unlimited (< 0) and its alpha 0");
      }
      continue;
    }
    if (kind[h / group] != kKvStreaming) continue;
    const int64_t s = index[h / group];
    const int64_t kept_sinks = p.ring_sinks[s], ring = p.ring_size[s];
    for (int64_t b = 0; b < B; ++b) {
      const int64_t w = a.window.present() ? a.window.at<int64_t>(b, h) : -1;
      const int64_t sk = a.sinks.present() ? a.sinks.at<int64_t>(b, h) : 0;
      const bool full_branch = a.alpha.present() && (acc == at::kDouble ? a.alpha.at<double>(b, h) != 0.0
                                                                          : a.alpha.at<float>(b, h) != 0.0f);
      // the ring covers the window of the step's first query, or has evicted nothing yet (a ring
      // that grows with the tokens it receives holds every key until it reaches its capacity)
      const bool keeps_window = w <= ring - (Sq - 1) || len[b] - ring <= kept_sinks;
      TORCH_CHECK(w >= 1 && keeps_window && sk <= kept_sinks && !full_branch, op, "query head ", h,
                  " (window ", w, ", sinks ", sk, full_branch ? ", alpha > 0" : "", ") sees more than its streaming KV "
                  "head keeps (sinks ", kept_sinks, ", ring ", ring, " for ", Sq, " new tokens)");
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      if (kind[h] == kKvFull)
        TORCH_CHECK(len[b] <= l.full_capacity(), op, "row ", b, " holds ", len[b], " tokens, past the capacity ",
                    l.full_capacity());
  if (out.numel() > 0) cpu::decode_attention(p, dtype);
  return out;
}

}  // namespace headops
