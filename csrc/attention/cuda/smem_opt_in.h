// Opt-in to more dynamic shared memory than a kernel's default limit (48 KiB less its static
// shared memory), once per (kernel, device) per process.
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
  if (bytes <= 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> granted;
  std::lock_guard<std::mutex> lock(mutex);
  int& have = granted[{kernel, device}];
  if (have >= bytes) return cudaSuccess;
  // The default limit is 48 KiB less the kernel's static shared memory (a dynamic size just under
  // 48 KiB fails to launch beside 1 KiB of static memory): ask the kernel what it allows now.
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  if (bytes <= attributes.maxDynamicSharedSizeBytes) {
    have = attributes.maxDynamicSharedSizeBytes;
    return cudaSuccess;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) have = bytes;
  return err;
}

}  // namespace headops::cuda
