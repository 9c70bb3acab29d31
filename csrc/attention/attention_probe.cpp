#include "attention_probe.h"

#include <ATen/ATen.h>

#include "attention_fwd.h"
#include "cpu/attention_fwd_cpu.h"

namespace headops {

namespace {

const char* kOp = "headops.attention_probe: ";

// spans [n, 2] or [B, n, 2] / distances [n, 2]: int64 pairs on the CPU, checked by value
at::Tensor checked_pairs(const at::Tensor& t, const char* name, const Dims& d, bool per_batch_ok) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.device().is_cpu(), kOp, name, " must be an int64 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  const bool shape_ok = (t.dim() == 2 && t.size(1) == 2) ||
                        (per_batch_ok && t.dim() == 3 && t.size(2) == 2 && (t.size(0) == 1 || t.size(0) == d.B));
  TORCH_CHECK(shape_ok, kOp, name, " must have shape [n, 2]", per_batch_ok ? " or [B, n, 2]" : "", ", got ", t.sizes());
  return t.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_probe(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, bool heads_first,
                double default_scale, const OptTensor& softmax_scale, const OptTensor& window, const OptTensor& sinks,
                const OptTensor& key_bias, const OptTensor& sink_logit, const OptTensor& out_scale,
                const OptTensor& out_bias, const OptTensor& gate, const OptTensor& spans, const OptTensor& distances,
                bool sink_mass, int64_t topk, bool entropy, at::OptionalIntArrayRef key_mass_rows) {
  TORCH_CHECK_NOT_IMPLEMENTED(!q_in.is_cuda(), kOp,
                              "probe statistics (span_mass, distance_mass, sink_mass, entropy, topk, key_mass) are "
                              "computed by the CPU kernel only; CUDA tensors are not supported yet");
  const OptTensor no_alpha;
  const PerHeadArgs args{softmax_scale, window, sinks, no_alpha, key_bias, sink_logit, out_scale, out_bias, gate};
  ForwardCall call = prepare_forward(kOp, q_in, k_in, v_in, causal, heads_first, default_scale, args);
  const Dims& d = call.d;

  ProbeParams probe;
  at::Tensor spans_c, distances_c;
  if (spans.has_value()) {
    spans_c = checked_pairs(*spans, "spans", d, true);
    const at::Tensor start = spans_c.select(-1, 0), end = spans_c.select(-1, 1);
    TORCH_CHECK(spans_c.numel() == 0 || ((start >= 0) & (start <= end) & (end <= d.Sk)).all().item<bool>(), kOp,
                "spans must satisfy 0 <= start <= end <= Sk (", d.Sk, ")");
    probe.spans = spans_c.data_ptr<int64_t>();
    probe.n_spans = spans_c.size(-2);
    probe.spans_stride_b = spans_c.dim() == 3 && spans_c.size(0) == d.B && d.B > 1 ? spans_c.stride(0) : 0;
  }
  if (distances.has_value()) {
    distances_c = checked_pairs(*distances, "distances", d, false);
    const at::Tensor d0 = distances_c.select(1, 0), d1 = distances_c.select(1, 1);
    TORCH_CHECK(distances_c.numel() == 0 || ((d0 >= 0) & (d0 <= d1)).all().item<bool>(), kOp,
                "distances must satisfy 0 <= d0 <= d1");
    probe.distances = distances_c.data_ptr<int64_t>();
    probe.n_distances = distances_c.size(0);
  }
  TORCH_CHECK(topk >= 0 && topk <= ProbeParams::kMaxTopk, kOp, "topk must be in [0, ", ProbeParams::kMaxTopk, "], got ",
              topk);
  probe.sink_mass = sink_mass;
  probe.topk = topk;
  probe.entropy = entropy;
  if (key_mass_rows.has_value()) {
    const auto rows = *key_mass_rows;
    TORCH_CHECK(rows.size() == 2 && rows[0] >= 0 && rows[0] <= rows[1] && rows[1] <= d.Sq, kOp,
                "key_mass_rows must be (r0, r1) with 0 <= r0 <= r1 <= Sq (", d.Sq, "), got ", rows);
    probe.key_mass = true;
    probe.key_mass_r0 = rows[0];
    probe.key_mass_r1 = rows[1];
  }

  const auto f32 = call.q.options().dtype(at::kFloat);
  auto stat = [&](bool wanted, at::IntArrayRef shape, float*& where) {
    at::Tensor t = wanted ? at::empty(shape, f32) : at::empty({0}, f32);
    if (wanted) where = t.data_ptr<float>();
    return t;
  };
  at::Tensor span_mass = stat(spans.has_value(), {d.B, d.Hq, d.Sq, probe.n_spans}, probe.span_mass);
  at::Tensor distance_mass = stat(distances.has_value(), {d.B, d.Hq, d.Sq, probe.n_distances}, probe.distance_mass);
  at::Tensor sink_mass_out = stat(sink_mass, {d.B, d.Hq, d.Sq}, probe.sink_mass_out);
  at::Tensor entropy_out = stat(entropy, {d.B, d.Hq, d.Sq}, probe.entropy_out);
  at::Tensor topk_prob = stat(topk > 0, {d.B, d.Hq, d.Sq, topk}, probe.topk_prob);
  at::Tensor topk_index = at::empty(topk > 0 ? at::IntArrayRef{d.B, d.Hq, d.Sq, topk} : at::IntArrayRef{0},
                                    call.q.options().dtype(at::kLong));
  if (topk > 0) probe.topk_index = topk_index.data_ptr<int64_t>();
  // zeros: a head whose rows are all outside [r0, r1) (or Sq = 0) gives its keys no mass
  at::Tensor key_mass = probe.key_mass ? at::zeros({d.B, d.Hq, d.Sk}, f32) : at::empty({0}, f32);
  if (probe.key_mass) probe.key_mass_out = key_mass.data_ptr<float>();

  call.p.probe = &probe;
  if (call.out.numel() > 0 || call.lse.numel() > 0) cpu::attention_forward(call.p, call.q.scalar_type());
  return {call.out, call.lse, span_mass, distance_mass, sink_mass_out, entropy_out, topk_index, topk_prob, key_mass};
}

}  // namespace headops
