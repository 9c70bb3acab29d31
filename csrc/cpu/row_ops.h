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
#include <tuple>
#include <type_traits>
#include <vector>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../attention/online_softmax.h"
#include "finite_half.h"

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

// p(f) ~ 2^f for f in [0, 1), of degree 4 or 5 (pow2): relative-error fits (reweighted least
// squares) with the constant term fixed at 1, by Horner (one FMA a degree).
template <int Degree>
__attribute__((always_inline)) inline Vectorized<float> exp2_of_fraction(const Vectorized<float>& f) {
  static_assert(Degree == 4 || Degree == 5, "exp2_of_fraction: fits of degree 4 and 5");
  constexpr float c5[] = {1.f, 0.6931512951850891f, 0.24016447365283966f, 0.05579983443021774f,
                          0.009017140604555607f, 0.001867078011855483f};
  constexpr float c4[] = {1.f, 0.693044900894165f, 0.2412799745798111f, 0.052242957055568695f,
                          0.013426384888589382f};
  const float* c = Degree == 5 ? c5 : c4;
  Vectorized<float> p = at::vec::fmadd(f, Vectorized<float>(c[Degree]), Vectorized<float>(c[Degree - 1]));
  for (int i = Degree - 2; i >= 0; --i) p = at::vec::fmadd(p, f, Vectorized<float>(c[i]));
  return p;
}

// The degree pow2's polynomial needs for probabilities stored as P.
template <typename P>
constexpr int exp_fit_degree() {
  return sizeof(P) == 2 ? 4 : 5;
}

// exp(y - m): every probability the softmax stores (y a logit, m the row's reference max or its
// lse), as 2^t with t = (y - m) log2(e) (pow2). Elsewhere than AVX-512 and AVX2 float (DEFAULT,
// double) it is vexp(y - m).
//
// pow2(t) = 2^floor(t) * p(t - floor(t)), p a polynomial fit of 2^f on [0, 1) with p(0) = 1
// exactly (the row's max gets probability 1). p has degree 5 (relative error 1.6e-7) for
// probabilities kept in float, degree 4 (3e-6) for those stored as bfloat16 or float16 (P):
// their rounding is 4e-3 / 5e-4, and the row sums (the lse, the probes' normalisers) stay within
// 3e-6. Past t = 128 the result is inf, which every caller either cannot reach (y - m <= 88, m
// a max or an lse of the row's logits) or, in scaled_exp_sum's lazy path, sees in the sum and
// redoes the row on the exact path.
//  - AVX-512: vreduceps gives t - floor(t) (0 for t = +-inf, NaN for NaN) and vscalefps applies
//    2^floor(t) (0 for -inf and below the float range, inf for +inf), so exp(-inf) = 0 and NaN
//    stays NaN without clamps: 6 instructions for degree 4 where exp_u20 with the NaN or-ing
//    took ~24 (on the 2-core AMX Xeon, B=1, H=16, D=128, causal, bf16, the softmax was over a
//    third of the forward).
//  - AVX2: 2^floor(t) from the exponent bits (n + 127) << 23, with t clamped to [-127, 128] so
//    that n = -127 gives the bits of 0.0 (exp below 2^-126 is 0, as exp_u20's clamp gives) and
//    n = 128 those of inf.
//
// Always inlined: GCC kept it out of line in scaled_exp_sum<float, float> (AVX2), each vector a
// call through the PLT with its argument spilled to the stack.
template <typename P>
__attribute__((always_inline)) inline Vectorized<float> pow2(const Vectorized<float>& t) {
  constexpr int degree = exp_fit_degree<P>();
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 fraction = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_of_fraction<degree>(fraction), t);
#elif defined(CPU_CAPABILITY_AVX2)
  // clamped to [-127, 128] (max and min keep a NaN second operand): past 128 the exponent bits
  // would wrap into garbage that no sum or bound could tell from a real value
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), t));
  const __m256 n = _mm256_floor_ps(clamped);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  // (NaN: p is NaN)
  return _mm256_mul_ps(exp2_of_fraction<degree>(_mm256_sub_ps(clamped, n)), _mm256_castsi256_ps(bits));
#else
  static_assert(sizeof(P) == 0, "pow2 is for the AVX-512 and AVX2 variants");
  return t;
#endif
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename P, typename T>
inline Vectorized<T> exp_shifted(const Vectorized<T>& y, const Vectorized<T>& m) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return pow2<P>((y - m) * Vectorized<float>(kLog2e));
#endif
  return vexp(y - m);
}

// max(a, b) in one instruction where at::vec::maximum takes four to propagate NaN: for loops
// whose NaN lanes show up elsewhere (scaled_exp_sum: in the sum).
template <typename T>
inline Vectorized<T> max_ignoring_nan(const Vectorized<T>& a, const Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
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
  return Vectorized<T>::set(Vectorized<T>(T(0)), exp_shifted<P>(Vectorized<T>::loadu(x, count), vm), count);
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

// dst[j] = src[j] rounded to P for j in [0, n): store_probs's one-instruction bfloat16
// rounding where there is one (a forward's output rows), at::vec::convert for the rest.
template <typename T, typename P>
inline void convert_row(const T* src, P* dst, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> && sizeof(P) == 2) {
    using V = Vectorized<float>;
    for (; j + 2 * V::size() <= n; j += 2 * V::size()) store_probs(dst + j, V::loadu(src + j), V::loadu(src + j + V::size()));
  }
  if (j < n) at::vec::convert(src + j, dst + j, n - j);
}

// hi[j] + lo[j] = src[j] for j in [0, n), to about twice P's precision: hi is src rounded to P,
// lo what that rounding lost, rounded too. A product in P that reads both parts (two products)
// is float-accurate to ~2**-17 where one rounding to bfloat16 is 2**-9. A float16 src splits
// into bfloat16 parts exactly: its 11 significant bits leave at most 3 to lo.
template <typename S, typename P>
inline void split_row(const S* src, P* hi, P* lo, int64_t n) {
  using V = Vectorized<float>;
  int64_t i = 0;
  if constexpr (sizeof(P) == 2)
    for (; i + 2 * V::size() <= n; i += 2 * V::size()) {
      V x0, x1;
      if constexpr (std::is_same_v<S, float>) {
        x0 = V::loadu(src + i);
        x1 = V::loadu(src + i + V::size());
      } else {
        std::tie(x0, x1) = at::vec::convert_to_float<S>(Vectorized<S>::loadu(src + i));
      }
      store_probs(hi + i, x0, x1);
      const auto [h0, h1] = at::vec::convert_to_float<P>(Vectorized<P>::loadu(hi + i));
      store_probs(lo + i, x0 - h0, x1 - h1);
    }
  for (; i < n; ++i) {
    const float x = static_cast<float>(src[i]);
    hi[i] = static_cast<P>(x);
    lo[i] = static_cast<P>(x - static_cast<float>(hi[i]));
  }
}

// rows row_of(r), r < rows, of D values each, split into hi and lo ([padded, D] each), with zero
// rows from `rows` to `padded`: a tile's queries (or dL/do) as the A rows of AMX products.
template <typename RowOf, typename P>
inline void split_padded_rows(RowOf row_of, int64_t rows, int64_t padded, int64_t D, P* hi, P* lo) {
  for (int64_t r = 0; r < rows; ++r) split_row(row_of(r), hi + r * D, lo + r * D, D);
  std::fill(hi + rows * D, hi + padded * D, P(0.f));
  std::fill(lo + rows * D, lo + padded * D, P(0.f));
}

// One packed block's float16 K and V rows as two bfloat16 parts each ([real, D] apiece, in a
// buffer of the calling thread's that the next call reuses), and whether they are all finite:
// what the float16 split packs (operands.h SplitHalfKV, backward_products.h SplitHalfBackwardKV).
struct HalfBlockParts {
  const c10::BFloat16 *k_hi, *k_lo, *v_hi, *v_lo;
  bool finite;
};
template <typename KeyRow, typename ValueRow>
inline HalfBlockParts split_half_block(KeyRow key, ValueRow value, int64_t real, int64_t D) {
  thread_local std::vector<c10::BFloat16> parts;
  parts.resize(std::max<size_t>(parts.size(), 4 * real * D));
  c10::BFloat16 *k_hi = parts.data(), *k_lo = k_hi + real * D, *v_hi = k_lo + real * D, *v_lo = v_hi + real * D;
  bool finite = true;
  for (int64_t r = 0; r < real; ++r) {
    const c10::Half *k = key(r), *v = value(r);
    finite = finite && all_finite_half(k, D) && all_finite_half(v, D);
    split_row(k, k_hi + r * D, k_lo + r * D, D);
    split_row(v, v_hi + r * D, v_lo + r * D, D);
  }
  return {k_hi, k_lo, v_hi, v_lo, finite};
}

// e (y - m), the entropy term of a key of logit y and probability e = exp(y - m) against the
// row's reference m (DESIGN section 5's entropy sum): 0 for a -inf logit (where e (y - m) is
// 0 * -inf). The softmax loops add it where a probe asks for the entropy, from the e they
// compute anyway (before a bf16/fp16 P rounds it), so that the probe needs no second exp.
template <typename T>
inline Vectorized<T> entropy_term(const Vectorized<T>& y, const Vectorized<T>& e, const Vectorized<T>& vm) {
  using V = Vectorized<T>;
  return V::blendv(e * (y - vm), V(T(0)), y == V(-std::numeric_limits<T>::infinity()));
}

template <bool kEntropy, typename T, typename P>
inline T exp_and_sum_of(const T* x, P* p, int64_t lo, int64_t hi, T m, T* entropy_out) {
  using V = Vectorized<T>;
  const V vm(m);
  V vsum0(T(0)), vsum1(T(0)), vent(T(0));
  int64_t j = lo;
  for (; j + 2 * V::size() <= hi; j += 2 * V::size()) {
    const V y0 = V::loadu(x + j), y1 = V::loadu(x + j + V::size());
    V e0 = exp_shifted<P>(y0, vm);
    V e1 = exp_shifted<P>(y1, vm);
    store_probs(p + j, e0, e1);
    vsum0 = vsum0 + e0;
    vsum1 = vsum1 + e1;
    if constexpr (kEntropy) vent = vent + entropy_term(y0, e0, vm) + entropy_term(y1, e1, vm);
  }
  for (; j < hi; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), hi - j);
    V e = exp_partial<P>(x + j, n, vm);
    store_probs_tail(p + j, e, n);
    vsum0 = vsum0 + e;
    if constexpr (kEntropy) vent = vent + V::set(V(T(0)), entropy_term(V::loadu(x + j, n), e, vm), n);
  }
  if constexpr (kEntropy) *entropy_out = reduce_sum(vent);
  return reduce_sum(vsum0 + vsum1);
}

// p[j] = exp(x[j] - m) for j in [lo, hi), stored as P (the dtype of the P.V product); returns
// the sum of the unrounded values, and with entropy_out the sum of their entropy terms there
// (entropy_term). Two vectors per step with two accumulators: one chain of dependent adds
// would otherwise bound the loop.
template <typename T, typename P>
inline T exp_and_sum(const T* x, P* p, int64_t lo, int64_t hi, T m, T* entropy_out = nullptr) {
  return entropy_out ? exp_and_sum_of<true>(x, p, lo, hi, m, entropy_out)
                     : exp_and_sum_of<false>(x, p, lo, hi, m, entropy_out);
}

// y = x * scale (+ bias) of the vector at j (one FMA with a bias), and of the c < V::size()
// lanes at j of a row's tail (multiply, then add): the logits scaled_max_ignoring_nan and
// scaled_exp_sum compute alike.
template <typename T>
inline Vectorized<T> scaled_logits(const T* x, const T* bias, const Vectorized<T>& vs, int64_t j) {
  using V = Vectorized<T>;
  return bias ? at::vec::fmadd(V::loadu(x + j), vs, V::loadu(bias + j)) : V::loadu(x + j) * vs;
}
template <typename T>
inline Vectorized<T> scaled_logits_tail(const T* x, const T* bias, const Vectorized<T>& vs, int64_t j, int64_t c) {
  using V = Vectorized<T>;
  const V y = V::loadu(x + j, c) * vs;
  return bias ? y + V::loadu(bias + j, c) : y;
}

// max of x * scale (+ bias) over [0, n), without storing anything, ignoring NaN (-inf when
// every value is NaN): the reference max for scaled_exp_sum, whose sum turns NaN on a NaN
// logit, sending the row to the exact path. Two independent chains of one-instruction maxima,
// where a NaN-propagating maximum made one chain of four.
template <typename T>
inline T scaled_max_ignoring_nan(const T* x, int64_t n, T scale, const T* bias) {
  using V = Vectorized<T>;
  const V vs(scale), lowest(-std::numeric_limits<T>::infinity());
  V vmax0(lowest), vmax1(lowest);
  int64_t j = 0;
  for (; j + 2 * V::size() <= n; j += 2 * V::size()) {
    vmax0 = max_ignoring_nan(vmax0, scaled_logits(x, bias, vs, j));
    vmax1 = max_ignoring_nan(vmax1, scaled_logits(x, bias, vs, j + V::size()));
  }
  for (; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    const V y = scaled_logits_tail(x, bias, vs, j, c);
    vmax0 = max_ignoring_nan(vmax0, V::set(lowest, y, c));
  }
  // (a lane that saw only NaN may hold NaN: reduce it away)
  T m = -std::numeric_limits<T>::infinity();
  T lanes[V::size()];
  max_ignoring_nan(vmax0, vmax1).store(lanes);
  for (int64_t i = 0; i < V::size(); ++i)
    if (lanes[i] > m) m = lanes[i];
  return m;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// scaled_exp_sum without bias or stored logits, in float: t = x * (scale log2 e) - m log2 e in
// one FMA, and instead of the max, max_out = m + (e + 1) ln 2 with e the sum's binary exponent:
// every exp(y - m) is at most the sum < 2^(e + 1), so this bounds the max from above, which is
// all the lazy path's test needs (a sum past exp(limit) / 2 from many large terms only sends a
// row to the exact path early). A NaN or inf sum has e = 128, past any lazy limit; a zero sum
// e = -127. (std::log of the sum per row took 5 % of the bf16 forward's samples.) The rounding
// of m log2 e shifts every t of the row alike: the probabilities and their sum share the
// factor, which the output's normalisation cancels, and the lse moves by |m| * 6e-8. With the
// vreduceps exp that is 8 vector instructions a vector where scaled_exp_sum's general loop
// takes 12 (AVX-512, bfloat16 P).
template <typename P>
inline float exp_sum_of_raw_scores(const float* x, P* p, int64_t n, float scale, float m, float& max_out) {
  using V = Vectorized<float>;
  const V to_log2(scale * kLog2e), shift(-m * kLog2e);
  V vsum0(0.f), vsum1(0.f);
  int64_t j = 0;
  for (; j + 2 * V::size() <= n; j += 2 * V::size()) {
    const V e0 = pow2<P>(at::vec::fmadd(V::loadu(x + j), to_log2, shift));
    const V e1 = pow2<P>(at::vec::fmadd(V::loadu(x + j + V::size()), to_log2, shift));
    store_probs(p + j, e0, e1);
    vsum0 = vsum0 + e0;
    vsum1 = vsum1 + e1;
  }
  for (; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    const V e = V::set(V(0.f), pow2<P>(at::vec::fmadd(V::loadu(x + j, c), to_log2, shift)), c);
    store_probs_tail(p + j, e, c);
    vsum0 = vsum0 + e;
  }
  const float sum = reduce_sum(vsum0 + vsum1);
  uint32_t bits;
  std::memcpy(&bits, &sum, sizeof(bits));
  const int exponent = static_cast<int>((bits >> 23) & 0xff) - 127;
  max_out = m + static_cast<float>(exponent + 1) * kLn2;
  return sum;
}
#endif

// One pass over a row's visible keys when they form one range: y = x * scale (+ bias),
// p = exp(y - m) with the row's current max m, and the max of y. The caller redoes the row
// with the exact max when y's max exceeds m by too much (lazy rescaling), so most blocks
// need neither a separate max pass nor a rescale of the accumulator. y is also stored in
// logits_out when given (it may be x itself: probes read the logits). The loop's max ignores
// NaN (max_ignoring_nan); a NaN logit makes the sum NaN, and then max_out is NaN too (the max
// of the stored logits with NaN propagated, when there are some), as torch.amax would give.
// Without bias and stored logits max_out is only an upper bound of the max (see
// exp_sum_of_raw_scores): callers compare it, and read the max itself only from stored logits.
// With entropy_out, the sum of the keys' entropy terms against m (entropy_term) is set there.
template <bool kEntropy, typename T, typename P>
inline T scaled_exp_sum_of(const T* x, P* p, int64_t n, T scale, const T* bias, T m, T& max_out, T* logits_out,
                           T* entropy_out) {
  using V = Vectorized<T>;
  const V vm(m), vs(scale), lowest(-std::numeric_limits<T>::infinity());
  V vsum0(T(0)), vsum1(T(0)), vmax0(lowest), vmax1(lowest), vent(T(0));
  int64_t j = 0;
  for (; j + 2 * V::size() <= n; j += 2 * V::size()) {
    V y0 = scaled_logits(x, bias, vs, j), y1 = scaled_logits(x, bias, vs, j + V::size());
    if (logits_out) {
      y0.store(logits_out + j);
      y1.store(logits_out + j + V::size());
    }
    vmax0 = max_ignoring_nan(vmax0, y0);
    vmax1 = max_ignoring_nan(vmax1, y1);
    V e0 = exp_shifted<P>(y0, vm), e1 = exp_shifted<P>(y1, vm);
    store_probs(p + j, e0, e1);
    vsum0 = vsum0 + e0;
    vsum1 = vsum1 + e1;
    if constexpr (kEntropy) vent = vent + entropy_term(y0, e0, vm) + entropy_term(y1, e1, vm);
  }
  for (; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    const V y = scaled_logits_tail(x, bias, vs, j, c);
    if (logits_out) y.store(logits_out + j, c);
    vmax0 = max_ignoring_nan(vmax0, V::set(lowest, y, c));
    V e = V::set(V(T(0)), exp_shifted<P>(y, vm), c);
    store_probs_tail(p + j, e, c);
    vsum0 = vsum0 + e;
    if constexpr (kEntropy) vent = vent + V::set(V(T(0)), entropy_term(y, e, vm), c);
  }
  if constexpr (kEntropy) *entropy_out = reduce_sum(vent);
  const T sum = reduce_sum(vsum0 + vsum1);
  if (std::isnan(sum))
    max_out = logits_out ? max_of(logits_out, 0, n, -std::numeric_limits<T>::infinity())
                         : std::numeric_limits<T>::quiet_NaN();
  else
    max_out = reduce_max(max_ignoring_nan(vmax0, vmax1));
  return sum;
}

template <typename T, typename P>
inline T scaled_exp_sum(const T* x, P* p, int64_t n, T scale, const T* bias, T m, T& max_out,
                        T* logits_out = nullptr, T* entropy_out = nullptr) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>)
    if (bias == nullptr && logits_out == nullptr && entropy_out == nullptr)
      return exp_sum_of_raw_scores(x, p, n, scale, m, max_out);
#endif
  return entropy_out ? scaled_exp_sum_of<true>(x, p, n, scale, bias, m, max_out, logits_out, entropy_out)
                     : scaled_exp_sum_of<false>(x, p, n, scale, bias, m, max_out, logits_out, entropy_out);
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
