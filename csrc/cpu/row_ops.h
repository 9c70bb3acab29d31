// Vectorised row operations of the online softmax (float or double accumulation), shared by
// the attention and decode kernels. Compiled per instruction set like the kernels that include it.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/row_ops.h from a kernel compiled for one CPU_CAPABILITY"
#endif
#ifndef HEADOPS_ISA_NAMESPACE
#define HEADOPS_ISA_NAMESPACE CPU_CAPABILITY
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_convert.h>

#include <algorithm>
#include <type_traits>

#include <cmath>
#include <limits>

#include "../attention/online_softmax.h"

namespace headops::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// The dtype tiles accumulate in: double for double, float for the rest.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// exp for probabilities that will be stored as P: float and double keep ~1-20 ulp. bfloat16
// probabilities use the same exp: ATen's degree-3 fexp_u20 (~1e-4 relative) would be rounded
// away in P, but the row sums it feeds become the lse and the probes' normalisers, which it
// moved by up to 7e-5 (the probe tests' bound is 2e-5); on the AVX512-BF16 EPYC the accurate exp
// costs nothing measurable (bf16 forward S = 2048: 33-38 ms either way). NaN stays NaN
// (online_softmax.h): ATen's fast float exps clamp their input and would turn a NaN (a NaN
// logit, inf - inf, x - a NaN lse) into a huge number, so the NaN lanes are or-ed back in
// (all-ones bits are a NaN).
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, double>) {
    return x.exp();
  } else {
    return x.exp_u20() | x.isnan();
  }
}

// exp(y - m): every probability the softmax stores (y a logit, m the row's reference max or its
// lse). On AVX-512 in float it is 2^t with t = (y - m) log2(e): 2^floor(t) * p(t - floor(t)),
// p a degree-5 fit of 2^f on [0, 1) (relative error 1.6e-7 in float, p(0) = 1 exactly: the
// row's max gets probability 1), and vscalefps applies 2^floor(t), giving 0 below the float
// range and inf above it. t is clamped to [-200, 128] first, so that exp(-inf) is 0 (not
// -inf - -inf) and exp(+inf) is inf; the clamps keep NaN. About 12 instructions a vector where
// exp_u20 with the NaN or-ing took ~24: on the 2-core AMX Xeon (B=1, H=16, D=128, causal, bf16)
// it was over a third of the forward. AVX2 the same with 2^n from exponent bits; elsewhere
// (DEFAULT, double) vexp(y - m).
// p(f) ~ 2^f for f in [0, 1): exp_shifted's degree-5 fit, by Horner (one FMA a degree)
inline Vectorized<float> exp2_of_fraction(const Vectorized<float>& f) {
  constexpr float c[] = {1.f, 0.6931512951850891f, 0.24016447365283966f, 0.05579983443021774f,
                         0.009017140604555607f, 0.001867078011855483f};
  Vectorized<float> p(c[5]);
  for (int i = 4; i >= 0; --i) p = at::vec::fmadd(p, f, Vectorized<float>(c[i]));
  return p;
}

template <typename T>
inline Vectorized<T> exp_shifted(const Vectorized<T>& y, const Vectorized<T>& m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(y, m), _mm512_set1_ps(1.44269504088896341f));
    // (max and min return their second operand when either is NaN)
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(128.f), _mm512_max_ps(_mm512_set1_ps(-200.f), scaled));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_of_fraction(_mm512_sub_ps(t, n)), n);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // the same polynomial; 2^n from the exponent bits (n + 127) << 23, with t clamped to
    // [-127, 128] so that n = -127 gives the bits of 0.0 (exp below 2^-126 is 0, as exp_u20's
    // clamp gives) and n = 128 those of inf
    const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(y, m), _mm256_set1_ps(1.44269504088896341f));
    const __m256 t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), scaled));
    const __m256 n = _mm256_floor_ps(t);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(exp2_of_fraction(_mm256_sub_ps(t, n)), _mm256_castsi256_ps(bits));  // (NaN: p is NaN)
  }
#endif
  return vexp(y - m);
}

template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

template <typename T>
inline T reduce_max(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); }, v);
}

// x[j] = x[j] * scale (+ bias[j * bias_stride]) for j in [0, n); returns the max of the results.
template <typename T>
inline T scale_bias_max(T* x, int64_t n, T scale, const T* bias, int64_t bias_stride) {
  using V = Vectorized<T>;
  const V vs(scale);
  V vm(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  if (bias == nullptr) {
    for (; j + V::size() <= n; j += V::size()) {
      V y = V::loadu(x + j) * vs;
      y.store(x + j);
      vm = at::vec::maximum(vm, y);
    }
  } else if (bias_stride == 1) {
    for (; j + V::size() <= n; j += V::size()) {
      V y = at::vec::fmadd(V::loadu(x + j), vs, V::loadu(bias + j));
      y.store(x + j);
      vm = at::vec::maximum(vm, y);
    }
  }
  T m = reduce_max(vm);
  for (; j < n; ++j) {
    x[j] = bias ? x[j] * scale + bias[j * bias_stride] : x[j] * scale;
    m = nan_max(m, x[j]);
  }
  return m;
}

template <typename T>
inline T max_of(const T* x, int64_t lo, int64_t hi, T init) {
  using V = Vectorized<T>;
  int64_t j = lo;
  T m = init;
  if (hi - lo >= V::size()) {
    V vm(init);
    for (; j + V::size() <= hi; j += V::size()) vm = at::vec::maximum(vm, V::loadu(x + j));
    m = reduce_max(vm);
  }
  for (; j < hi; ++j) m = nan_max(m, x[j]);  // NaN propagates, as in torch.amax
  return m;
}

// exp(x - m) of the first `count` lanes, zero in the others.
template <typename P, typename T>
inline Vectorized<T> exp_partial(const T* x, int64_t count, const Vectorized<T>& vm) {
  return Vectorized<T>::set(Vectorized<T>(T(0)), exp_shifted(Vectorized<T>::loadu(x, count), vm), count);
}

// Stores 2 vectors of probabilities as P (the accumulation type itself, bfloat16 or float16).
template <typename P, typename T>
inline void store_probs(P* p, const Vectorized<T>& e0, const Vectorized<T>& e1) {
  if constexpr (std::is_same_v<T, P>) {
    e0.store(p);
    e1.store(p + Vectorized<T>::size());
  } else {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      // one instruction where ATen's portable rounding takes about six
      _mm512_storeu_si512(reinterpret_cast<void*>(p), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      return;
    }
#endif
    at::vec::convert_from_float<P>(e0, e1).store(p);
  }
}

template <typename T, typename P>
inline void store_probs_tail(P* p, const Vectorized<T>& e, int64_t count) {
  if constexpr (std::is_same_v<T, P>) {
    e.store(p, count);
  } else {
    T tmp[Vectorized<T>::size()];
    e.store(tmp);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<P>(tmp[i]);
  }
}

// p[j] = exp(x[j] - m) for j in [lo, hi), stored as P (the dtype of the P.V product); returns
// the sum of the unrounded values. Two vectors per step with two accumulators: one chain of
// dependent adds would otherwise bound the loop.
template <typename T, typename P>
inline T exp_and_sum(const T* x, P* p, int64_t lo, int64_t hi, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  V vsum0(T(0)), vsum1(T(0));
  int64_t j = lo;
  for (; j + 2 * V::size() <= hi; j += 2 * V::size()) {
    V e0 = exp_shifted(V::loadu(x + j), vm);
    V e1 = exp_shifted(V::loadu(x + j + V::size()), vm);
    store_probs(p + j, e0, e1);
    vsum0 = vsum0 + e0;
    vsum1 = vsum1 + e1;
  }
  for (; j < hi; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), hi - j);
    V e = exp_partial<P>(x + j, n, vm);
    store_probs_tail(p + j, e, n);
    vsum0 = vsum0 + e;
  }
  return reduce_sum(vsum0 + vsum1);
}

// max of x * scale (+ bias) over [0, n), without storing anything.
template <typename T>
inline T scaled_max(const T* x, int64_t n, T scale, const T* bias) {
  using V = Vectorized<T>;
  const V vs(scale);
  V vmax(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V y = bias ? at::vec::fmadd(V::loadu(x + j), vs, V::loadu(bias + j)) : V::loadu(x + j) * vs;
    vmax = at::vec::maximum(vmax, y);
  }
  if (j < n) {
    const int64_t c = n - j;
    V y = V::loadu(x + j, c) * vs;
    if (bias) y = y + V::loadu(bias + j, c);
    vmax = at::vec::maximum(vmax, V::set(V(-std::numeric_limits<T>::infinity()), y, c));
  }
  return reduce_max(vmax);
}

// One pass over a row's visible keys when they form one range: y = x * scale (+ bias),
// p = exp(y - m) with the row's current max m, and the max of y. The caller redoes the row
// with the exact max when y's max exceeds m by too much (lazy rescaling), so most blocks
// need neither a separate max pass nor a rescale of the accumulator. y is also stored in
// logits_out when given (it may be x itself: probes read the logits).
template <typename T, typename P>
inline T scaled_exp_sum(const T* x, P* p, int64_t n, T scale, const T* bias, T m, T& max_out,
                        T* logits_out = nullptr) {
  using V = Vectorized<T>;
  const V vm(m), vs(scale), lowest(-std::numeric_limits<T>::infinity());
  V vsum0(T(0)), vsum1(T(0)), vmax0(lowest), vmax1(lowest);
  auto logits = [&](int64_t at) {
    return bias ? at::vec::fmadd(V::loadu(x + at), vs, V::loadu(bias + at)) : V::loadu(x + at) * vs;
  };
  int64_t j = 0;
  for (; j + 2 * V::size() <= n; j += 2 * V::size()) {
    V y0 = logits(j), y1 = logits(j + V::size());
    if (logits_out) {
      y0.store(logits_out + j);
      y1.store(logits_out + j + V::size());
    }
    vmax0 = at::vec::maximum(vmax0, y0);
    vmax1 = at::vec::maximum(vmax1, y1);
    V e0 = exp_shifted(y0, vm), e1 = exp_shifted(y1, vm);
    store_probs(p + j, e0, e1);
    vsum0 = vsum0 + e0;
    vsum1 = vsum1 + e1;
  }
  for (; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    V y = V::loadu(x + j, c) * vs;
    if (bias) y = y + V::loadu(bias + j, c);
    if (logits_out) y.store(logits_out + j, c);
    vmax0 = at::vec::maximum(vmax0, V::set(lowest, y, c));
    V e = V::set(V(T(0)), exp_shifted(y, vm), c);
    store_probs_tail(p + j, e, c);
    vsum0 = vsum0 + e;
  }
  max_out = reduce_max(at::vec::maximum(vmax0, vmax1));
  return reduce_sum(vsum0 + vsum1);
}

template <typename T>
inline void fill_zero(T* x, int64_t lo, int64_t hi) {
  if (hi > lo) std::fill(x + lo, x + hi, T(0));
}

// dst[j] += src[j] for j in [0, n)
template <typename T>
inline void add_into(T* dst, const T* src, int64_t n) {
  using V = Vectorized<T>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(dst + j) + V::loadu(src + j)).store(dst + j);
  for (; j < n; ++j) dst[j] += src[j];
}

template <typename T>
inline void scale_row(T* x, int64_t n, T s) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * vs).store(x + j);
  for (; j < n; ++j) x[j] *= s;
}

}  // namespace headops::cpu::CPU_CAPABILITY
