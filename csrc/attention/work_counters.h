// Work counters: what the kernels really did, so tests can check the cost contract.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

namespace headops {

enum WorkCounter : int {
  kWorkItems = 0,       // (b, h, query tile) items computed
  kKeyBlocks,           // key blocks loaded and multiplied with a query tile (q.k^T products)
  kScoreElements,       // query-key dot products computed (rows x keys of those products)
  kValueBlocks,         // P.V products (a head under alpha may need two per key block)
  kHeadsSkipped,        // (b, h) pairs never computed because their gate is exactly 0
  kGradientElements,    // CPU backward: (query, key) pairs its dK and dV products reduce over
  kNumWorkCounters
};

std::array<std::atomic<int64_t>, kNumWorkCounters>& work_counters();

// Accumulates locally and publishes once, so counting costs nothing per tile.
struct LocalWorkCounts {
  int64_t values[kNumWorkCounters] = {};
  void add(WorkCounter c, int64_t n) { values[c] += n; }
  void publish() {
    auto& g = work_counters();
    for (int i = 0; i < kNumWorkCounters; ++i)
      if (values[i]) g[i].fetch_add(values[i], std::memory_order_relaxed);
  }
};

}  // namespace headops
