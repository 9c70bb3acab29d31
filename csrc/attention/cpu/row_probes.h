// The probe statistics of a query tile's rows (DESIGN section 5, rules in probe_semantics.h),
// kept beside the forward's online softmax in the same pass over the keys: span and distance
// masses and the entropy sum are accumulated against the row's reference max and rescaled with
// its sum (the entropy terms come from the softmax's own exp, row_ops' entropy_term); the
// top-k keys are ranked by logit. Compiled per instruction set with the forward.
#pragma once

#ifndef CPU_CAPABILITY
#error "include row_probes.h from a kernel compiled for one CPU_CAPABILITY"
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../../cpu/row_ops.h"
#include "../probe_params.h"
#include "../probe_semantics.h"

namespace headops::cpu {
namespace CPU_CAPABILITY {

template <typename acc_t>
class RowProbes {
 public:
  RowProbes(const ProbeParams* probe, int64_t block_q) : probe_(probe && probe->row_statistics() ? probe : nullptr) {
    if (!probe_) return;
    spans_.resize(block_q * probe_->n_spans);
    distances_.resize(block_q * probe_->n_distances);
    entropy_.resize(block_q);
    top_logits_.resize(block_q * probe_->topk);
    top_positions_.resize(block_q * probe_->topk);
  }

  bool active() const { return probe_ != nullptr; }
  bool wants_entropy() const { return probe_ != nullptr && probe_->entropy; }

  void reset(int64_t nq) {
    if (!probe_) return;
    std::fill(spans_.begin(), spans_.begin() + nq * probe_->n_spans, acc_t(0));
    std::fill(distances_.begin(), distances_.begin() + nq * probe_->n_distances, acc_t(0));
    std::fill(entropy_.begin(), entropy_.begin() + nq, acc_t(0));
    std::fill(top_logits_.begin(), top_logits_.begin() + nq * probe_->topk, negative_infinity<acc_t>());
    std::fill(top_positions_.begin(), top_positions_.begin() + nq * probe_->topk, int64_t(-1));
  }

  // Row r (query position pos, batch row b) has taken the key block [j0, j0 + nk): x holds its
  // logits, prob its probabilities against the row's reference `ref` on the visible parts
  // (relative to j0). Before the block the reference was old_ref with sum old_sum; correction
  // is exp(old_ref - ref). entropy_terms: the sum of the visible keys' entropy terms against
  // ref (the softmax's, when the probe asks for the entropy); block_max: the largest logit among
  // them where no logit is NaN, else NaN (a bound lets the top-k skip a block none of whose
  // keys can enter).
  template <typename prob_t>
  void update(int64_t r, int64_t b, int64_t pos, const acc_t* x, const prob_t* prob, const KeyRange (&parts)[2],
              int64_t j0, acc_t ref, acc_t old_ref, acc_t old_sum, acc_t correction, acc_t entropy_terms,
              acc_t block_max) {
    if (!probe_) return;
    acc_t* spans = spans_.data() + r * probe_->n_spans;
    acc_t* distances = distances_.data() + r * probe_->n_distances;
    if (correction != acc_t(1)) {
      for (int64_t n = 0; n < probe_->n_spans; ++n) spans[n] *= correction;
      for (int64_t n = 0; n < probe_->n_distances; ++n) distances[n] *= correction;
      entropy_[r] = rescale_entropy_sum(entropy_[r], old_sum, old_ref, ref, correction);
    }
    if (probe_->entropy) entropy_[r] += entropy_terms;
    // (ties go to the lower position, which an earlier block holds: a block whose largest logit
    // does not beat the k-th kept one offers nothing)
    const bool offers = probe_->topk > 0 && !(block_max <= top_logits_[(r + 1) * probe_->topk - 1]);
    const int64_t* span = probe_->spans + b * probe_->spans_stride_b;
    for (const KeyRange& part : parts) {
      if (part.empty()) continue;
      const KeyRange keys{j0 + part.lo, j0 + part.hi};  // absolute positions of this part
      for (int64_t n = 0; n < probe_->n_spans; ++n)
        spans[n] += mass(x, prob, keys.clip(span[2 * n], span[2 * n + 1]), j0, ref);
      for (int64_t n = 0; n < probe_->n_distances; ++n) {
        const KeyRange near = keys_at_distances(pos, probe_->distances[2 * n], probe_->distances[2 * n + 1]);
        distances[n] += mass(x, prob, keys.clip(near.lo, near.hi), j0, ref);
      }
      if (offers) offer_keys(r, x, part, j0);
    }
  }

  // Writes row r's statistics (head h, batch row b, query i) from its finished softmax.
  void finish(int64_t r, int64_t b, int64_t h, int64_t i, int64_t heads_q, int64_t Sq,
              const OnlineSoftmax<acc_t>& row, const HeadScalars<acc_t>& hs) {
    if (!probe_) return;
    const int64_t at = (b * heads_q + h) * Sq + i;
    const acc_t inv = row.inverse_sum();
    const acc_t lse = row.lse(StdLog{});
    for (int64_t n = 0; n < probe_->n_spans; ++n)
      probe_->span_mass[at * probe_->n_spans + n] = static_cast<float>(spans_[r * probe_->n_spans + n] * inv);
    for (int64_t n = 0; n < probe_->n_distances; ++n)
      probe_->distance_mass[at * probe_->n_distances + n] =
          static_cast<float>(distances_[r * probe_->n_distances + n] * inv);
    if (probe_->sink_mass)
      probe_->sink_mass_out[at] = static_cast<float>(
          hs.has_sink_logit && row_has_mass(row.sum) ? sink_probability(hs.sink_logit, lse, StdExp{}) : acc_t(0));
    if (probe_->entropy) probe_->entropy_out[at] = static_cast<float>(row_entropy(row, entropy_[r], StdLog{}));
    for (int64_t n = 0; n < probe_->topk; ++n) {
      const int64_t pos = top_positions_[r * probe_->topk + n];
      probe_->topk_index[at * probe_->topk + n] = pos;
      probe_->topk_prob[at * probe_->topk + n] =
          pos < 0 ? 0.f : static_cast<float>(std::exp(top_logits_[r * probe_->topk + n] - lse));
    }
  }

 private:
  // sum of the probabilities of the keys [keys.lo, keys.hi) (absolute), block starting at j0
  template <typename prob_t>
  static acc_t mass(const acc_t* x, const prob_t* prob, KeyRange keys, int64_t j0, acc_t ref) {
    if (keys.empty()) return acc_t(0);
    const int64_t lo = keys.lo - j0, hi = keys.hi - j0;
    acc_t sum = 0;
    if constexpr (std::is_same_v<prob_t, acc_t>) {
      for (int64_t j = lo; j < hi; ++j) sum += prob[j];
    } else {  // probabilities rounded for the P.V product: take them again from the logits
      using V = Vectorized<acc_t>;
      const V vref(ref);
      V total(acc_t(0));
      int64_t j = lo;
      for (; j + V::size() <= hi; j += V::size()) total = total + (V::loadu(x + j) - vref).exp();
      sum = reduce_sum(total);
      for (; j < hi; ++j) sum += std::exp(x[j] - ref);
    }
    return sum;
  }

  // offers the part's keys to row r's top-k: of a vector of logits, only the lanes that beat
  // the k-th kept one (or are NaN) when it is read, in position order (a lane that no longer
  // beats it after an earlier one entered is turned away by offer_topk)
  void offer_keys(int64_t r, const acc_t* x, KeyRange part, int64_t j0) {
    using V = Vectorized<acc_t>;
    const int64_t k = probe_->topk;
    acc_t* logits = top_logits_.data() + r * k;
    int64_t* positions = top_positions_.data() + r * k;
    constexpr int all_lanes = (1 << V::size()) - 1;
    int64_t j = part.lo;
    for (; j + V::size() <= part.hi; j += V::size()) {
      const acc_t kth = logits[k - 1];
      if (kth != kth) return;  // k NaN logits kept: nothing ranks above them (ranks_above)
      const V xs = V::loadu(x + j);
      // (lanes by shifting, not __builtin_ctz: its tzcnt is BMI1, outside the DEFAULT variant's ISA)
      int lanes = ~(V(xs > V(kth)) | V(xs != xs)).zero_mask() & all_lanes;
      for (int64_t c = j; lanes != 0; ++c, lanes >>= 1)
        if (lanes & 1) offer_topk(logits, positions, k, x[c], j0 + c);
    }
    for (; j < part.hi; ++j) offer_topk(logits, positions, k, x[j], j0 + j);
  }

  const ProbeParams* probe_;
  std::vector<acc_t> spans_, distances_, entropy_, top_logits_;
  std::vector<int64_t> top_positions_;
};

}  // namespace CPU_CAPABILITY
}  // namespace headops::cpu
