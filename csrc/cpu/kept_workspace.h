// The packed K/V operands' buffer of a forward or backward call. Up to kKeptWorkspaceBytes it
// is kept per calling thread and reused by its next call (forward and backward of one dtype
// share it: a thread runs one call at a time): a fresh buffer per call page-faults every 4 KiB
// of it again (~5 % of a bf16 forward at S = 4096, H = 16, on the 2-core AMX Xeon). Larger ones
// are allocated for the call, in `fresh`, and freed with it.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/kept_workspace.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#include <ATen/ATen.h>

#include <cstdint>

namespace headops::cpu::CPU_CAPABILITY {

constexpr int64_t kKeptWorkspaceBytes = int64_t(64) << 20;

template <typename scalar_t>
scalar_t* packing_workspace(int64_t elems, at::Tensor& fresh) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  if (elems * int64_t(sizeof(scalar_t)) > kKeptWorkspaceBytes) {
    fresh = at::empty({elems}, options);
    return fresh.data_ptr<scalar_t>();
  }
  thread_local at::Tensor kept;
  if (!kept.defined() || kept.numel() < elems) kept = at::empty({elems}, options);
  return kept.data_ptr<scalar_t>();
}

}  // namespace headops::cpu::CPU_CAPABILITY
