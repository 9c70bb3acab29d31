// Host side of the CUDA head-sparse cache ops: shape/dtype/device checks, the full segments'
// table on the device, scratch for the decode's split partials, launches on the current stream
// under a device guard.
//
// No device-to-host synchronisation: launches are sized from shapes and capacities only (the
// decode's splits from the full storage's capacity and the streaming storage's slots; blocks
// past a row's length exit early), the segment table is written by a kernel from values in its
// parameters (nothing is read from host memory at replay: a CUDA graph can capture a step).
// The value checks the CPU ops run on host data (lengths, kinds, indices, ring and budget
// layouts, compensation counts, window/sinks/alpha of the query heads a streaming or budget
// KV head serves, key_bias covering the longest row) are SKIPPED here for CUDA inputs: the
// Python layer (HeadSparseCache / LayerStorage) built and validated these tables from its host
// mirror. The kernels range-guard every index they take from a table, so an inconsistent raw
// call reads "no key" / writes nothing where the CPU op would raise; it does not access memory
// out of bounds.
//
// Tested on an NVIDIA H200; see decode_kernel.cu and append_kernel.cu.
#ifdef HEADOPS_WITH_CUDA

#include "kv_cache_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "../../attention/attention_args.h"
#include "../../attention/cuda/cuda_dtype.h"
#include "../kv_layout_checks.h"
#include "kv_cache_kernels.cuh"

namespace headops::cuda {
namespace {

// The layer's storage fields of DecodeParams (device pointers), checked for shapes, dtypes and
// devices only (check_layer_shapes, shared with the CPU ops; no values: see the top of this file).
// `table` keeps the segment table alive.
struct DeviceLayer {
  DecodeParams p;
  at::Tensor table;
  int64_t full_capacity = 0;
  bool aligned_rows = false;  // every storage starts on 16 bytes (rows too when D * elem is a multiple of 16)
};

bool starts_on_16_bytes(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

DeviceLayer device_layer(const char* op, at::ScalarType dtype, const at::Device& device, int64_t B, int64_t Hkv,
                         int64_t D, const LayerTensors& t, cudaStream_t stream) {
  const LayerShapes shapes = check_layer_shapes(op, dtype, device, B, Hkv, D, t);
  DeviceLayer l;
  DecodeParams& p = l.p;
  const int64_t S = static_cast<int64_t>(t.full_k.size());
  std::vector<int64_t> table(3 * S + 1, 0);  // key pointers, value pointers, starts
  for (int64_t s = 0; s < S; ++s) {
    table[s] = reinterpret_cast<int64_t>(t.full_k[s].data_ptr());
    table[S + s] = reinterpret_cast<int64_t>(t.full_v[s].data_ptr());
    table[2 * S + s] = shapes.full_starts[s];
  }
  table[3 * S] = shapes.full_starts[S];
  l.full_capacity = table[3 * S];
  l.aligned_rows = (D * t.ring_k.element_size()) % 16 == 0 && starts_on_16_bytes(t.ring_k) && starts_on_16_bytes(t.ring_v);
  for (int64_t s = 0; s < S; ++s)
    l.aligned_rows = l.aligned_rows && starts_on_16_bytes(t.full_k[s]) && starts_on_16_bytes(t.full_v[s]);
  l.table = at::empty({3 * S + 1}, at::TensorOptions().dtype(at::kLong).device(device));
  const cudaError_t err = launch_write_table(l.table.data_ptr<int64_t>(), table.data(), 3 * S + 1, stream);
  TORCH_CHECK(err == cudaSuccess, op, "CUDA launch failed (segment table): ", cudaGetErrorString(err));
  const int64_t* dt = l.table.data_ptr<int64_t>();
  p.full_k = reinterpret_cast<const void* const*>(dt);
  p.full_v = reinterpret_cast<const void* const*>(dt + S);
  p.full_starts = dt + 2 * S;
  p.full_segments = S;
  p.full_heads = shapes.full_heads;
  p.ring_k = t.ring_k.data_ptr();
  p.ring_v = t.ring_v.data_ptr();
  p.ring_slots = shapes.ring_slots;
  p.lengths = t.lengths.data_ptr<int64_t>();
  p.kv_kind = t.kv_kind.data_ptr<int64_t>();
  p.kv_index = t.kv_index.data_ptr<int64_t>();
  p.ring_offset = t.ring_offset.data_ptr<int64_t>();
  p.ring_sinks = t.ring_sinks.data_ptr<int64_t>();
  p.ring_size = t.ring_size.data_ptr<int64_t>();
  p.ring_heads = shapes.ring_heads;
  if (t.budget_table.has_value()) {
    p.budget_table = t.budget_table->data_ptr<int64_t>();
    p.budget_heads = shapes.budget_heads;
    p.slot_pos = t.slot_pos->data_ptr<int64_t>();
    p.slot_mass = t.slot_mass->data_ptr<float>();
  }
  if (t.comp_table.has_value()) {
    p.comp_table = t.comp_table->data_ptr<int64_t>();
    p.comp_heads = shapes.comp_heads;
    p.comp_k = t.comp_k->data_ptr<double>();
    p.comp_v = t.comp_v->data_ptr<double>();
    p.comp_n = t.comp_n->data_ptr<int64_t>();
  }
  return l;
}

void check_on(const char* op, const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, name, " must be on ", device, ", got ", t.device());
}

}  // namespace

void kv_append(const at::Tensor& k_new, const at::Tensor& v_new, const LayerTensors& layer, bool write_budget) {
  const char* op = "headops.kv_append: ";
  const DType dtype = dtype_of(op, k_new.scalar_type());
  const at::Device device = k_new.device();
  check_on(op, v_new, "v_new", device);
  const int64_t B = k_new.size(0), Sq = k_new.size(1), Hkv = k_new.size(2), D = k_new.size(3);
  TORCH_CHECK(B < 65536 && Hkv < (int64_t(1) << 31), op, "batch or KV heads too large for CUDA");
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DeviceLayer l = device_layer(op, k_new.scalar_type(), device, B, Hkv, D, layer, stream);
  if (B == 0 || Hkv == 0 || Sq == 0 || D == 0) return;
  const at::Tensor k = k_new.stride(3) == 1 ? k_new : k_new.contiguous();
  const at::Tensor v = v_new.stride(3) == 1 ? v_new : v_new.contiguous();
  AppendParams ap;
  ap.k_new = k.data_ptr();
  ap.v_new = v.data_ptr();
  ap.k_stride_b = k.stride(0);
  ap.k_stride_s = k.stride(1);
  ap.k_stride_h = k.stride(2);
  ap.v_stride_b = v.stride(0);
  ap.v_stride_s = v.stride(1);
  ap.v_stride_h = v.stride(2);
  ap.seqlen = Sq;
  ap.write_budget = write_budget;
  ap.layer = l.p;
  ap.layer.attn.batch = B;
  ap.layer.attn.heads_kv = Hkv;
  ap.layer.attn.head_dim = D;
  const cudaError_t err = launch_append(ap, dtype, stream);
  TORCH_CHECK(err == cudaSuccess, op, "CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor decode_attention(const at::Tensor& q_in, const LayerTensors& layer, bool causal, double default_scale,
                            const PerHeadArgs& given, int64_t split_keys) {
  const char* op = "headops.decode_attention: ";
  const DType dtype = dtype_of(op, q_in.scalar_type());
  TORCH_CHECK(split_keys >= 1, op, "split_keys must be >= 1");
  const int64_t B = q_in.size(0), Sq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(D >= 1 && D <= kDecodeMaxHeadDim, op, "head dim ", D, " is not supported on CUDA (1 to ",
              kDecodeMaxHeadDim, ")");
  const int64_t Hkv = layer.kv_kind.dim() == 1 ? layer.kv_kind.size(0) : 0;
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, "q heads (", Hq, ") must be a multiple of the KV heads (", Hkv, ")");
  TORCH_CHECK(B < 65536 && Hkv < 65536, op, "batch or KV heads too large for CUDA");
  const at::Device device = q_in.device();
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceLayer l = device_layer(op, q_in.scalar_type(), device, B, Hkv, D, layer, stream);
  // key_bias is indexed by position; whether it covers the longest row is the Python layer's check
  // (the kernel reads no bias past its last axis)
  const OptTensor& key_bias_in = given.key_bias;
  const int64_t bias_len = key_bias_in.has_value() && key_bias_in->dim() == 3 ? key_bias_in->size(2) : 0;
  const Dims dims{B, Sq, bias_len, Hq, Hkv, D};
  check_per_head_args(op, dims, at::kFloat, q_in, given, ValueChecks::kNone);

  const at::Tensor q = q_in.size(3) <= 1 || q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const OptTensor key_bias = key_bias_in.has_value() ? OptTensor(key_bias_in->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({B, Sq, Hq, D}, q.options());
  if (out.numel() == 0) return out;
  DecodeParams p = l.p;
  AttentionParams& a = p.attn;
  a.q = head_tensor(q, false);
  a.out = head_tensor(out, false);
  fill_params(a, dims, causal, default_scale,
              PerHeadArgs{given.softmax_scale, given.window, given.sinks, given.alpha, key_bias, given.sink_logit,
                          given.out_scale, given.out_bias, given.gate});
  p.split_keys = split_keys;
  // splits from capacities (no lengths read): the longest walk a full head or a streaming head can have
  const int64_t longest_walk = std::max(l.full_capacity, p.ring_slots);
  const int64_t splits = std::max<int64_t>(1, longest_walk / split_keys + (longest_walk % split_keys != 0));
  TORCH_CHECK(splits < (int64_t(1) << 31), op, "too many key splits for CUDA (raise split_keys)");
  DecodeLaunch launch;
  launch.splits = splits;
  launch.aligned_rows = l.aligned_rows;
  launch.shared_optin_bytes = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int64_t smem = decode_smem_bytes(D, q.element_size());
  TORCH_CHECK(smem <= launch.shared_optin_bytes, op, "head dim ", D, " needs more shared memory than this GPU offers");
  const int64_t R = (Hq / Hkv) * Sq;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor part_ms = at::empty({B * Hkv * splits * R * 4}, f32);
  at::Tensor part_acc = at::empty({B * Hkv * splits * R * 2 * D}, f32);
  const cudaError_t err =
      launch_decode(p, dtype, launch, part_ms.data_ptr<float>(), part_acc.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, op, "CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace headops::cuda

#endif  // HEADOPS_WITH_CUDA
