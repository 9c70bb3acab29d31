// Opt-in to more than 48 KiB of dynamic shared memory, once per (kernel, device) per process.
//
// cudaFuncSetAttribute is a host-side setting of the device's context, not a stream operation;
// it is set once at a kernel's first launch on a device (and again only for a larger size), so a
// launch captured into a CUDA graph after a warm-up (as torch.cuda.graphs asks) makes no call at
// all, and an eager launch pays one map lookup instead of a driver call.
#pragma once

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <utility>

namespace headops::cuda {

inline cudaError_t opt_in_dynamic_smem(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> granted;
  std::lock_guard<std::mutex> lock(mutex);
  int& have = granted[{kernel, device}];
  if (have >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) have = bytes;
  return err;
}

}  // namespace headops::cuda
