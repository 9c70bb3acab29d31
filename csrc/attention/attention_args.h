// Argument checks (TORCH_CHECK) and tensor-to-AttentionParams plumbing shared by the forward
// and backward ops, so that a raw call of either op with bad input raises instead of crashing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "attention_params.h"

namespace headops {

using OptTensor = std::optional<at::Tensor>;

struct Dims {
  int64_t B, Sq, Sk, Hq, Hkv, D;
};

// The per-head arguments of both ops, in schema order.
struct PerHeadArgs {
  const OptTensor& softmax_scale;
  const OptTensor& window;
  const OptTensor& sinks;
  const OptTensor& alpha;
  const OptTensor& key_bias;
  const OptTensor& sink_logit;
  const OptTensor& out_scale;
  const OptTensor& out_bias;
  const OptTensor& gate;
};

// q, k, v: 4-D, one float dtype, one device (the CPU; a CUDA device too when cuda_ok and the
// build has the CUDA kernels), GQA-compatible heads, a contiguous last dim. Returns the sizes.
Dims check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool heads_first,
               bool cuda_ok = false);

// Which per-head values check_per_head_args reads (window != 0, sinks >= 0, alpha in [0, 1]).
enum class ValueChecks {
  kAll,       // every tensor given (a CUDA tensor's values are read with a device-to-host sync)
  kHostOnly,  // CPU tensors only (the CUDA forward: it checks the copies it reads to plan its work)
  kNone,      // none (the CUDA decode: the Python layer checked them from its host mirror)
};

// dtype, shape ([B, Hq], [B, Hq, Sk] or [B, Hq, D]), device and values (see ValueChecks) of
// every per-head argument present. Every tensor is on q's device, except that with
// `host_planning` (the CUDA forward) window, sinks, gate and alpha may be CPU tensors beside
// CUDA q, k, v: the host plans the work list from them without a device-to-host copy.
void check_per_head_args(const char* op, const Dims& dims, at::ScalarType acc, const at::Tensor& q,
                         const PerHeadArgs& args, ValueChecks values = ValueChecks::kAll, bool host_planning = false);

void check_tensor(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Tensor& q, bool host_ok = false);

// Whether a planning argument (window, sinks, gate, alpha) given with CUDA q lives on the host.
inline bool on_host_beside_cuda(const OptTensor& t, const at::Tensor& q) {
  return t.has_value() && q.is_cuda() && t->is_cpu();
}

// BLAS and brgemm read a row block with one leading dimension: a tensor whose rows overlap
// (a stride below D), whose last dim is not contiguous or whose row stride passes 32 bits is
// copied; anything else is used as it is.
at::Tensor rows_addressable(const at::Tensor& t, bool heads_first);

HeadTensor head_tensor(const at::Tensor& t, bool heads_first);

// Sizes, flags and per-head pointers of `p` (q, k, v and outputs are set by the caller).
void fill_params(AttentionParams& p, const Dims& dims, bool causal, double default_scale, const PerHeadArgs& args);

}  // namespace headops
