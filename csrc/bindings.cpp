// The one place where headops registers its ops (torch.library) and its Python module.
#include <torch/extension.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <utility>

#include "attention/attention_bwd.h"
#include "attention/attention_fwd.h"
#include "attention/attention_probe.h"
#include "attention/cpu/attention_bwd_cpu.h"
#include "attention/cpu/attention_fwd_cpu.h"
#include "cpu/blas.h"
#include "cpu/isa_dispatch.h"
#include "attention/head_semantics.h"
#include "attention/online_softmax.h"
#include "attention/work_counters.h"
#include "kvcache/cuda/chunk_walk.h"
#include "kvcache/kv_ops.h"
#ifdef HEADOPS_WITH_CUDA
#include "attention/cuda/attention_fwd_cuda.h"
#include "attention/cuda/forward_kernel.cuh"
#endif

TORCH_LIBRARY(headops, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, bool heads_first, float default_scale, "
      "Tensor? softmax_scale, Tensor? window, Tensor? sinks, Tensor? alpha, Tensor? key_bias, "
      "Tensor? sink_logit, Tensor? out_scale, Tensor? out_bias, Tensor? gate, bool skip_zero_gate, "
      "bool skip_unused_branch, bool save_for_backward, bool precise_probabilities=False, Tensor? sequence_ids=None, "
      "Tensor? key_lengths=None) "
      "-> (Tensor out, Tensor lse, Tensor o_stream, Tensor o_full, Tensor lse_full)");
  m.def(
      "attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor o_stream, Tensor lse, "
      "Tensor? o_full, Tensor? lse_full, bool causal, bool heads_first, float default_scale, "
      "Tensor? softmax_scale, Tensor? window, Tensor? sinks, Tensor? alpha, Tensor? key_bias, "
      "Tensor? sink_logit, Tensor? out_scale, Tensor? out_bias, Tensor? gate, bool skip_zero_gate, "
      "int[] needs_grad, Tensor? sequence_ids=None, Tensor? key_lengths=None) -> Tensor[]");
  m.def(
      "attention_probe(Tensor q, Tensor k, Tensor v, bool causal, bool heads_first, float default_scale, "
      "Tensor? softmax_scale, Tensor? window, Tensor? sinks, Tensor? key_bias, Tensor? sink_logit, "
      "Tensor? out_scale, Tensor? out_bias, Tensor? gate, Tensor? spans, Tensor? distances, bool sink_mass, "
      "int topk, bool entropy, int[]? key_mass_rows) -> (Tensor out, Tensor lse, Tensor span_mass, "
      "Tensor distance_mass, Tensor sink_mass, Tensor entropy, Tensor topk_index, Tensor topk_prob, "
      "Tensor key_mass)");
  m.def(
      "kv_append(Tensor k_new, Tensor v_new, Tensor(a!)[] full_k, Tensor(b!)[] full_v, Tensor(c!) ring_k, "
      "Tensor(d!) ring_v, Tensor lengths, Tensor kv_kind, Tensor kv_index, Tensor ring_offset, Tensor ring_sinks, "
      "Tensor ring_size, Tensor? budget_table=None, Tensor(e!)? slot_pos=None, Tensor(f!)? slot_mass=None, "
      "bool write_budget=True, Tensor? comp_table=None, Tensor(g!)? comp_k=None, Tensor(h!)? comp_v=None, "
      "Tensor(i!)? comp_n=None) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor[] full_k, Tensor[] full_v, Tensor ring_k, Tensor ring_v, Tensor lengths, "
      "Tensor kv_kind, Tensor kv_index, Tensor ring_offset, Tensor ring_sinks, Tensor ring_size, bool causal, "
      "float default_scale, Tensor? softmax_scale, Tensor? window, Tensor? sinks, Tensor? alpha, Tensor? key_bias, "
      "Tensor? sink_logit, Tensor? out_scale, Tensor? out_bias, Tensor? gate, int split_keys, "
      "Tensor? budget_table=None, Tensor? slot_pos=None, Tensor(a!)? slot_mass=None, Tensor? comp_table=None, "
      "Tensor? comp_k=None, Tensor? comp_v=None, Tensor? comp_n=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(headops, CPU, m) {
  m.impl("attention_fwd", &headops::attention_fwd);
  m.impl("attention_bwd", &headops::attention_bwd);
  m.impl("attention_probe", &headops::attention_probe);
  m.impl("kv_append", &headops::kv_append);
  m.impl("decode_attention", &headops::decode_attention);
}

#ifdef HEADOPS_WITH_CUDA
// The forward, the backward and the KV-cache ops (each op hands CUDA tensors to its cuda/ host
// code: csrc/attention/cuda/, csrc/kvcache/cuda/; tested on an NVIDIA H200).
TORCH_LIBRARY_IMPL(headops, CUDA, m) {
  m.impl("attention_fwd", &headops::attention_fwd);
  m.impl("attention_bwd", &headops::attention_bwd);
  m.impl("attention_probe", &headops::attention_probe);  // raises NotImplementedError (CPU only)
  m.impl("kv_append", &headops::kv_append);
  m.impl("decode_attention", &headops::decode_attention);
}
#endif

namespace {

// c10's switch (c10/core/impl/alloc_cpu.cpp) that fills every new CPU allocation with a pattern
// that reads as NaN. Its headers do not declare it, so it is looked up in libc10 when asked for:
// a torch without it makes this test hook fail, never the import.
bool* junk_fill_flag() {
  static bool* const flag = [] {
    void* c10 = dlopen("libc10.so", RTLD_LAZY | RTLD_NOLOAD);
    return c10 ? static_cast<bool*>(dlsym(c10, "FLAGS_caffe2_cpu_allocator_do_junk_fill")) : nullptr;
  }();
  return flag;
}

using Range = std::pair<int64_t, int64_t>;

void bind_semantics(pybind11::module_ m) {
  using headops::HeadVisibility;
  using Softmax = headops::OnlineSoftmax<double>;
  m.def("visible", [](bool causal, int64_t window, int64_t sinks, int64_t pos, int64_t j) {
    return HeadVisibility{causal, window, sinks}.visible(pos, j);
  });
  m.def(
      "keys_for_positions",
      [](bool causal, int64_t window, int64_t sinks, int64_t pos_first, int64_t pos_last, int64_t Sk) {
        const auto keys = HeadVisibility{causal, window, sinks}.keys_for_positions(pos_first, pos_last, Sk);
        return std::make_pair(Range{keys.sinks.lo, keys.sinks.hi}, Range{keys.window.lo, keys.window.hi});
      },
      "((sinks lo, hi), (window lo, hi)): the keys the queries at positions [pos_first, pos_last] see");
  m.def(
      "block_fully_visible",
      [](bool causal, int64_t window, int64_t sinks, int64_t pos_first, int64_t pos_last, int64_t j0, int64_t j1) {
        return HeadVisibility{causal, window, sinks}.block_fully_visible(pos_first, pos_last, j0, j1);
      });
  m.def(
      "queries_for_key",
      [](bool causal, int64_t window, int64_t sinks, int64_t j, int64_t Sq, int64_t Sk) {
        const auto r = HeadVisibility{causal, window, sinks}.queries_for_key(j, Sq, Sk);
        return Range{r.lo, r.hi};
      },
      "(lo, hi): the queries that see key j (the CUDA backward's key-side walk)");
  // the online softmax of one row in float64; base2: log2 units (exp2/log2), as the tensor-core kernel
  m.def("softmax_start", [](bool has_sink_logit, double sink_logit, bool counts_sink) {
    const Softmax s = Softmax::start(has_sink_logit, sink_logit, counts_sink);
    return std::make_pair(s.max, s.sum);
  });
  m.def(
      "softmax_rescale",
      [](double max, double sum, double block_max, bool base2) {
        Softmax s{max, sum};
        const double correction = base2 ? s.rescale(block_max, [](double x) { return std::exp2(x); })
                                         : s.rescale(block_max, headops::StdExp{});
        return std::make_tuple(s.max, s.reference(), correction);
      },
      "(new max, reference, correction)");
  m.def("softmax_add", [](double max, double sum, double block_sum, double correction) {
    Softmax s{max, sum};
    s.add(block_sum, correction);
    return s.sum;
  });
  m.def(
      "staging_chunks",
      [](int lane, int chunks, int rows) {
        std::vector<std::pair<int, int>> out;
        for (headops::cuda::ChunkWalk at(lane, chunks, rows); at.more(); at.next()) out.emplace_back(at.row, at.chunk);
        return out;
      },
      "[(row, chunk)]: the 16-byte chunks lane copies of a tile of rows x chunks (chunk_walk.h, the CUDA decode's "
      "staging)");
  m.def("softmax_finish", [](double max, double sum, bool base2) {
    const Softmax s{max, sum};
    const double lse = base2 ? s.lse([](double x) { return std::log2(x); }) : s.lse(headops::StdLog{});
    return std::make_pair(s.inverse_sum(), lse);
  }, "(1 / sum, lse)");
}

std::vector<int64_t> read_work_counters() {
  std::vector<int64_t> out;
  for (auto& c : headops::work_counters()) out.push_back(c.load());
  return out;
}

void reset_work_counters() {
  for (auto& c : headops::work_counters()) c.store(0);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "headops compiled kernels (ops are registered under torch.ops.headops)";
  m.def("work_counters", &read_work_counters,
        "[work items, key blocks, score elements, value blocks, heads skipped] since the last reset");
  m.def("reset_work_counters", &reset_work_counters);
  m.def(
      "attention_grad_inputs",
      [] { return std::vector<std::string>(std::begin(headops::kBackwardGradNames), std::end(headops::kBackwardGradNames)); },
      "attention_fwd's argument names in the order of attention_bwd's needs_grad and of its gradients");
  m.def(
      "cpu_tile_shape",
      [](at::ScalarType dtype, int64_t head_dim) {
        auto t = headops::cpu::tile_shape(dtype, head_dim);
        return std::make_pair(t.block_q, t.block_k);
      },
      "(block_q, block_k) of the CPU kernel");
  m.def(
      "cpu_backward_tile_shape",
      [](at::ScalarType dtype, int64_t head_dim) {
        auto t = headops::cpu::backward_tile_shape(dtype, head_dim);
        return std::make_pair(t.block_q, t.block_k);
      },
      "(block_q, block_k) of the CPU backward for inputs of dtype");
  m.def("cpu_uses_packed_operands", &headops::cpu::uses_packed_operands);
  m.def("cpu_float_packing_rows", &headops::cpu::float_packing_rows, py::arg("backward"),
        "Rows per key from which a float call's tiles run through brgemm on packed operands (else BLAS sgemm).");
  m.def("cpu_brgemm_pairs", &headops::cpu::brgemm_pairs,
        "The B layout brgemm reads for dtype on this CPU: 2 (VNNI pairs), 1 (plain rows), 0 (no packed tiles).");
  m.def("cpu_runs_own_amx_tiles", &headops::cpu::runs_own_amx_tiles,
        "Whether tiles of this dtype and head dim run through headops' own AMX loops (else oneDNN's brgemm or BLAS).");
  m.def("cpu_splits_half_into_bf16_tiles", &headops::cpu::splits_half_into_bf16_tiles,
        "Whether float16 tiles run as two bfloat16 parts on headops' own AMX loops (AMX without AMX-FP16), for this "
        "head dim: the forward unless it keeps precise probabilities, the backward unless it learns softmax_scale or "
        "key_bias.");
  m.def("cpu_call_splits_half_into_bf16_tiles", &headops::cpu::call_splits_half_into_bf16_tiles,
        "Whether one such float16 call (head dim, query rows that read each key: seqlen_q x the GQA group) takes that "
        "split: enough rows per key to pay for packing two copies of K and V.");
  m.def("cpu_widens_half_to_float_tiles", &headops::cpu::widens_half_to_float_tiles,
        "Whether float16 forward tiles are widened to float32 and run through float brgemm on K and V packed once "
        "(brgemm runs float tiles here but has no float16 layout: AVX-512 without AVX512-FP16), for this head dim.");
  m.def("cpu_call_widens_half_to_float_tiles", &headops::cpu::call_widens_half_to_float_tiles,
        "Whether one such float16 forward call (head dim, query rows that read each key) takes that path: as many rows "
        "per key as a float32 call packs for.");
  m.def("cpu_l2_cache_bytes", &headops::cpu::l2_cache_bytes,
        "one core's L2 cache in bytes as torch's cpuinfo reads it (0 where unknown): some tile shapes follow it");
  m.def("cpu_capability", &headops::cpu::cpu_capability,
        "the CPU kernel variant in use: DEFAULT, AVX2 or AVX512 (ATen's choice; ATEN_CPU_CAPABILITY overrides)");
  m.def("cpu_have_native_blas", &headops::cpu::have_native_blas);
  m.def(
      "cpu_junk_fill",
      [](bool on) {
        bool* flag = junk_fill_flag();
        TORCH_CHECK(flag != nullptr, "cpu_junk_fill: this torch's libc10 has no caffe2_cpu_allocator_do_junk_fill");
        return std::exchange(*flag, on);
      },
      "test hook: while on, torch's CPU allocator fills each new tensor with a pattern that reads as NaN, so a "
      "kernel that leaves an output element unwritten shows it; returns the previous setting");
  bind_semantics(m.def_submodule(
      "semantics", "head_semantics.h, online_softmax.h and chunk_walk.h called one value at a time: what tests "
                   "and the CUDA emulations (tests/emulate_cuda_*.py) read instead of transcribing the rules"));
#ifdef HEADOPS_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def(
      "cuda_kernel_for",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool heads_first) {
        return std::string(headops::cuda::kernel_for(q, k, v, heads_first));
      },
      "'tensor_core' or 'generic': the CUDA forward kernel these inputs run (HEADOPS_CUDA_KERNEL=generic forces "
      "the generic one)");
  m.def(
      "cuda_forward_choice",
      [](const std::string& dtype, int64_t head_dim, bool alpha, bool rows_aligned, int64_t major,
         int64_t smem_optin) {
        namespace hc = headops::cuda;
        const hc::DType t = dtype == "bfloat16" ? hc::DType::kBFloat16
                            : dtype == "float16" ? hc::DType::kFloat16
                                                 : hc::DType::kFloat32;
        TORCH_CHECK(dtype == "bfloat16" || dtype == "float16" || dtype == "float32",
                    "cuda_forward_choice: dtype must be 'float32', 'bfloat16' or 'float16'");
        return std::string(hc::tensor_core_choice(t, head_dim, alpha, rows_aligned, static_cast<int>(major),
                                                  smem_optin, false) ? "tensor_core" : "generic");
      },
      "test hook: the forward kernel the host picks for (dtype, head dim, alpha, 16-byte aligned rows, compute "
      "capability major, opt-in shared memory per block) -- a pure function, no GPU needed");
#else
  m.attr("cuda_compiled") = false;
#endif
  // true in the `make test-asan` build (gcc defines this under -fsanitize=address)
#ifdef __SANITIZE_ADDRESS__
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
