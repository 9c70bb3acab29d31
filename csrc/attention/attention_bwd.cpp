#include "attention_bwd.h"

#include <ATen/ATen.h>

#include "attention_args.h"
#include "attention_params.h"
#include "split_call.h"
#include "cpu/attention_bwd_cpu.h"
#include "../cpu/finite_half.h"
#ifdef HEADOPS_WITH_CUDA
#include "cuda/attention_bwd_cuda.h"
#endif

// GCC 12 warns that the destructor of an empty std::optional<at::Tensor> argument (c10's
// intrusive_ptr, inlined) "may be used uninitialized": a known false positive of
// -Wmaybe-uninitialized through std::optional, in torch's code, not this file's.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace headops {
namespace {

OptTensor contiguous_or_none(const OptTensor& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// dL/dout broadcast over batch, sequence or heads (stride 0 across a dimension of more than one
// element; out.sum()'s gradient is one value expanded to the output's shape) as the CPU kernel
// reads it, each (b, s, h) row once where it lies (prepare_rows): its distinct rows in the
// accumulation dtype, expanded back with stride 0, rather than copied out to the output's size
// (16 MB for B=1, S=2048, H=16, D=128 in float). nullopt for a dL/dout broadcast nowhere.
OptTensor distinct_rows_expanded(const at::Tensor& dout, at::ScalarType acc) {
  at::Tensor distinct = dout;
  bool broadcast = false;
  for (int64_t dim = 0; dim < 3; ++dim) {
    if (dout.stride(dim) == 0 && dout.size(dim) > 1) {
      distinct = distinct.narrow(dim, 0, 1);
      broadcast = true;
    }
  }
  if (!broadcast) return std::nullopt;
  return distinct.to(acc).contiguous().expand(dout.sizes());
}

// dk and dv per query head are scratch where per_kv_head makes the gradients of k and v from them
// as new tensors (a sum over each GQA group, a copy to the caller's layout or dtype): then they are
// kept per calling thread, up to kKeptAccumulatorBytes each, and reused by its next backward. A
// fresh buffer of that size page-faults in again every call, since glibc hands big buffers back
// to the system (docs/performance.md, "The backward's fresh pages").
constexpr int64_t kKeptAccumulatorBytes = int64_t(32) << 20;

at::Tensor kept_accumulator(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  thread_local at::Tensor kept[2];
  const int64_t elems = c10::multiply_integers(shape);
  if (elems * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType())) > kKeptAccumulatorBytes)
    return at::empty(shape, options);
  at::Tensor& buffer = kept[slot];
  if (!buffer.defined() || buffer.numel() < elems || buffer.scalar_type() != options.dtype().toScalarType())
    buffer = at::empty({elems}, options);
  return buffer.narrow(0, 0, elems).view(shape);
}

// The gradients of the per-head arguments given and wanted, zero-filled ([B, Hq], key_bias [B, Hq,
// Sk], out_scale and out_bias [B, Hq, D]; an empty tensor for the others), in BackwardGrad order
// from kGradSoftmaxScale.
std::vector<at::Tensor> per_head_gradients(const PerHeadArgs& args, const Dims& d, at::IntArrayRef needs_grad,
                                           const at::TensorOptions& acc_options) {
  auto zeros_if = [&](BackwardGrad g, const OptTensor& given, at::IntArrayRef shape) {
    return needs_grad[g] != 0 && given.has_value() ? at::zeros(shape, acc_options) : at::empty({0}, acc_options);
  };
  return {zeros_if(kGradSoftmaxScale, args.softmax_scale, {d.B, d.Hq}),
          zeros_if(kGradAlpha, args.alpha, {d.B, d.Hq}),
          zeros_if(kGradKeyBias, args.key_bias, {d.B, d.Hq, d.Sk}),
          zeros_if(kGradSinkLogit, args.sink_logit, {d.B, d.Hq}),
          zeros_if(kGradOutScale, args.out_scale, {d.B, d.Hq, d.D}),
          zeros_if(kGradOutBias, args.out_bias, {d.B, d.Hq, d.D}),
          zeros_if(kGradGate, args.gate, {d.B, d.Hq})};
}

// Checks of the backward's own arguments (the forward's are check_qkv's and check_per_head_args').
void check_backward_inputs(const char* op, const Dims& d, at::ScalarType acc, const at::Tensor& dout_in,
                           const OptTensor& dlse_in, const at::Tensor& q_in, const at::Tensor& o_stream,
                           const at::Tensor& lse, const OptTensor& o_full, const OptTensor& lse_full,
                           const OptTensor& alpha, at::IntArrayRef needs_grad) {
  TORCH_CHECK(static_cast<int64_t>(needs_grad.size()) == kNumBackwardGrads, op, "needs_grad must have ",
              int(kNumBackwardGrads), " entries (one per name of attention_grad_inputs()), got ", needs_grad.size());
  TORCH_CHECK(dout_in.sizes() == q_in.sizes(), op, "dout must have the output's shape ", q_in.sizes(), ", got ",
              dout_in.sizes());
  TORCH_CHECK(dout_in.is_floating_point() && dout_in.device() == q_in.device(), op,
              "dout must be a floating tensor on ", q_in.device());
  check_tensor(op, o_stream, "o_stream", acc, {d.B, d.Hq, d.Sq, d.D}, q_in);
  check_tensor(op, lse, "lse", acc, {d.B, d.Hq, d.Sq}, q_in);
  if (alpha.has_value()) {
    TORCH_CHECK(o_full.has_value() && lse_full.has_value(), op, "o_full and lse_full are required with alpha");
    check_tensor(op, *o_full, "o_full", acc, {d.B, d.Hq, d.Sq, d.D}, q_in);
    check_tensor(op, *lse_full, "lse_full", acc, {d.B, d.Hq, d.Sq}, q_in);
  }
  if (dlse_in.has_value()) {
    TORCH_CHECK(dlse_in->sizes() == lse.sizes() && dlse_in->is_floating_point() && dlse_in->device() == q_in.device(),
                op, "dlse must be a floating tensor of shape ", lse.sizes(), " on ", q_in.device());
    TORCH_CHECK(!alpha.has_value(), op, "dlse cannot be combined with alpha (there is no single lse)");
  }
}

// The backward over whole rows (each row one sequence); the arguments checked.
std::vector<at::Tensor> backward_rows(
    const Dims& d, const at::Tensor& dout_in, const OptTensor& dlse_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_stream, const at::Tensor& lse, const OptTensor& o_full,
    const OptTensor& lse_full, bool causal, bool heads_first, double default_scale, const PerHeadArgs& given,
    bool skip_zero_gate, at::IntArrayRef needs_grad) {
  const auto dtype = q_in.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const OptTensor &softmax_scale = given.softmax_scale, &window = given.window, &sinks = given.sinks,
                  &alpha = given.alpha, &key_bias_in = given.key_bias, &sink_logit = given.sink_logit,
                  &out_scale_in = given.out_scale, &out_bias_in = given.out_bias, &gate = given.gate;
  auto wants = [&](BackwardGrad g) { return needs_grad[g] != 0; };

  // the kernel reads everything in the accumulation dtype, rows addressable, the row
  // parameters contiguous; the CPU's brgemm tiles read 16-bit q, k, v as they are
  auto to_acc = [&](const at::Tensor& t) { return rows_addressable(t.to(acc), heads_first); };
  // float16 split into bfloat16 parts (cpu::backward_splits_half) needs finite q, k, v: inf times
  // a part of 0 makes NaN where the float path's one product gives +-inf
  const bool sums_ds = (wants(kGradSoftmaxScale) && softmax_scale.has_value()) ||
                       (wants(kGradKeyBias) && key_bias_in.has_value());
  const bool split_half = !q_in.is_cuda() && cpu::backward_splits_half(dtype, d.D, d.Sq * (d.Hq / d.Hkv), sums_ds) &&
                          cpu::all_finite_half(q_in) && cpu::all_finite_half(k_in) && cpu::all_finite_half(v_in);
  const bool inputs_as_given = !q_in.is_cuda() && (cpu::backward_reads_input_dtype(dtype, d.D) || split_half);
  auto input = [&](const at::Tensor& t) { return inputs_as_given ? rows_addressable(t, heads_first) : to_acc(t); };
  const at::Tensor q = input(q_in), k = input(k_in), v = input(v_in);
  const OptTensor dout_rows = q_in.is_cuda() ? std::nullopt : distinct_rows_expanded(dout_in, acc);
  const at::Tensor dout = dout_rows.has_value() ? *dout_rows : to_acc(dout_in);
  const at::Tensor o_stream_c = o_stream.contiguous(), lse_c = lse.contiguous();
  const OptTensor o_full_c = contiguous_or_none(o_full), lse_full_c = contiguous_or_none(lse_full);
  const OptTensor dlse = dlse_in.has_value() ? OptTensor(dlse_in->to(acc).contiguous()) : std::nullopt;
  const OptTensor key_bias = contiguous_or_none(key_bias_in);
  const OptTensor out_scale = contiguous_or_none(out_scale_in), out_bias = contiguous_or_none(out_bias_in);
  auto on_q_device = [&](const OptTensor& t) -> OptTensor {
    if (!t.has_value() || t->device() == q_in.device()) return t;
    return t->to(q_in.device());
  };
  const OptTensor window_d = on_q_device(window), sinks_d = on_q_device(sinks), alpha_d = on_q_device(alpha),
                  gate_d = on_q_device(gate);
  const PerHeadArgs args{softmax_scale, window_d, sinks_d, alpha_d, key_bias, sink_logit, out_scale, out_bias, gate_d};

  const auto options = q.options().dtype(acc);
  auto zeros_of = [&](bool wanted, at::IntArrayRef shape, at::ScalarType type) {
    return wanted ? at::zeros(shape, options.dtype(type)) : at::empty({0}, options.dtype(type));
  };
  const std::vector<int64_t> q_shape = heads_first ? std::vector<int64_t>{d.B, d.Hq, d.Sq, d.D}
                                                   : std::vector<int64_t>{d.B, d.Sq, d.Hq, d.D};
  // On the CPU dk and dv accumulate in heads-first rows whatever the layout: a key block's rows
  // take one brgemm accumulation per query tile, and in bshd one head's consecutive rows lie
  // H * D elements apart (a page apart from H * D = 1024 floats), so each accumulation touched a
  // page per row. On the 2-core AMX Xeon (B=1, H=16, S=2048, D=128, causal, .sum().backward(),
  // interleaved against SDPA) bshd took 0.87x SDPA's time in bf16 and 1.02x in fp32 where bhsd
  // took 0.77x and 0.97x. per_kv_head copies them back to the caller's layout. A backward that
  // writes each head's rows once (float through brgemm) writes them in the caller's layout.
  const bool written_once = !q_in.is_cuda() && cpu::backward_writes_key_grads_once(q.scalar_type(), d.D,
                                                                                    d.Sq * (d.Hq / d.Hkv));
  const bool kv_grads_heads_first = heads_first || (!q_in.is_cuda() && !written_once);
  const std::vector<int64_t> kv_per_q_head = kv_grads_heads_first ? std::vector<int64_t>{d.B, d.Hq, d.Sk, d.D}
                                                                  : std::vector<int64_t>{d.B, d.Sk, d.Hq, d.D};
  // the CPU kernel writes every element of dq, dk and dv (zeros where nothing reaches them), so
  // they are not filled first: at S = 2048 in fp32 that fill was 50 MB of writes per call
  const bool kernel_runs = d.B * d.Hq * d.Sq * d.D > 0;
  auto kernel_written = [&](bool wanted, at::IntArrayRef shape, at::ScalarType type) {
    if (!wanted || q_in.is_cuda() || !kernel_runs) return zeros_of(wanted, shape, type);
    return at::empty(shape, options.dtype(type));
  };
  // the CPU's 16-bit brgemm backward writes dq in the input dtype (backward_products.h: dq_t)
  at::Tensor dq = kernel_written(wants(kGradQ), q_shape, inputs_as_given ? dtype : acc);
  const int64_t group = d.Hq / d.Hkv;
  const bool kv_grads_copied = group > 1 || (kv_grads_heads_first && !heads_first) || dtype != acc;
  auto kv_grad = [&](BackwardGrad g, int slot) {
    if (!wants(g) || q_in.is_cuda() || !kernel_runs || !kv_grads_copied)
      return kernel_written(wants(g), kv_per_q_head, acc);
    return kept_accumulator(slot, kv_per_q_head, options);
  };
  at::Tensor dk = kv_grad(kGradK, 0);
  at::Tensor dv = kv_grad(kGradV, 1);
  std::vector<at::Tensor> per_head = per_head_gradients(args, d, needs_grad, options);
  auto grad_of = [&](BackwardGrad g) -> at::Tensor& { return per_head[g - kGradSoftmaxScale]; };
  at::Tensor &dscale = grad_of(kGradSoftmaxScale), &dalpha = grad_of(kGradAlpha), &dkey_bias = grad_of(kGradKeyBias),
             &dsink = grad_of(kGradSinkLogit), &dout_scale = grad_of(kGradOutScale),
             &dout_bias = grad_of(kGradOutBias), &dgate = grad_of(kGradGate);

  BackwardParams p;
  AttentionParams& f = p.fwd;
  f.q = head_tensor(q, heads_first);
  f.k = head_tensor(k, heads_first);
  f.v = head_tensor(v, heads_first);
  f.lse = lse_c.data_ptr();
  f.o_stream = o_stream_c.data_ptr();
  if (o_full_c.has_value()) {
    f.o_full = o_full_c->data_ptr();
    f.lse_full = lse_full_c->data_ptr();
  }
  fill_params(f, d, causal, default_scale, args);
  f.skip_unused_branch = true;  // a branch whose weight is 0 adds nothing to any gradient
  p.dout = head_tensor(dout, heads_first);
  p.dlse = dlse.has_value() ? dlse->data_ptr() : nullptr;
  p.skipped_zero_gate = skip_zero_gate;  // what the forward did: nothing of such a head was saved
  auto ptr = [](at::Tensor& t) -> void* { return t.numel() > 0 ? t.data_ptr() : nullptr; };
  p.want_dq = dq.numel() > 0;
  p.want_dk = dk.numel() > 0;
  p.want_dv = dv.numel() > 0;
  if (p.want_dq) p.dq = head_tensor(dq, heads_first);
  if (p.want_dk) p.dk = head_tensor(dk, kv_grads_heads_first);
  if (p.want_dv) p.dv = head_tensor(dv, kv_grads_heads_first);
  p.dsoftmax_scale = ptr(dscale);
  p.dalpha = ptr(dalpha);
  p.dsink_logit = ptr(dsink);
  p.dgate = ptr(dgate);
  p.dkey_bias = ptr(dkey_bias);
  p.dout_scale = ptr(dout_scale);
  p.dout_bias = ptr(dout_bias);
  if (kernel_runs) {
#ifdef HEADOPS_WITH_CUDA
    if (q.is_cuda())
      cuda::attention_backward(p, q);
    else
#endif
      cpu::attention_backward(p, q.scalar_type());
  }

  // dk, dv: sum the query heads of each GQA group (in a fixed order), back to k's dtype
  auto per_kv_head = [&](const at::Tensor& t, BackwardGrad g) {
    if (!wants(g)) return t;
    at::Tensor r = t;
    if (group > 1)
      r = kv_grads_heads_first ? t.view({d.B, d.Hkv, group, d.Sk, d.D}).sum(2)
                               : t.view({d.B, d.Sk, d.Hkv, group, d.D}).sum(3);
    if (kv_grads_heads_first && !heads_first)  // to the caller's layout and dtype in one copy
      return at::empty({d.B, d.Sk, d.Hkv, d.D}, r.options().dtype(dtype)).copy_(r.transpose(1, 2));
    return r.to(dtype);
  };
  return {wants(kGradQ) ? dq.to(dtype) : dq, per_kv_head(dk, kGradK), per_kv_head(dv, kGradV), dscale, dalpha,
          dkey_bias, dsink, dout_scale, dout_bias, dgate};
}

// A call split into parts (split_call.h): each part's backward over views of what the forward
// saved; q, k, v's gradients copied into the call's (zeros first where a key is in no part,
// `keys_left_out`: the slots past key_lengths), the per-head arguments' added in part order
// (deterministic).
template <typename Parts, typename View, typename KeyView, typename PartDims>
std::vector<at::Tensor> backward_parts(
    const Parts& parts, const Dims& d, const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& o_stream, const at::Tensor& lse,
    const OptTensor& o_full, const OptTensor& lse_full, bool causal, bool heads_first, double default_scale,
    const PerHeadArgs& args, bool skip_zero_gate, at::IntArrayRef needs_grad, View view, KeyView keys,
    PartDims dims, bool keys_left_out) {
  auto wants = [&](BackwardGrad g) { return needs_grad[g] != 0; };
  const auto acc_options = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto whole = [&](BackwardGrad g, const at::Tensor& like) {
    if (!wants(g)) return at::empty({0}, acc_options);
    const bool some_unwritten = keys_left_out && g != kGradQ;
    return some_unwritten ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  std::vector<at::Tensor> grads = {whole(kGradQ, q), whole(kGradK, k), whole(kGradV, v)};
  for (at::Tensor& t : per_head_gradients(args, d, needs_grad, acc_options)) grads.push_back(std::move(t));
  auto saved = [&](const OptTensor& t, const auto& part) -> OptTensor {
    if (!t.has_value()) return std::nullopt;
    return view(*t, part, true);
  };
  for (const auto& part : parts) {
    const PartHeadArgs part_args(args, part.part());
    const std::vector<at::Tensor> got = backward_rows(
        dims(part), view(dout, part, heads_first), saved(dlse, part), view(q, part, heads_first), keys(k, part),
        keys(v, part), view(o_stream, part, true), view(lse, part, true), saved(o_full, part),
        saved(lse_full, part), causal, heads_first, default_scale, part_args.view(), skip_zero_gate, needs_grad);
    if (wants(kGradQ)) view(grads[kGradQ], part, heads_first).copy_(got[kGradQ]);
    if (wants(kGradK)) keys(grads[kGradK], part).copy_(got[kGradK]);
    if (wants(kGradV)) keys(grads[kGradV], part).copy_(got[kGradV]);
    for (int g = kGradSoftmaxScale; g < kNumBackwardGrads; ++g)
      add_part_gradient(grads[g], got[g], part.part(), /*over_keys=*/g == kGradKeyBias);
  }
  return grads;
}

}  // namespace

std::vector<at::Tensor> attention_bwd(
    const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o_stream, const at::Tensor& lse, const OptTensor& o_full, const OptTensor& lse_full,
    bool causal, bool heads_first, double default_scale, const OptTensor& softmax_scale, const OptTensor& window,
    const OptTensor& sinks, const OptTensor& alpha, const OptTensor& key_bias, const OptTensor& sink_logit,
    const OptTensor& out_scale, const OptTensor& out_bias, const OptTensor& gate, bool skip_zero_gate,
    at::IntArrayRef needs_grad, const OptTensor& sequence_ids, const OptTensor& key_lengths) {
  const char* op = "headops.attention_bwd: ";
  const Dims d = check_qkv(op, q, k, v, heads_first, /*cuda_ok=*/true);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const PerHeadArgs args{softmax_scale, window, sinks, alpha, key_bias, sink_logit, out_scale, out_bias, gate};
  // the forward's planning arguments may be CPU tensors beside CUDA q (saved as given): checked as
  // they are, then copied to the device for the kernel (a small copy; the backward is not sync-free)
  check_per_head_args(op, d, acc, q, args, ValueChecks::kAll, /*host_planning=*/true);
  check_backward_inputs(op, d, acc, dout, dlse, q, o_stream, lse, o_full, lse_full, alpha, needs_grad);
  std::optional<std::vector<at::Tensor>> split = split_call<std::vector<at::Tensor>>(
      op, d, q, heads_first, sequence_ids, key_lengths,
      [&](const auto& parts, auto view, auto keys, auto dims, bool keys_left_out) {
        return backward_parts(parts, d, dout, dlse, q, k, v, o_stream, lse, o_full, lse_full, causal, heads_first,
                              default_scale, args, skip_zero_gate, needs_grad, view, keys, dims, keys_left_out);
      });
  if (split.has_value()) return *std::move(split);
  return backward_rows(d, dout, dlse, q, k, v, o_stream, lse, o_full, lse_full, causal, heads_first, default_scale,
                       args, skip_zero_gate, needs_grad);
}

}  // namespace headops
