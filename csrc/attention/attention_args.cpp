#include "attention_args.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <climits>

namespace headops {

Dims check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool heads_first,
               bool cuda_ok) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, "q, k, v must be 4-D, got ", q.dim(), "-D, ",
              k.dim(), "-D, ", v.dim(), "-D");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, op, "k and v must have q's dtype ", dtype);
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, "q, k, v must be on one device");
#ifdef HEADOPS_WITH_CUDA
  const bool device_ok = q.device().is_cpu() || (cuda_ok && q.device().is_cuda());
#else
  const bool device_ok = q.device().is_cpu();
  (void)cuda_ok;
#endif
  TORCH_CHECK(device_ok, op, "device ", q.device(), " is not supported by this build");
  TORCH_CHECK(!q.device().is_cuda() || dtype != at::kDouble, op,
              "float64 is CPU only (CUDA takes float32, bfloat16 and float16)");
  const int64_t sd = heads_first ? 2 : 1, hd = heads_first ? 1 : 2;
  Dims d{q.size(0), q.size(sd), k.size(sd), q.size(hd), k.size(hd), q.size(3)};
  TORCH_CHECK(k.sizes() == v.sizes(), op, "k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == d.B, op, "k has batch ", k.size(0), ", q has ", d.B);
  TORCH_CHECK(k.size(3) == d.D, op, "k has head dim ", k.size(3), ", q has ", d.D);
  TORCH_CHECK(d.D >= 1, op, "head dim must be at least 1");
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, op, "q heads (", d.Hq, ") must be a multiple of kv heads (", d.Hkv,
              ")");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, op, "the last dim of q, k, v must be contiguous");
  return d;
}

namespace {

// Whether `bad` holds for some value of a checked [B, Hq] per-head tensor (int64, float or
// double; any strides). A CPU tensor is read in place: a model's layer calls this every step,
// where three ATen ops per value rule cost more than its attention at short lengths.
template <typename Bad>
bool any_value(const at::Tensor& t, Bad bad) {
  if (!t.is_cpu()) return bad(t).any().template item<bool>();
  const auto scan = [&](const auto* x) {
    for (int64_t i = 0; i < t.size(0); ++i)
      for (int64_t j = 0; j < t.size(1); ++j)
        if (bad(x[i * t.stride(0) + j * t.stride(1)])) return true;
    return false;
  };
  bool found = false;
  AT_DISPATCH_SWITCH(t.scalar_type(), "headops per-head values",
                     AT_DISPATCH_CASE(at::kLong, [&] { found = scan(t.data_ptr<scalar_t>()); })
                         AT_DISPATCH_CASE_FLOATING_TYPES([&] { found = scan(t.data_ptr<scalar_t>()); }));
  return found;
}

}  // namespace

void check_tensor(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Tensor& q, bool host_ok) {
  TORCH_CHECK(t.defined(), op, name, " is an undefined tensor");
  const bool host_beside_cuda = host_ok && q.is_cuda() && t.is_cpu();
  TORCH_CHECK(t.device() == q.device() || host_beside_cuda, op, name, " must be on ", q.device(),
              host_ok && q.is_cuda() ? " or on the CPU" : "", ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_per_head_args(const char* op, const Dims& d, at::ScalarType acc, const at::Tensor& q,
                         const PerHeadArgs& a, ValueChecks values, bool host_planning) {
  auto check = [&](const OptTensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                   bool host_ok = false) {
    if (t.has_value()) check_tensor(op, *t, name, dtype, shape, q, host_ok && host_planning);
  };
  check(a.softmax_scale, "softmax_scale", acc, {d.B, d.Hq});
  check(a.window, "window", at::kLong, {d.B, d.Hq}, true);
  check(a.sinks, "sinks", at::kLong, {d.B, d.Hq}, true);
  check(a.alpha, "alpha", acc, {d.B, d.Hq}, true);
  check(a.sink_logit, "sink_logit", acc, {d.B, d.Hq});
  check(a.gate, "gate", acc, {d.B, d.Hq}, true);
  check(a.key_bias, "key_bias", acc, {d.B, d.Hq, d.Sk});
  check(a.out_scale, "out_scale", acc, {d.B, d.Hq, d.D});
  check(a.out_bias, "out_bias", acc, {d.B, d.Hq, d.D});
  auto read = [&](const OptTensor& t) {
    return t.has_value() && t->numel() > 0 &&
           (values == ValueChecks::kAll || (values == ValueChecks::kHostOnly && t->is_cpu()));
  };
  if (read(a.window))
    TORCH_CHECK(!any_value(*a.window, [](auto w) { return w == 0; }), op,
                "window must be >= 1 (or < 0 for unlimited), got 0");
  if (read(a.sinks)) TORCH_CHECK(!any_value(*a.sinks, [](auto n) { return n < 0; }), op, "sinks must be >= 0");
  if (read(a.alpha))
    TORCH_CHECK(!any_value(*a.alpha, [](auto x) { return (x < 0) | (x > 1) | (x != x); }), op,
                "alpha must lie in [0, 1]");
}

at::Tensor rows_addressable(const at::Tensor& t, bool heads_first) {
  const int64_t seq_dim = heads_first ? 2 : 1;
  const int64_t D = t.size(3);
  const int64_t s = t.stride(seq_dim);
  if (D > 1 && t.stride(3) != 1) return t.contiguous();
  if (t.size(seq_dim) > 1 && (s < D || s > INT32_MAX)) return t.contiguous();
  return t;
}

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

namespace {

PerHead per_head(const OptTensor& t) {
  PerHead h;
  if (t.has_value()) {
    h.ptr = t->data_ptr();
    h.stride_b = t->stride(0);
    h.stride_h = t->stride(1);
  }
  return h;
}

PerHeadRow per_head_row(const OptTensor& t) {
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

void fill_params(AttentionParams& p, const Dims& d, bool causal, double default_scale, const PerHeadArgs& a) {
  p.batch = d.B;
  p.seqlen_q = d.Sq;
  p.seqlen_k = d.Sk;
  p.heads_q = d.Hq;
  p.heads_kv = d.Hkv;
  p.head_dim = d.D;
  p.causal = causal;
  p.default_softmax_scale = default_scale;
  p.softmax_scale = per_head(a.softmax_scale);
  p.window = per_head(a.window);
  p.sinks = per_head(a.sinks);
  p.alpha = per_head(a.alpha);
  p.sink_logit = per_head(a.sink_logit);
  p.gate = per_head(a.gate);
  p.key_bias = per_head_row(a.key_bias);
  p.out_scale = per_head_row(a.out_scale);
  p.out_bias = per_head_row(a.out_bias);
}

}  // namespace headops
