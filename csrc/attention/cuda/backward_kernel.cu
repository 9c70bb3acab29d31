// The generic CUDA backward of headops.attention: plain FMA, float32 math, deterministic.
//
// Tested on an NVIDIA H200 (tests/test_attention_cuda.py's gradients against autograd through
// headops.reference in float64 on the CPU, 2026-12-04); reference speed, not timed.
//
// The same computation as the CPU backward (cpu/backward_kernel.h), split so that no two
// threads ever add into the same memory (no atomics: results do not depend on scheduling):
//   1. row_pass, one block per (batch, query head): the epilogue and the alpha mixing
//      backwards row by row (warp per row), giving dL/do of the mixed average (scratch), each
//      branch's delta_i = weight * do_i . o_i - dlse_i (scratch), and the gradients of gate,
//      alpha, sink_logit (warp partials summed in warp order) and out_scale, out_bias (a
//      thread per column, rows in order);
//   2. dq_pass, a warp per query row: walks the keys the row sees (head_semantics.h
//      keys_for_query), recomputes P from the saved lse, dS = P (dP - delta), accumulates
//      dS K (dq = scale * dS K) and q . (dS K), the row's share of d(softmax_scale);
//   3. dkv_pass, a warp per key of one query head: walks the queries that see the key
//      (HeadVisibility::queries_for_key), recomputes P and dS the same way and accumulates
//      dv = P^T dO, dk = scale * dS^T Q and key_bias' gradient (the column sum of dS);
//   4. scale_sum, a thread per head: sums the rows' d(softmax_scale) shares in row order.
// dk/dv are per query head; the caller sums GQA groups in a fixed order (as on the CPU).
// Heads the forward skipped (gate exactly 0) keep their zero-filled gradients.
#include "backward_kernel.cuh"

#include <cmath>

#include "../backward_semantics.h"
#include "../head_semantics.h"
#include "device_math.cuh"
#include "smem_opt_in.h"

namespace headops {
namespace cuda {
namespace {

constexpr int kWarps = kBackwardWarps;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float warp_sum(float x) {
  // butterfly: every lane ends with the same, bitwise identical sum
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The per-head quantities every pass reads: backward_semantics.h's, as on the CPU.
using HeadPlan = BackwardHead<float>;

__device__ __forceinline__ HeadPlan head_plan(const BackwardParams& p, int64_t b, int64_t h) {
  return HeadPlan::read(p, b, h);
}

// --------------------------------------------------------------------------- 1. row pass

__global__ void __launch_bounds__(kThreads) row_pass(BackwardParams p, BackwardScratch scratch) {
  const AttentionParams& f = p.fwd;
  const int64_t bh = blockIdx.x, b = bh / f.heads_q, h = bh % f.heads_q;
  const int64_t Sq = f.seqlen_q, D = f.head_dim;
  const HeadPlan hp = head_plan(p, b, h);
  if (hp.skipped) return;
  const float gate = hp.hs.gate;
  const EpilogueRows<float> rows = EpilogueRows<float>::read(p, hp, b, h);
  const float *os = rows.out_scale, *ob = rows.out_bias, *dlse = rows.dlse;
  float *dos = rows.dout_scale, *dob = rows.dout_bias;
  const bool want_dalpha = rows.want_dalpha;
  const float* lse = static_cast<const float*>(f.lse) + bh * Sq;
  const float* lse_full = f.lse_full ? static_cast<const float*>(f.lse_full) + bh * Sq : nullptr;
  const bool want_dsink = p.dsink_logit != nullptr && hp.hs.has_sink_logit;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float dgate = 0.f, dalpha = 0.f, dsink = 0.f;  // meaningful in lane 0
  for (int64_t i = warp; i < Sq; i += kWarps) {
    const float* dy = p.dout.row<float>(b, i, h);
    const float* o_full = rows.full_row(i);
    const float* o_stream = rows.streaming_row(i);
    float* d_o = scratch.d_o + (bh * Sq + i) * D;
    float g_part = 0.f, dot_f = 0.f, dot_s = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float scale = os ? os[d] : 1.f;
      const float y = dy[d];
      if (rows.need_mixed && (o_full || o_stream))
        g_part += y * gated_term(gate, mixed_average(hp.hs, o_full, o_stream, d) * scale + (ob ? ob[d] : 0.f));
      const float g = gate * y * scale;  // dL/do of the mixed average
      if (o_full) dot_f += g * o_full[d];
      if (o_stream) dot_s += g * o_stream[d];
      d_o[d] = hp.do_scale != 1.f ? g * hp.do_scale : g;
    }
    g_part = warp_sum(g_part);
    dot_f = warp_sum(dot_f);
    dot_s = warp_sum(dot_s);
    if (lane == 0) {
      dgate += g_part;
      float delta_s, delta_f;
      if (want_dalpha) dalpha += hp.dalpha_share(dot_f, dot_s);
      hp.row_deltas(dot_f, dot_s, dlse != nullptr, dlse ? dlse[i] : 0.f, delta_f, delta_s);
      if (want_dsink) {
        if (hp.plan.streaming) dsink += hp.dsink_share(lse[i], delta_s, FastExp{});
        if (hp.plan.full) dsink += hp.dsink_share(lse_full[i], delta_f, FastExp{});
      }
      scratch.delta_stream[bh * Sq + i] = delta_s;
      scratch.delta_full[bh * Sq + i] = delta_f;
    }
  }
  __shared__ float partial[3][kWarps];
  if (lane == 0) {
    partial[0][warp] = dgate;
    partial[1][warp] = dalpha;
    partial[2][warp] = dsink;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s[3] = {0.f, 0.f, 0.f};
    for (int w = 0; w < kWarps; ++w)
      for (int n = 0; n < 3; ++n) s[n] += partial[n][w];
    if (p.dgate) static_cast<float*>(p.dgate)[bh] = s[0];
    if (p.dalpha) static_cast<float*>(p.dalpha)[bh] = s[1];
    if (p.dsink_logit) static_cast<float*>(p.dsink_logit)[bh] = s[2];
  }
  if (dos == nullptr && dob == nullptr) return;
  // out_scale, out_bias: a thread per column, the rows in order
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float s_acc = 0.f, b_acc = 0.f;
    for (int64_t i = 0; i < Sq; ++i) {
      const float y = gate * p.dout.row<float>(b, i, h)[d];
      if (dos) {
        const float* o_full = rows.full_row(i);
        const float* o_stream = rows.streaming_row(i);
        if (o_full || o_stream) s_acc += y * mixed_average(hp.hs, o_full, o_stream, d);
      }
      b_acc += y;
    }
    if (dos) dos[d] = s_acc;
    if (dob) dob[d] = b_acc;
  }
}

// --------------------------------------------------------------------------- P and dS of one pair

// What the key passes need of one head's query row i.
struct RowState {
  int64_t pos;
  float lse_s, lse_f;      // -inf: the branch sees nothing (or is not walked)
  float delta_s, delta_f;
};

__device__ __forceinline__ RowState row_state(const BackwardParams& p, const HeadPlan& hp, int64_t bh, int64_t i) {
  const AttentionParams& f = p.fwd;
  RowState r;
  r.pos = HeadVisibility::query_position(i, f.seqlen_q, f.seqlen_k);
  const int64_t n = bh * f.seqlen_q + i;
  r.lse_s = hp.plan.streaming ? static_cast<const float*>(f.lse)[n] : -INFINITY;
  r.lse_f = hp.plan.full ? static_cast<const float*>(f.lse_full)[n] : -INFINITY;
  return r;
}

// dS and the weight of dO in dv for (row, key j): s_raw = q_i . k_j, dp = d_o_i . v_j.
__device__ __forceinline__ void pair_grad(const HeadPlan& hp, const HeadVisibility& stream_vis,
                                          const HeadVisibility& full_vis, const RowState& r, int64_t j, float s_raw,
                                          float dp, float bias, float& ds, float& pv) {
  const float logit = s_raw * hp.hs.softmax_scale + bias;
  if (!hp.both_branches()) {
    const bool full = hp.plan.full;
    const float lse = full ? r.lse_f : r.lse_s;
    const float delta = full ? r.delta_f : r.delta_s;
    const bool seen = (full ? full_vis.visible(r.pos, j) : stream_vis.visible(r.pos, j)) && lse != -INFINITY;
    const float pr = seen ? expf(logit - lse) : 0.f;
    ds = pr * (dp - delta);
    pv = pr;
  } else {
    const float pf = full_vis.visible(r.pos, j) && r.lse_f != -INFINITY ? expf(logit - r.lse_f) : 0.f;
    const float ps = stream_vis.visible(r.pos, j) && r.lse_s != -INFINITY ? expf(logit - r.lse_s) : 0.f;
    // dS = P_f (w_f dP - delta_f) + P_s (w_s dP - delta_s);  dv weights P = w_f P_f + w_s P_s
    ds = (pf != 0.f ? pf * (hp.dp_weight_full * dp - r.delta_f) : 0.f) + (ps != 0.f ? ps * (hp.dp_weight_streaming * dp - r.delta_s) : 0.f);
    pv = hp.dp_weight_full * pf + hp.dp_weight_streaming * ps;
  }
}

// --------------------------------------------------------------------------- 2. dq pass

// Block: kWarps query rows of one (batch, query head); dynamic shared memory: kWarps rows of D
// floats (each warp's dS K accumulator, lane-owned columns).
__global__ void __launch_bounds__(kThreads) dq_pass(BackwardParams p, BackwardScratch scratch, int64_t row_blocks) {
  extern __shared__ float smem[];
  const AttentionParams& f = p.fwd;
  const int64_t bh = blockIdx.x / row_blocks, b = bh / f.heads_q, h = bh % f.heads_q;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = (blockIdx.x % row_blocks) * kWarps + warp;
  const int64_t Sq = f.seqlen_q, Sk = f.seqlen_k, D = f.head_dim;
  if (i >= Sq) return;
  const HeadPlan hp = head_plan(p, b, h);
  if (hp.skipped || hp.rows_zero) return;
  const int64_t kvh = h / f.group();
  const HeadVisibility stream_vis = streaming_visibility(f.causal, hp.hs);
  const HeadVisibility full_vis = full_visibility(f.causal);
  const HeadVisibility main_vis = hp.plan.full ? full_vis : stream_vis;  // the full branch sees a superset
  RowState r = row_state(p, hp, bh, i);
  r.delta_s = scratch.delta_stream[bh * Sq + i];
  r.delta_f = scratch.delta_full[bh * Sq + i];
  const float* q = f.q.row<float>(b, i, h);
  const float* d_o = scratch.d_o + (bh * Sq + i) * D;
  const float* bias = f.key_bias.present() ? f.key_bias.row<float>(b, h) : nullptr;
  float* acc = smem + warp * D;
  for (int64_t d = lane; d < D; d += 32) acc[d] = 0.f;

  const VisibleKeys keys = main_vis.keys_for_query(r.pos, Sk);
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const KeyRange range = part == 0 ? keys.sinks : keys.window;  // a copy: no local-memory array
    for (int64_t j = range.lo; j < range.hi; ++j) {
      const float* k = f.k.row<float>(b, j, kvh);
      const float* v = f.v.row<float>(b, j, kvh);
      float s = 0.f, dp = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        s = fmaf(q[d], k[d], s);
        dp = fmaf(d_o[d], v[d], dp);
      }
      s = warp_sum(s);
      dp = warp_sum(dp);
      float ds, pv;
      pair_grad(hp, stream_vis, full_vis, r, j, s, dp, bias ? bias[j] : 0.f, ds, pv);
      if (ds != 0.f)
        for (int64_t d = lane; d < D; d += 32) acc[d] = fmaf(ds, k[d], acc[d]);
    }
  }
  // dq = scale * dS K; d(scale) = sum_ij dS_ij (q_i . k_j) = sum_i q_i . (dS K)_i
  float qdq = 0.f;
  float* dq = p.want_dq ? const_cast<float*>(p.dq.row<float>(b, i, h)) : nullptr;
  for (int64_t d = lane; d < D; d += 32) {
    qdq = fmaf(q[d], acc[d], qdq);
    if (dq) dq[d] = hp.hs.softmax_scale * acc[d];
  }
  qdq = warp_sum(qdq);
  if (p.dsoftmax_scale && lane == 0) scratch.dscale_rows[bh * Sq + i] = qdq;
}

// --------------------------------------------------------------------------- 3. dk/dv pass

// Block: kWarps keys of one (batch, query head); dynamic shared memory: kWarps x 2 rows of D
// floats (each warp's dS^T Q and P^T dO accumulators, lane-owned columns).
__global__ void __launch_bounds__(kThreads) dkv_pass(BackwardParams p, BackwardScratch scratch, int64_t key_blocks) {
  extern __shared__ float smem[];
  const AttentionParams& f = p.fwd;
  const int64_t bh = blockIdx.x / key_blocks, b = bh / f.heads_q, h = bh % f.heads_q;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = (blockIdx.x % key_blocks) * kWarps + warp;
  const int64_t Sq = f.seqlen_q, Sk = f.seqlen_k, D = f.head_dim;
  if (j >= Sk) return;
  const HeadPlan hp = head_plan(p, b, h);
  if (hp.skipped || hp.rows_zero) return;
  const int64_t kvh = h / f.group();
  const HeadVisibility stream_vis = streaming_visibility(f.causal, hp.hs);
  const HeadVisibility full_vis = full_visibility(f.causal);
  const HeadVisibility main_vis = hp.plan.full ? full_vis : stream_vis;
  const float* k = f.k.row<float>(b, j, kvh);
  const float* v = f.v.row<float>(b, j, kvh);
  const float bias = f.key_bias.present() ? f.key_bias.row<float>(b, h)[j] : 0.f;
  float* dk_acc = smem + warp * 2 * D;
  float* dv_acc = dk_acc + D;
  for (int64_t d = lane; d < D; d += 32) dk_acc[d] = dv_acc[d] = 0.f;
  float dkb = 0.f;

  const KeyRange rows = main_vis.queries_for_key(j, Sq, Sk);
  for (int64_t i = rows.lo; i < rows.hi; ++i) {
    RowState r = row_state(p, hp, bh, i);
    r.delta_s = scratch.delta_stream[bh * Sq + i];
    r.delta_f = scratch.delta_full[bh * Sq + i];
    const float* q = f.q.row<float>(b, i, h);
    const float* d_o = scratch.d_o + (bh * Sq + i) * D;
    float s = 0.f, dp = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      s = fmaf(q[d], k[d], s);
      dp = fmaf(d_o[d], v[d], dp);
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    float ds, pv;
    pair_grad(hp, stream_vis, full_vis, r, j, s, dp, bias, ds, pv);
    dkb += ds;
    if (ds != 0.f || pv != 0.f) {
      for (int64_t d = lane; d < D; d += 32) {
        dk_acc[d] = fmaf(ds, q[d], dk_acc[d]);
        dv_acc[d] = fmaf(pv, d_o[d], dv_acc[d]);
      }
    }
  }
  if (p.want_dk) {
    float* dk = const_cast<float*>(p.dk.row<float>(b, j, h));
    for (int64_t d = lane; d < D; d += 32) dk[d] = hp.hs.softmax_scale * dk_acc[d];
  }
  if (p.want_dv) {
    float* dv = const_cast<float*>(p.dv.row<float>(b, j, h));
    for (int64_t d = lane; d < D; d += 32) dv[d] = dv_acc[d];
  }
  if (p.dkey_bias && lane == 0) static_cast<float*>(p.dkey_bias)[bh * Sk + j] = dkb;
}

// --------------------------------------------------------------------------- 4. d(softmax_scale)

__global__ void scale_sum(BackwardParams p, BackwardScratch scratch, int64_t n_heads) {
  const int64_t bh = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh >= n_heads) return;
  const int64_t Sq = p.fwd.seqlen_q;
  float s = 0.f;
  for (int64_t i = 0; i < Sq; ++i) s += scratch.dscale_rows[bh * Sq + i];
  static_cast<float*>(p.dsoftmax_scale)[bh] = s;
}

// Dynamic shared memory beyond the default 48 KB needs an opt-in per kernel.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(bytes));
}

}  // namespace

cudaError_t launch_generic_backward(const BackwardParams& p, const BackwardScratch& scratch, cudaStream_t stream) {
  const AttentionParams& f = p.fwd;
  const int64_t n_heads = f.batch * f.heads_q;
  if (n_heads == 0 || f.seqlen_q == 0 || f.head_dim == 0) return cudaSuccess;
  row_pass<<<static_cast<unsigned>(n_heads), kThreads, 0, stream>>>(p, scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || f.seqlen_k == 0) return err;
  const size_t row_bytes = static_cast<size_t>(f.head_dim) * sizeof(float);
  if (p.want_dq || p.dsoftmax_scale) {
    const int64_t row_blocks = (f.seqlen_q + kWarps - 1) / kWarps;
    const size_t smem = kWarps * row_bytes;
    if ((err = allow_smem(dq_pass, smem)) != cudaSuccess) return err;
    dq_pass<<<static_cast<unsigned>(n_heads * row_blocks), kThreads, smem, stream>>>(p, scratch, row_blocks);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.want_dk || p.want_dv || p.dkey_bias) {
    const int64_t key_blocks = (f.seqlen_k + kWarps - 1) / kWarps;
    const size_t smem = static_cast<size_t>(backward_smem_bytes(f.head_dim));
    if ((err = allow_smem(dkv_pass, smem)) != cudaSuccess) return err;
    dkv_pass<<<static_cast<unsigned>(n_heads * key_blocks), kThreads, smem, stream>>>(p, scratch, key_blocks);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.dsoftmax_scale) {
    scale_sum<<<static_cast<unsigned>((n_heads + 127) / 128), 128, 0, stream>>>(p, scratch, n_heads);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cuda
}  // namespace headops
