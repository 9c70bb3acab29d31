#include "attention_fwd.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "attention_params.h"
#include "cpu/attention_fwd_cpu.h"

namespace headops {
namespace {

const char* kOp = "headops.attention_fwd: ";

HeadTensor head_tensor(const at::Tensor& t, bool heads_first) {
  HeadTensor h;
  h.ptr = t.data_ptr();
  h.stride_b = t.stride(0);
  h.stride_s = t.stride(heads_first ? 2 : 1);
  h.stride_h = t.stride(heads_first ? 1 : 2);
  // a single row's stride is never stepped; BLAS still checks it as a leading dimension
  if (t.size(heads_first ? 2 : 1) <= 1) h.stride_s = std::max<int64_t>(h.stride_s, t.size(3));
  return h;
}

// BLAS/brgemm read a row block with one leading dimension: it must cover a row. Overlapping
// rows (a stride below D, e.g. an expanded sequence axis) or a stride past 32 bits get a copy.
at::Tensor rows_addressable(const at::Tensor& t, bool heads_first) {
  const int64_t seq_dim = heads_first ? 2 : 1;
  const int64_t D = t.size(3);
  const int64_t s = t.stride(seq_dim);
  if (t.size(seq_dim) > 1 && (s < D || s > INT32_MAX)) return t.contiguous();
  return t;
}

void check_per_head(const std::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
                    at::IntArrayRef shape, const at::Tensor& q) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->defined(), kOp, name, " is an undefined tensor");
  TORCH_CHECK(t->device() == q.device(), kOp, name, " must be on ", q.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == dtype, kOp, name, " must have dtype ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, kOp, name, " must have shape ", shape, ", got ", t->sizes());
}

PerHead per_head(const std::optional<at::Tensor>& t) {
  PerHead h;
  if (t.has_value()) {
    h.ptr = t->data_ptr();
    h.stride_b = t->stride(0);
    h.stride_h = t->stride(1);
  }
  return h;
}

PerHeadRow per_head_row(const std::optional<at::Tensor>& t) {
  PerHeadRow h;
  if (t.has_value()) {
    h.ptr = t->data_ptr();
    h.stride_b = t->stride(0);
    h.stride_h = t->stride(1);
    h.stride_n = t->stride(2);
  }
  return h;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, bool heads_first,
    double default_scale, const std::optional<at::Tensor>& softmax_scale, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_bias,
    const std::optional<at::Tensor>& gate, bool skip_zero_gate) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, kOp, "q, k, v must be 4-D, got ", q_in.dim(),
              "-D, ", k_in.dim(), "-D, ", v_in.dim(), "-D");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype, kOp, "k and v must have q's dtype ", dtype);
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(), kOp,
              "q, k, v must be on one device");
  TORCH_CHECK(q_in.device().is_cpu(), kOp, "device ", q_in.device(), " is not supported by this build");
  const int64_t sd = heads_first ? 2 : 1, hd = heads_first ? 1 : 2;
  const int64_t B = q_in.size(0), Sq = q_in.size(sd), Hq = q_in.size(hd), D = q_in.size(3);
  const int64_t Sk = k_in.size(sd), Hkv = k_in.size(hd);
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), kOp, "k and v must have one shape, got ", k_in.sizes(), " and ",
              v_in.sizes());
  TORCH_CHECK(k_in.size(0) == B, kOp, "k has batch ", k_in.size(0), ", q has ", B);
  TORCH_CHECK(k_in.size(3) == D, kOp, "k has head dim ", k_in.size(3), ", q has ", D);
  TORCH_CHECK(D >= 1, kOp, "head dim must be at least 1");
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, kOp, "q heads (", Hq, ") must be a multiple of kv heads (", Hkv, ")");
  for (const at::Tensor* t : {&q_in, &k_in, &v_in})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, kOp, "the last dim of q, k, v must be contiguous");

  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_per_head(softmax_scale, "softmax_scale", acc, {B, Hq}, q_in);
  check_per_head(window, "window", at::kLong, {B, Hq}, q_in);
  check_per_head(sinks, "sinks", at::kLong, {B, Hq}, q_in);
  check_per_head(alpha, "alpha", acc, {B, Hq}, q_in);
  check_per_head(sink_logit, "sink_logit", acc, {B, Hq}, q_in);
  check_per_head(gate, "gate", acc, {B, Hq}, q_in);
  check_per_head(key_bias, "key_bias", acc, {B, Hq, Sk}, q_in);
  check_per_head(out_scale, "out_scale", acc, {B, Hq, D}, q_in);
  check_per_head(out_bias, "out_bias", acc, {B, Hq, D}, q_in);
  if (window.has_value() && window->numel() > 0)
    TORCH_CHECK(!(*window == 0).any().item<bool>(), kOp, "window must be >= 1 (or < 0 for unlimited), got 0");
  if (sinks.has_value() && sinks->numel() > 0)
    TORCH_CHECK(!(*sinks < 0).any().item<bool>(), kOp, "sinks must be >= 0");
  if (alpha.has_value() && alpha->numel() > 0)
    TORCH_CHECK(((*alpha >= 0) & (*alpha <= 1)).all().item<bool>(), kOp, "alpha must lie in [0, 1]");

  const at::Tensor q = rows_addressable(q_in, heads_first);
  const at::Tensor k = rows_addressable(k_in, heads_first);
  const at::Tensor v = rows_addressable(v_in, heads_first);
  at::Tensor out = heads_first ? at::empty({B, Hq, Sq, D}, q.options()) : at::empty({B, Sq, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(acc));

  AttentionParams p;
  p.q = head_tensor(q, heads_first);
  p.k = head_tensor(k, heads_first);
  p.v = head_tensor(v, heads_first);
  p.out = head_tensor(out, heads_first);
  p.lse = lse.data_ptr();
  p.batch = B;
  p.seqlen_q = Sq;
  p.seqlen_k = Sk;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.head_dim = D;
  p.causal = causal;
  p.default_softmax_scale = default_scale;
  p.skip_zero_gate = skip_zero_gate;
  p.softmax_scale = per_head(softmax_scale);
  p.window = per_head(window);
  p.sinks = per_head(sinks);
  p.alpha = per_head(alpha);
  p.sink_logit = per_head(sink_logit);
  p.gate = per_head(gate);
  p.key_bias = per_head_row(key_bias);
  p.out_scale = per_head_row(out_scale);
  p.out_bias = per_head_row(out_bias);
  if (out.numel() > 0 || lse.numel() > 0) cpu::attention_forward(p, dtype);
  return {out, lse};
}

}  // namespace headops
