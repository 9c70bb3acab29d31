// The online softmax of one query row: the one home of its rules, shared by the CPU forward,
// the CPU decode kernel and both CUDA forward kernels (as FlashAttention's softmax.h).
//
// A row keeps a reference max and the sum of exp(logit - reference) over the keys seen so
// far; the kernel keeps the matching output accumulator and multiplies it by the factor each
// step returns. Rules:
//   * a sink logit is a virtual key with a zero value that every row sees: the row starts at
//     max = sink logit, sum = exp(0) = 1 (0 for a -inf sink, which weighs nothing), so a row's
//     sum is 0 whenever its max is -inf;
//   * a NaN logit (from NaN or inf in q or k) reaches the output and lse, as in the reference:
//     the max keeps it (nan_max), and a NaN sum is not read as "no visible key";
//   * a row whose max is still -inf exponentiates against 0, so -inf - -inf never happens;
//   * a +inf sink logit takes the whole row: the max stays +inf, what was accumulated keeps its
//     weight (factor 1, not exp(inf - inf)) and finite logits weigh exp(-inf) = 0, so the row
//     ends with o = 0 and lse = +inf, as in the reference;
//   * a row that saw no key (sum 0) finishes with o = 0 and lse = -inf.
// The exponential's base is the kernel's: natural units with exp/log, or log2 units (logits
// pre-multiplied by log2 e) with exp2/log2. Threads that share a row each keep a part of its sum
// (CUDA); only one of them counts the sink's term, and the parts are added before finishing.
#pragma once

#include <cmath>

#include "head_semantics.h"

namespace headops {
inline namespace HEADOPS_ISA_NAMESPACE {

// max that keeps a NaN (std::max drops it when it is the second argument)
template <typename acc_t>
HEADOPS_HD acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || b != b) ? b : a;
}
// 1 / (a row's softmax sum): 0 for a row that saw no key (sum 0), NaN stays NaN
template <typename acc_t>
HEADOPS_HD acc_t inverse_row_sum(acc_t sum) {
  return sum != acc_t(0) ? acc_t(1) / sum : acc_t(0);
}
// a row saw a key (or a NaN): its lse is max + log(sum), otherwise -inf
template <typename acc_t>
HEADOPS_HD bool row_has_mass(acc_t sum) {
  return sum != acc_t(0);
}

template <typename acc_t>
HEADOPS_HD acc_t negative_infinity() {
  return -static_cast<acc_t>(INFINITY);
}

// exp(from - to): the factor for what was taken against `from` when the reference moves to `to`;
// 1 when both are +inf (a +inf sink logit), where from - to would be NaN
template <typename acc_t, typename Exp>
HEADOPS_HD acc_t move_factor(acc_t from, acc_t to, Exp exp_fn) {
  return (from == to && from == static_cast<acc_t>(INFINITY)) ? acc_t(1) : exp_fn(from - to);
}

// A row's probability of its sink, exp(sink_logit - lse): 1 for a +inf sink logit (lse +inf too).
// The caller checks that the row has a sink logit and saw something (lse > -inf).
template <typename acc_t, typename Exp>
HEADOPS_HD acc_t sink_probability(acc_t sink_logit, acc_t lse, Exp exp_fn) {
  return move_factor(sink_logit, lse, exp_fn);
}

template <typename acc_t>
struct OnlineSoftmax {
  acc_t max;  // every exponent of the row is taken against this reference (may lag the true max)
  acc_t sum;  // sum of exp(logit - max) over the keys seen so far

  HEADOPS_HD static OnlineSoftmax start(bool has_sink_logit, acc_t sink_logit, bool counts_sink = true) {
    const acc_t m0 = has_sink_logit ? sink_logit : negative_infinity<acc_t>();
    return {m0, (m0 != negative_infinity<acc_t>() && counts_sink) ? acc_t(1) : acc_t(0)};
  }

  // What this block's exponents are taken against: the max, or 0 while it is -inf.
  HEADOPS_HD acc_t reference() const { return max == negative_infinity<acc_t>() ? acc_t(0) : max; }

  // Moves the reference to cover a block whose largest logit is block_max. Returns the factor
  // by which the sum and the output accumulator must be scaled (`add` scales the sum): 1 when
  // the max stays, 0 while nothing has been accumulated, NaN once a NaN arrived.
  template <typename Exp>
  HEADOPS_HD acc_t rescale(acc_t block_max, Exp exp_fn) {
    const acc_t previous = max;
    max = nan_max(max, block_max);
    return move_factor(previous, reference(), exp_fn);
  }

  // Adds a block's sum of exp(logit - reference()); `correction` is what rescale returned.
  HEADOPS_HD void add(acc_t block_sum, acc_t correction = acc_t(1)) { sum = sum * correction + block_sum; }

  // Adds a block whose exponents were taken against `ref` without a rescale: ref is the current
  // reference or, for a row that has accumulated nothing yet (max -inf), any value (lazy
  // rescaling: the caller checked the block's max against ref).
  HEADOPS_HD void add_at_reference(acc_t ref, acc_t block_sum) {
    max = ref;
    sum += block_sum;
  }

  // Merges another partial softmax of the same row (split keys). Returns the factors for the
  // accumulators of this one (self) and of the other; a partial that saw nothing changes nothing.
  struct MergeScales {
    acc_t self, other;
  };
  template <typename Exp>
  HEADOPS_HD MergeScales merge(const OnlineSoftmax& other, Exp exp_fn) {
    if (other.sum == acc_t(0)) return {acc_t(1), acc_t(0)};
    const acc_t merged = nan_max(max, other.max);
    const MergeScales scales{move_factor(max, merged, exp_fn), move_factor(other.max, merged, exp_fn)};
    sum = sum * scales.self + other.sum * scales.other;
    max = merged;
    return scales;
  }

  // 1 / sum: 0 for a row that saw no key, NaN stays NaN.
  HEADOPS_HD acc_t inverse_sum() const { return inverse_row_sum(sum); }

  // The row's log-sum-exp in the units it was kept in; -inf for a row that saw no key.
  template <typename Log>
  HEADOPS_HD acc_t lse(Log log_fn) const {
    return row_has_mass(sum) ? max + log_fn(sum) : negative_infinity<acc_t>();
  }
};

// The natural-units exponential and logarithm of host code (CUDA kernels pass their intrinsics).
struct StdExp {
  template <typename T>
  T operator()(T x) const { return std::exp(x); }
};
struct StdLog {
  template <typename T>
  T operator()(T x) const { return std::log(x); }
};

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
