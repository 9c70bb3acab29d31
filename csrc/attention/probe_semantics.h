// The rules of the probe statistics (DESIGN section 5) that a kernel keeps per query row while
// it walks the keys with its online softmax (online_softmax.h): masses are sums of
// exp(logit - reference) rescaled with the row's sum; the entropy sum is
// E = sum exp(logit - m) * (logit - m) against the row's reference m; the top-k keys are ranked
// by logit. Plain C++ shared by the CPU kernels (and the CUDA ones when they carry probes).
#pragma once

#include <cstdint>

#include "online_softmax.h"

namespace headops {
inline namespace HEADOPS_ISA_NAMESPACE {

// E after the reference moves from old_ref to new_ref with factor c = exp(old_ref - new_ref):
// each term e^(x - m)(x - m) becomes c e^(x - m)((x - m) + (m - m')). A row that had
// accumulated nothing (old_sum 0) has E = 0.
template <typename acc_t>
HEADOPS_HD acc_t rescale_entropy_sum(acc_t entropy_sum, acc_t old_sum, acc_t old_ref, acc_t new_ref, acc_t c) {
  return old_sum == acc_t(0) ? acc_t(0) : c * (entropy_sum + (old_ref - new_ref) * old_sum);
}

// -sum p log p with p = exp(x - m) / sum (the sink's term included when the row started from
// it: its (x - m) is 0 at the start and rescales like every key's): log(sum) - E / sum; 0 for a
// row that saw nothing, NaN stays NaN. A +inf sink logit holds the whole row (its max stays +inf
// and its sum finite; E itself is NaN there, 0 * -inf): entropy 0.
template <typename acc_t, typename Log>
HEADOPS_HD acc_t row_entropy(const OnlineSoftmax<acc_t>& row, acc_t entropy_sum, Log log_fn) {
  if (row.max == static_cast<acc_t>(INFINITY) && row.sum == row.sum) return acc_t(0);
  return row.sum == acc_t(0) ? acc_t(0) : log_fn(row.sum) - entropy_sum / row.sum;
}

// The rank of a logit among the top-k: NaN ranks above every number (as torch.sort puts it);
// a -inf logit (a key masked by key_bias) is never a candidate.
template <typename acc_t>
HEADOPS_HD bool ranks_above(acc_t x, acc_t y) {
  if (y != y) return false;  // nothing ranks above a NaN already kept (ties keep the lower position)
  return x != x || x > y;
}

// Offers key `pos` with logit x to a row's top-k list (logits descending, positions; empty
// slots hold -inf and -1). Keys arrive in increasing position, so an equal logit stays behind
// the ones already kept: ties go to the lower position.
template <typename acc_t>
HEADOPS_HD void offer_topk(acc_t* logits, int64_t* positions, int64_t k, acc_t x, int64_t pos) {
  if (!ranks_above(x, logits[k - 1])) return;
  int64_t at = k - 1;
  while (at > 0 && ranks_above(x, logits[at - 1])) {
    logits[at] = logits[at - 1];
    positions[at] = positions[at - 1];
    --at;
  }
  logits[at] = x;
  positions[at] = pos;
}

// The keys [lo, hi) at query-relative distances [d0, d1) (0 <= d0 <= d1) from position pos:
// d0 <= pos - j < d1, i.e. pos - d1 < j <= pos - d0, clipped at key 0 (no overflow for any d1).
HEADOPS_HD KeyRange keys_at_distances(int64_t pos, int64_t d0, int64_t d1) {
  if (d0 > pos) return {0, 0};
  return {d1 > pos ? int64_t(0) : pos - d1 + 1, pos - d0 + 1};
}

}  // namespace HEADOPS_ISA_NAMESPACE
}  // namespace headops
