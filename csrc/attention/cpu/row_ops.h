// Vectorised row operations of the online softmax (float or double accumulation).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace headops::cpu {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) { return x.exp(); }
template <>
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }

// x[j] = x[j] * scale (+ bias[j * bias_stride])
template <typename T>
inline void scale_and_bias(T* x, int64_t n, T scale, const T* bias, int64_t bias_stride) {
  using V = Vectorized<T>;
  const V vs(scale);
  int64_t j = 0;
  if (bias == nullptr) {
    for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * vs).store(x + j);
    for (; j < n; ++j) x[j] *= scale;
  } else if (bias_stride == 1) {
    for (; j + V::size() <= n; j += V::size()) at::vec::fmadd(V::loadu(x + j), vs, V::loadu(bias + j)).store(x + j);
    for (; j < n; ++j) x[j] = x[j] * scale + bias[j];
  } else {
    for (; j < n; ++j) x[j] = x[j] * scale + bias[j * bias_stride];
  }
}

template <typename T>
inline T max_of(const T* x, int64_t lo, int64_t hi, T init) {
  using V = Vectorized<T>;
  int64_t j = lo;
  T m = init;
  if (hi - lo >= V::size()) {
    V vm(init);
    for (; j + V::size() <= hi; j += V::size()) vm = at::vec::maximum(vm, V::loadu(x + j));
    m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < hi; ++j) m = x[j] > m ? x[j] : m;  // NaN in x stays out of the max, as in the reference
  return m;
}

// p[j] = exp(x[j] - m) for j in [lo, hi); returns the sum.
template <typename T>
inline T exp_and_sum(const T* x, T* p, int64_t lo, int64_t hi, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  V vsum(T(0));
  int64_t j = lo;
  for (; j + V::size() <= hi; j += V::size()) {
    V e = vexp(V::loadu(x + j) - vm);
    e.store(p + j);
    vsum = vsum + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vsum);
  for (; j < hi; ++j) {
    T e = std::exp(x[j] - m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T>
inline void fill(T* x, int64_t lo, int64_t hi, T value) {
  for (int64_t j = lo; j < hi; ++j) x[j] = value;
}

template <typename T>
inline void scale_row(T* x, int64_t n, T s) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * vs).store(x + j);
  for (; j < n; ++j) x[j] *= s;
}

}  // namespace headops::cpu
