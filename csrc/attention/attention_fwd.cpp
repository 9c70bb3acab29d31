#include "attention_fwd.h"

#include <ATen/ATen.h>

#include "attention_args.h"
#include "attention_params.h"
#include "cpu/attention_fwd_cpu.h"
#ifdef HEADOPS_WITH_CUDA
#include "cuda/attention_fwd_cuda.h"
#endif

namespace headops {

ForwardCall prepare_forward(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            bool causal, bool heads_first, double default_scale, const PerHeadArgs& args) {
  ForwardCall call;
  call.d = check_qkv(op, q_in, k_in, v_in, heads_first, /*cuda_ok=*/true);
  const Dims& d = call.d;
  call.acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // CUDA: window, sinks, gate and alpha may be CPU tensors (read without a sync to plan the work);
  // the CUDA host code checks the values of those it reads (a device tensor's with one copy)
  check_per_head_args(op, d, call.acc, q_in, args, q_in.is_cuda() ? ValueChecks::kHostOnly : ValueChecks::kAll,
                      /*host_planning=*/true);
  call.q = rows_addressable(q_in, heads_first);
  call.k = rows_addressable(k_in, heads_first);
  call.v = rows_addressable(v_in, heads_first);
  call.out = heads_first ? at::empty({d.B, d.Hq, d.Sq, d.D}, call.q.options())
                         : at::empty({d.B, d.Sq, d.Hq, d.D}, call.q.options());
  call.lse = at::empty({d.B, d.Hq, d.Sq}, call.q.options().dtype(call.acc));
  AttentionParams& p = call.p;
  p.q = head_tensor(call.q, heads_first);
  p.k = head_tensor(call.k, heads_first);
  p.v = head_tensor(call.v, heads_first);
  p.out = head_tensor(call.out, heads_first);
  p.lse = call.lse.data_ptr();
  fill_params(p, d, causal, default_scale, args);
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, bool heads_first,
    double default_scale, const OptTensor& softmax_scale, const OptTensor& window, const OptTensor& sinks,
    const OptTensor& alpha, const OptTensor& key_bias, const OptTensor& sink_logit, const OptTensor& out_scale,
    const OptTensor& out_bias, const OptTensor& gate, bool skip_zero_gate, bool skip_unused_branch,
    bool save_for_backward, bool precise_probabilities) {
  const PerHeadArgs args{softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate};
  ForwardCall call = prepare_forward("headops.attention_fwd: ", q_in, k_in, v_in, causal, heads_first,
                                     default_scale, args);
  const Dims& d = call.d;
  const auto acc_options = call.q.options().dtype(call.acc);
  at::Tensor o_stream = at::empty({0}, acc_options), o_full = at::empty({0}, acc_options);
  at::Tensor lse_full = at::empty({0}, acc_options);
  AttentionParams& p = call.p;
  if (save_for_backward) {
    o_stream = at::empty({d.B, d.Hq, d.Sq, d.D}, acc_options);
    p.o_stream = o_stream.data_ptr();
    if (alpha.has_value()) {
      o_full = at::empty({d.B, d.Hq, d.Sq, d.D}, acc_options);
      lse_full = at::empty({d.B, d.Hq, d.Sq}, acc_options);
      p.o_full = o_full.data_ptr();
      p.lse_full = lse_full.data_ptr();
    }
  }
  p.skip_zero_gate = skip_zero_gate;
  p.skip_unused_branch = skip_unused_branch;
  p.precise_probabilities = precise_probabilities;
  if (call.out.numel() > 0 || call.lse.numel() > 0) {
#ifdef HEADOPS_WITH_CUDA
    if (call.q.is_cuda()) {
      cuda::attention_forward(p, call.q, gate, window, sinks, alpha);
      return {call.out, call.lse, o_stream, o_full, lse_full};
    }
#endif
    cpu::attention_forward(p, call.q.scalar_type());
  }
  return {call.out, call.lse, o_stream, o_full, lse_full};
}

}  // namespace headops
