#include "work_counters.h"

namespace headops {

std::array<std::atomic<int64_t>, kNumWorkCounters>& work_counters() {
  static std::array<std::atomic<int64_t>, kNumWorkCounters> counters{};
  return counters;
}

}  // namespace headops
