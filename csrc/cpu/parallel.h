// Work distribution of the CPU kernels over at::parallel_for's threads. Compiled per
// instruction set like the kernels that include it.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/parallel.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace headops::cpu {
namespace CPU_CAPABILITY {

// Runs every item on at::parallel_for's threads, each thread taking the next item from a
// shared counter. Results do not depend on which thread ran an item (each item writes only
// its own outputs).
template <typename Fn>
void run_dynamic(int64_t n_items, Fn&& make_worker) {
  if (n_items == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) worker.run(i);
    worker.finish();
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
