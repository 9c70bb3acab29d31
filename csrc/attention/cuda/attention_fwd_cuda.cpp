// Host side of the CUDA forward: builds the work list (heads gated off exactly never become
// items; each item's key walk is the one the kernel takes, tile_walk in head_semantics.h),
// counts the work, picks the kernel and launches it on the current stream.
//
// Tested on an NVIDIA H200; see forward_kernel.cu.
#ifdef HEADOPS_WITH_CUDA

#include "attention_fwd_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "../head_semantics.h"
#include "../work_counters.h"
#include "cuda_dtype.h"
#include "forward_kernel.cuh"

namespace headops::cuda {
namespace {

constexpr const char* kOp = "headops.attention_fwd: ";

// cp.async copies 16-byte chunks: every row the kernel reads must start on 16 bytes.
bool rows_16_byte_aligned(const HeadTensor& t, int64_t B, int64_t S, int64_t H) {
  auto ok = [](int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; };
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && ok(t.stride_b, B) && ok(t.stride_s, S) && ok(t.stride_h, H);
}

bool force_generic() {
  const char* v = std::getenv("HEADOPS_CUDA_KERNEL");
  return v != nullptr && std::strcmp(v, "generic") == 0;
}

// precise_probabilities: the generic kernel, whose P V reads float P (the tensor-core kernel's
// mma reads P in the input dtype)
bool use_tensor_cores(const AttentionParams& p, DType dtype) {
  const bool aligned = rows_16_byte_aligned(p.q, p.batch, p.seqlen_q, p.heads_q) &&
                       rows_16_byte_aligned(p.k, p.batch, p.seqlen_k, p.heads_kv) &&
                       rows_16_byte_aligned(p.v, p.batch, p.seqlen_k, p.heads_kv);
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  return tensor_core_choice(dtype, p.head_dim, p.alpha.present(), aligned, device->major,
                            static_cast<int64_t>(device->sharedMemPerBlockOptin),
                            force_generic() || p.precise_probabilities);
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  TORCH_CHECK(err == cudaSuccess, "headops.attention_fwd: cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
  return status != cudaStreamCaptureStatusNone;
}

// Where the work list goes up: "pinned" (a pinned buffer copied with non_blocking, the default
// outside CUDA-graph capture) or "kernel" (kernels whose parameters carry the words: nothing is
// read from host memory when a captured graph replays). HEADOPS_CUDA_UPLOAD=kernel forces the
// second outside capture too (tests: the path a graph takes, run eagerly).
bool upload_by_kernel(bool capturing) {
  if (capturing) return true;
  const char* v = std::getenv("HEADOPS_CUDA_UPLOAD");
  return v != nullptr && std::strcmp(v, "kernel") == 0;
}

// A planning argument (gate, window, sinks, alpha) as the host reads it, [B, Hq] contiguous:
// a CPU tensor as given (no copy from the device: no sync), a CUDA tensor copied to the host
// (a small copy that waits for the stream). `upload`: the CPU tensor's values must reach the
// kernel, in the uploaded table (the kernel reads p's pointer otherwise).
struct HostPerHead {
  at::Tensor t;
  bool upload = false;
  int64_t word_offset = 0;  // where its values start in the uploaded table (32-bit words)
  PerHead view(int64_t Hq) const {
    PerHead h;
    if (t.defined()) {
      h.ptr = t.data_ptr();
      h.stride_b = Hq;
      h.stride_h = 1;
    }
    return h;
  }
  int64_t words() const { return upload ? t.numel() * static_cast<int64_t>(t.element_size()) / 4 : 0; }
};

HostPerHead to_host(const std::optional<at::Tensor>& t, const char* name, bool capturing) {
  HostPerHead h;
  if (!t.has_value()) return h;
  // the copy from the device would abort a CUDA graph's capture: say why instead
  TORCH_CHECK(t->is_cpu() || !capturing, kOp, name, " is read on the host to plan the work: under CUDA graph capture "
              "pass it as a CPU tensor (HeadSpec.to(\"cuda\") keeps the planning arguments there), got one on ",
              t->device());
  h.upload = t->is_cpu();
  h.t = h.upload ? t->contiguous() : t->to(at::kCPU).contiguous();
  return h;
}

// The rules of the planning values the host reads (check_per_head_args reads only CPU tensors'
// values for a CUDA call, so a device tensor is checked here, on the copy it took anyway).
void check_planning_values(const char* op, const HostPerHead& w, const HostPerHead& s, const HostPerHead& a) {
  if (w.t.defined() && w.t.numel() > 0)
    TORCH_CHECK(!(w.t == 0).any().item<bool>(), op, "window must be >= 1 (or < 0 for unlimited), got 0");
  if (s.t.defined() && s.t.numel() > 0) TORCH_CHECK(!(s.t < 0).any().item<bool>(), op, "sinks must be >= 0");
  if (a.t.defined() && a.t.numel() > 0)
    TORCH_CHECK(((a.t >= 0) & (a.t <= 1)).all().item<bool>(), op, "alpha must lie in [0, 1]");
}

}  // namespace

const char* kernel_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool heads_first) {
  AttentionParams p;
  const int64_t sd = heads_first ? 2 : 1, hd = heads_first ? 1 : 2;
  auto view = [&](const at::Tensor& t) {
    HeadTensor h;
    h.ptr = t.data_ptr();
    h.stride_b = t.stride(0);
    h.stride_s = t.stride(sd);
    h.stride_h = t.stride(hd);
    return h;
  };
  p.q = view(q);
  p.k = view(k);
  p.v = view(v);
  p.batch = q.size(0);
  p.seqlen_q = q.size(sd);
  p.seqlen_k = k.size(sd);
  p.heads_q = q.size(hd);
  p.heads_kv = k.size(hd);
  p.head_dim = q.size(3);
  c10::cuda::CUDAGuard guard(q.device());
  return use_tensor_cores(p, dtype_of(kOp, q.scalar_type())) ? "tensor_core" : "generic";
}

void attention_forward(const AttentionParams& p, const at::Tensor& q, const std::optional<at::Tensor>& gate,
                       const std::optional<at::Tensor>& window, const std::optional<at::Tensor>& sinks,
                       const std::optional<at::Tensor>& alpha) {
  const char* op = kOp;
  const DType dtype = dtype_of(op, q.scalar_type());
  TORCH_CHECK(p.seqlen_q < (int64_t(1) << 30) && p.seqlen_k < (int64_t(1) << 30), op,
              "sequences of 2^30 tokens or more are not supported on CUDA");
  TORCH_CHECK(p.batch < (int64_t(1) << 31) && p.heads_q < (int64_t(1) << 31), op, "batch or heads too large");
  c10::cuda::CUDAGuard guard(q.device());
  const bool tensor_cores = use_tensor_cores(p, dtype);
  if (!tensor_cores) {
    TORCH_CHECK(p.head_dim <= kGenericMaxHeadDim, op, "head dim ", p.head_dim,
                " is not supported on CUDA (at most ", kGenericMaxHeadDim, ")");
    const int64_t optin = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    TORCH_CHECK(generic_smem_bytes(p.head_dim) <= optin, op, "head dim ", p.head_dim,
                " needs more shared memory than this GPU offers");
  }
  const int64_t block_q = tensor_cores ? kTcBlockQ : kGenericBlockQ;
  const int64_t block_k = tensor_cores ? kTcBlockK : kGenericBlockK;

  // the host reads gate, window, sinks and alpha to plan the items; nothing else of p is read
  // here. CPU tensors are read as they are (no sync) and their values travel to the kernel in
  // the uploaded table; a CUDA tensor is copied here (a small copy that waits for the stream)
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool capturing = stream_is_capturing(stream);
  HostPerHead g = to_host(gate, "gate", capturing), w = to_host(window, "window", capturing),
              s = to_host(sinks, "sinks", capturing), a = to_host(alpha, "alpha", capturing);
  check_planning_values(op, w, s, a);
  // a copy of p for the host: its sizes and flags, and per-head scalars it can read (read_head);
  // softmax_scale and sink_logit stay on the device (planning does not need them)
  AttentionParams hp = p;
  hp.softmax_scale = hp.sink_logit = PerHead{};
  hp.gate = g.view(p.heads_q);
  hp.window = w.view(p.heads_q);
  hp.sinks = s.view(p.heads_q);
  hp.alpha = a.view(p.heads_q);

  std::vector<WorkItem> items;
  std::vector<int64_t> cost;
  std::vector<int32_t> skipped;
  LocalWorkCounts counts;
  const int64_t tiles = (p.seqlen_q + block_q - 1) / block_q;
  items.reserve(p.batch * p.heads_q * tiles);
  cost.reserve(items.capacity());
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const HeadScalars<float> hs = read_head<float>(hp, b, h);
      if (p.skip_zero_gate && hs.gate == 0.f) {
        skipped.push_back(static_cast<int32_t>(b));
        skipped.push_back(static_cast<int32_t>(h));
        continue;
      }
      const BranchPlan plan = plan_branches(hs);
      const HeadVisibility stream_vis = streaming_visibility(p.causal, hs);
      const int64_t shift = p.seqlen_k - p.seqlen_q;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t q0 = tile * block_q, q1 = std::min(p.seqlen_q, q0 + block_q);
        const VisibleKeys walk = tile_walk(hp, hs, q0, q1);
        const VisibleKeys stream_tile = stream_vis.keys_for_positions(q0 + shift, q1 - 1 + shift, p.seqlen_k);
        const int64_t n_blocks = walk_blocks(walk, block_k);
        int64_t value_blocks = 0;
        for (int64_t t = 0; t < n_blocks; ++t) {
          const KeyRange blk = walk_block(walk, t, block_k);
          value_blocks += (plan.full ? 1 : 0) + (plan.streaming && (!plan.full || meets(stream_tile, blk)) ? 1 : 0);
        }
        counts.add(kWorkItems, 1);
        counts.add(kKeyBlocks, n_blocks);
        counts.add(kScoreElements, (q1 - q0) * walk.count());
        counts.add(kValueBlocks, value_blocks);
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(tile), 0});
        cost.push_back((q1 - q0) * (n_blocks * block_k + value_blocks * block_k / 2 + 1));
      }
    }
  }
  counts.add(kHeadsSkipped, static_cast<int64_t>(skipped.size() / 2));

  // heaviest items first: blocks start roughly in index order, so the short ones fill the tail
  std::vector<int64_t> order(items.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });

  // one upload: the items, the skipped (b, h) pairs, then (8-byte aligned) the values of the
  // planning arguments given as CPU tensors, which the kernels read from there
  const int64_t n_items = static_cast<int64_t>(items.size()), n_skipped = static_cast<int64_t>(skipped.size() / 2);
  int64_t words = 4 * n_items + 2 * n_skipped;
  for (HostPerHead* h : {&g, &w, &s, &a}) {
    if (!h->upload || h->words() == 0) continue;
    words = (words + 1) / 2 * 2;
    h->word_offset = words;
    words += h->words();
  }
  if (n_items == 0 && n_skipped == 0) {
    counts.publish();
    return;
  }
  std::vector<int32_t> table(static_cast<size_t>(words), 0);
  for (int64_t i = 0; i < n_items; ++i) std::memcpy(table.data() + 4 * i, &items[order[i]], sizeof(WorkItem));
  if (n_skipped) std::memcpy(table.data() + 4 * n_items, skipped.data(), sizeof(int32_t) * 2 * n_skipped);
  for (const HostPerHead* h : {&g, &w, &s, &a})
    if (h->upload && h->words() > 0) std::memcpy(table.data() + h->word_offset, h->t.data_ptr(), 4 * h->words());

  at::Tensor dev = at::empty({words}, at::TensorOptions().device(q.device()).dtype(at::kInt));
  int32_t* dw = dev.data_ptr<int32_t>();
  if (upload_by_kernel(capturing)) {
    const cudaError_t err = launch_upload_words(dw, table.data(), words, stream);
    TORCH_CHECK(err == cudaSuccess, op, "CUDA launch failed (work list upload): ", cudaGetErrorString(err));
  } else {
    at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    std::memcpy(host.data_ptr<int32_t>(), table.data(), sizeof(int32_t) * words);
    dev.copy_(host, /*non_blocking=*/true);
  }
  // the kernels read the uploaded copies of the CPU-given planning values
  AttentionParams kp = p;
  auto device_view = [&](const HostPerHead& h, PerHead& target) {
    if (!h.upload) return;
    target.ptr = dw + h.word_offset;
    target.stride_b = p.heads_q;
    target.stride_h = 1;
  };
  device_view(g, kp.gate);
  device_view(w, kp.window);
  device_view(s, kp.sinks);
  device_view(a, kp.alpha);

  if (n_skipped) {
    const cudaError_t err = launch_skipped_heads(kp, dtype, dw + 4 * n_items, n_skipped, stream);
    TORCH_CHECK(err == cudaSuccess, op, "CUDA launch failed (skipped heads): ", cudaGetErrorString(err));
  }
  if (n_items) {
    const WorkItem* d_items = reinterpret_cast<const WorkItem*>(dw);
    const cudaError_t err = tensor_cores ? launch_tensor_core_forward(kp, dtype, d_items, n_items, stream)
                                         : launch_generic_forward(kp, dtype, d_items, n_items, stream);
    TORCH_CHECK(err == cudaSuccess, op, "CUDA launch failed: ", cudaGetErrorString(err));
  }
  counts.publish();
}

}  // namespace headops::cuda

#endif  // HEADOPS_WITH_CUDA
