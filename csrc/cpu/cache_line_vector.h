// std::vector whose data starts on a cache line (64 bytes). The forward's tile buffers (scores,
// probabilities, accumulator, the query copy) have rows of whole 64-byte multiples; from malloc
// they started wherever the heap put them (16-byte aligned: 0, 16, 32 or 48 bytes into a line,
// varying from call to call with the heap's history), so every AMX tile row, and every 64-byte
// vector, straddled two lines.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/cache_line_vector.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#include <cstddef>
#include <new>
#include <vector>

// in the instruction set's namespace: instantiated per variant, never shared across them
namespace headops::cpu::CPU_CAPABILITY {

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};

  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}

  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kLine); }

  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using CacheLineVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace headops::cpu::CPU_CAPABILITY
