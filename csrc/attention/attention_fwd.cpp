#include "attention_fwd.h"

#include <ATen/ATen.h>

#include "attention_args.h"
#include "attention_params.h"
#include "cpu/attention_fwd_cpu.h"
#ifdef HEADOPS_WITH_CUDA
#include "cuda/attention_fwd_cuda.h"
#endif

namespace headops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, bool heads_first,
    double default_scale, const OptTensor& softmax_scale, const OptTensor& window, const OptTensor& sinks,
    const OptTensor& alpha, const OptTensor& key_bias, const OptTensor& sink_logit, const OptTensor& out_scale,
    const OptTensor& out_bias, const OptTensor& gate, bool skip_zero_gate, bool skip_unused_branch,
    bool save_for_backward) {
  const char* op = "headops.attention_fwd: ";
  const Dims d = check_qkv(op, q_in, k_in, v_in, heads_first, /*cuda_ok=*/true);
  const auto acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const PerHeadArgs args{softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate};
  check_per_head_args(op, d, acc, q_in, args);

  const at::Tensor q = rows_addressable(q_in, heads_first);
  const at::Tensor k = rows_addressable(k_in, heads_first);
  const at::Tensor v = rows_addressable(v_in, heads_first);
  at::Tensor out = heads_first ? at::empty({d.B, d.Hq, d.Sq, d.D}, q.options())
                               : at::empty({d.B, d.Sq, d.Hq, d.D}, q.options());
  const auto acc_options = q.options().dtype(acc);
  at::Tensor lse = at::empty({d.B, d.Hq, d.Sq}, acc_options);
  at::Tensor o_stream = at::empty({0}, acc_options), o_full = at::empty({0}, acc_options);
  at::Tensor lse_full = at::empty({0}, acc_options);
  if (save_for_backward) {
    o_stream = at::empty({d.B, d.Hq, d.Sq, d.D}, acc_options);
    if (alpha.has_value()) {
      o_full = at::empty({d.B, d.Hq, d.Sq, d.D}, acc_options);
      lse_full = at::empty({d.B, d.Hq, d.Sq}, acc_options);
    }
  }

  AttentionParams p;
  p.q = head_tensor(q, heads_first);
  p.k = head_tensor(k, heads_first);
  p.v = head_tensor(v, heads_first);
  p.out = head_tensor(out, heads_first);
  p.lse = lse.data_ptr();
  if (o_stream.numel() > 0) p.o_stream = o_stream.data_ptr();
  if (o_full.numel() > 0) {
    p.o_full = o_full.data_ptr();
    p.lse_full = lse_full.data_ptr();
  }
  fill_params(p, d, causal, default_scale, args);
  p.skip_zero_gate = skip_zero_gate;
  p.skip_unused_branch = skip_unused_branch;
  if (out.numel() > 0 || lse.numel() > 0) {
#ifdef HEADOPS_WITH_CUDA
    if (q.is_cuda()) {
      cuda::attention_forward(p, q, gate, window, sinks, alpha);
      return {out, lse, o_stream, o_full, lse_full};
    }
#endif
    cpu::attention_forward(p, q.scalar_type());
  }
  return {out, lse, o_stream, o_full, lse_full};
}

}  // namespace headops
