// CUDA forward of headops.attention (DESIGN section 1): FlashAttention-2 style, per-head
// behaviour read at run time from head_semantics.h.
//
// Tested on an NVIDIA H200 (tests/test_attention_cuda.py through bench/gpu_suite.sh, 2026-12-04):
// correct there, 2.8-3.6x cuDNN's time at S = 8192 (mma.sync, no wgmma/TMA; docs/cuda.md).
//
// Two kernels share the work list, the key walk and every per-head rule:
//   * tensor-core kernel (bf16/fp16, D = 64 or 128): one CTA per work item of 128 query rows,
//     8 warps of 16 rows; K/V blocks of 64 keys double-buffered in shared memory by cp.async
//     (16-byte chunks, XOR-swizzled rows), S = Q K^T and O += P V by mma.sync m16n8k16 with
//     float accumulators, fragments through ldmatrix (V with .trans); the probabilities go
//     from the S accumulators to the A operand of P V in registers;
//   * generic kernel (float32 and any D <= 512, or bf16/fp16 whose head dim or alignment the
//     tensor-core kernel does not take): one CTA per item of 16 rows, plain FMA in float; a
//     lane holds up to 8 output columns of a row (D <= 256) or 16 (D <= 512: Gemma 4's
//     full-attention layers), two instantiations so that the common dims keep their registers.
// Per item: the head's scalars (read_head), its branch plan (plan_branches) and the keys it
// walks (tile_walk: the sinks range then the window range, or the causal range when alpha needs
// the full branch) come from head_semantics.h; each row's visible ranges for each branch are
// computed once per item (keys_for_query) and a key block is masked only when
// block_fully_visible says some key of it is hidden from some row of the warp. Both branches
// of an alpha head share one pass over the keys (two online softmaxes, two accumulators), the
// streaming one only on blocks that meet its ranges. In the tensor-core kernel a warp also skips
// the blocks that none of its 16 rows sees (keys_for_positions of the warp's rows), which the
// tile's walk (the union over 128 rows) includes. The epilogue is mix_alpha + epilogue.
//
// Online softmax: the tensor-core kernel works in log2 units (logit * log2 e, exp2); the
// generic kernel in natural units. Rows start from the sink logit (sum 1) when there is one; a
// row whose running max is still -inf exponentiates against 0, so -inf - -inf never happens:
// a row with no visible key ends with sum 0, o = 0 and lse = -inf (or the sink logit).
#define HEADOPS_ISA_NAMESPACE cuda_kernels

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../attention_params.h"
#include "../head_semantics.h"
#include "../online_softmax.h"
#include "async_copy.cuh"
#include "device_math.cuh"
#include "forward_kernel.cuh"
#include "smem_opt_in.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// below sm_80 the tensor-core kernel's body is a trap (the host never launches it there), so the
// helpers only it calls are unused in that device pass
#pragma nv_diag_suppress 177
#endif

namespace headops {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ int clamp_int(int64_t x, int64_t lo, int64_t hi) {
  return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
}

// A row's visible keys for one branch, relative to nothing (absolute key indices, int32: the
// host checks Sk < 2^30).
struct RowRanges {
  int s_lo, s_hi, w_lo, w_hi;
};

__device__ __forceinline__ RowRanges to_ranges(const VisibleKeys& k, int64_t Sk) {
  RowRanges r;
  r.s_lo = clamp_int(k.sinks.lo, 0, Sk);
  r.s_hi = clamp_int(k.sinks.hi, 0, Sk);
  r.w_lo = clamp_int(k.window.lo, 0, Sk);
  r.w_hi = clamp_int(k.window.hi, 0, Sk);
  return r;
}

// Whether any key of [lo, hi) lies in the ranges.
__device__ __forceinline__ bool touches(const RowRanges& r, int lo, int hi) {
  return max(r.s_lo, lo) < min(r.s_hi, hi) || max(r.w_lo, lo) < min(r.w_hi, hi);
}

__device__ __forceinline__ RowRanges row_ranges(const HeadVisibility& vis, int64_t pos, int64_t Sk) {
  const VisibleKeys k = vis.keys_for_query(pos, Sk);
  RowRanges r;
  r.s_lo = clamp_int(k.sinks.lo, 0, Sk);
  r.s_hi = clamp_int(k.sinks.hi, 0, Sk);
  r.w_lo = clamp_int(k.window.lo, 0, Sk);
  r.w_hi = clamp_int(k.window.hi, 0, Sk);
  return r;
}

// Whether key j (absolute) is visible under these ranges.
__device__ __forceinline__ bool in_ranges(const RowRanges& r, int j) {
  return (j >= r.s_lo && j < r.s_hi) || (j >= r.w_lo && j < r.w_hi);
}

// ------------------------------------------------------------------------------------------
// Tensor-core kernel

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b: m16n8k16, float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory tile of `rows` x D elements (2 bytes) stored as 16-byte chunks, chunk c of row r
// at position c ^ (r & 7): the 8 rows an ldmatrix reads at one column hit 8 different 16-byte
// bank groups.
template <int D>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>((row * (D / 8) + (chunk ^ (row & 7))) * 16);
}

// Copies rows [0, rows) of a tile whose row r is global row (first + r); only rows with
// first + r < end are read, the others become zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* base, int64_t row_stride, int64_t first, int64_t end) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kTcThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t g = first + r;
    const bool real = g < end;
    const T* src = base + (real ? g : first) * row_stride + c * 8;
    cp_async_16(smem + swizzled<D>(r, c), src, real ? 16 : 0);
  }
}


// What an item of up to block_q query rows of one head reads before it walks the keys (both
// kernels): where it is, the head's scalars, branch plan and visibilities, and its key walk.
struct ItemStart {
  int64_t b, h, q0, shift, kvh;
  int nq;
  HeadScalars<float> hs;
  BranchPlan plan;
  HeadVisibility stream_vis, full_vis;
  VisibleKeys walk;

  __device__ __forceinline__ ItemStart(const AttentionParams& p, const WorkItem& item, int block_q)
      : b(item.b), h(item.h), q0(int64_t(item.q_tile) * block_q), shift(p.seqlen_k - p.seqlen_q),
        kvh(item.h / p.group()), nq(static_cast<int>(min64(block_q, p.seqlen_q - q0))), hs(read_head<float>(p, b, h)),
        plan(plan_branches(hs)), stream_vis(streaming_visibility(p.causal, hs)), full_vis(full_visibility(p.causal)),
        walk(tile_walk(p, hs, q0, q0 + nq)) {}
};

// One online-softmax branch of a warp's 16 rows: this thread holds rows g and g + 8, in log2
// units, with its part of each row's sum (the quad's four parts add up at the end).
template <int D>
struct TcBranch {
  float o[D / 8][4];
  OnlineSoftmax<float> row[2];

  __device__ __forceinline__ void init(const HeadScalars<float>& hs, bool owns_sink) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
    row[0] = row[1] = OnlineSoftmax<float>::start(hs.has_sink_logit, hs.sink_logit * kLog2e, owns_sink);
  }
};

// Visibility bit of score element (n-tile nt, element e) of this thread: bit nt * 4 + e, where
// e = 2 * row_half + column parity (the accumulator layout of m16n8).
__device__ __forceinline__ uint32_t tc_mask(const RowRanges (&rr)[2], int j0, int nvalid, int t) {
  uint32_t mask = 0;
#pragma unroll
  for (int nt = 0; nt < kTcBlockK / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);
      const bool vis = col < nvalid && in_ranges(rr[e >> 1], j0 + col);
      mask |= (vis ? 1u : 0u) << (nt * 4 + e);
    }
  return mask;
}

// Online-softmax step of one branch with the block's logits x (log2 units): new running max,
// rescaled sum and accumulators, and P (in T) as the A operand of P V.
template <typename T, int D>
__device__ __forceinline__ void tc_softmax(TcBranch<D>& br, const float (&x)[kTcBlockK / 8][4], uint32_t mask,
                                           uint32_t (&pa)[kTcBlockK / 16][4]) {
  float mx[2] = {kNegInf, kNegInf};
#pragma unroll
  for (int nt = 0; nt < kTcBlockK / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (mask & (1u << (nt * 4 + e))) mx[e >> 1] = nan_max(mx[e >> 1], x[nt][e]);
  float m_use[2], corr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = nan_max(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = nan_max(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    corr[i] = br.row[i].rescale(mx[i], Exp2{});
    m_use[i] = br.row[i].reference();
  }
  float sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < kTcBlockK / 8; ++nt) {
    float p[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      p[e] = (mask & (1u << (nt * 4 + e))) ? exp2f(x[nt][e] - m_use[e >> 1]) : 0.f;
      sum[e >> 1] += p[e];
    }
    // n-tile nt covers keys 8 nt ..: the even one of a pair is k 0-7 of the fragment, the odd k 8-15
    pa[nt / 2][(nt & 1) * 2 + 0] = TypeOps<T>::pack2(p[0], p[1]);  // row g
    pa[nt / 2][(nt & 1) * 2 + 1] = TypeOps<T>::pack2(p[2], p[3]);  // row g + 8
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) br.row[i].add(sum[i], corr[i]);
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    br.o[n][0] *= corr[0];
    br.o[n][1] *= corr[0];
    br.o[n][2] *= corr[1];
    br.o[n][3] *= corr[1];
  }
}

// O[16 x D] += P[16 x 64] V[64 x D]. V's B fragments through ldmatrix.trans: matrices
// (keys k0.., d n0), (keys k0+8.., d n0), (keys k0.., d n0+8), (keys k0+8.., d n0+8).
template <typename T, int D>
__device__ __forceinline__ void tc_pv(TcBranch<D>& br, const uint32_t (&pa)[kTcBlockK / 16][4], uint32_t sV,
                                      int lane) {
#pragma unroll
  for (int kk = 0; kk < kTcBlockK / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int chunk = dp * 2 + (lane >> 4);
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + swizzled<D>(key, chunk));
      mma_16816<T>(br.o[2 * dp], pa[kk], b[0], b[1]);
      mma_16816<T>(br.o[2 * dp + 1], pa[kk], b[2], b[3]);
    }
  }
}

// kAlpha: the call passes alpha, so a head may need both branches (two accumulators). It is a
// property of the launch, not of a head: without it the kernel holds one accumulator (half the
// registers); with it, each head's plan_branches still decides at run time what is computed.
template <typename T, int D, bool kAlpha>
__global__ void __launch_bounds__(kTcThreads, 1)
    tc_forward_kernel(const AttentionParams p, const WorkItem* __restrict__ items) {
  static_assert(D % 16 == 0 && D <= 128, "tensor-core kernel: D = 64 or 128");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // (never launched there: below sm_80 the host takes the generic kernel; cp.async and bf16 mma need sm_80)
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTcBlockQ * D;  // [2][64][D]
  T* sV = sK + 2 * kTcBlockK * D;
  // [2 branches (full, streaming)][8 warps]: the keys some row of the warp sees; then each row's
  // visible keys, streaming branch, and (kAlpha only: without alpha the D = 128 kernel then fits
  // the 99 KB of shared memory of sm_86/sm_89) full branch
  RowRanges* sWarps = reinterpret_cast<RowRanges*>(sV + 2 * kTcBlockK * D);
  RowRanges* sRowsStream = sWarps + 2 * (kTcThreads / 32);
  RowRanges* sRowsFull = sRowsStream + kTcBlockQ;

  const ItemStart it(p, items[blockIdx.x], kTcBlockQ);
  const int64_t b = it.b, h = it.h, Sq = p.seqlen_q, Sk = p.seqlen_k, q0 = it.q0, shift = it.shift, kvh = it.kvh;
  const int nq = it.nq;
  const HeadScalars<float>& hs = it.hs;
  // without alpha, what plan_branches gives is known at compile time
  const BranchPlan plan = kAlpha ? it.plan : BranchPlan{false, true};
  const HeadVisibility &stream_vis = it.stream_vis, &full_vis = it.full_vis;
  const VisibleKeys& walk = it.walk;
  const int n_blocks = static_cast<int>(walk_blocks(walk, kTcBlockK));

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;

  // each row's visible keys, per branch (0: full, 1: streaming), once per item
  if (tid < kTcBlockQ) {
    const int64_t pos = q0 + tid + shift;
    if (kAlpha) sRowsFull[tid] = row_ranges(full_vis, pos, Sk);
    sRowsStream[tid] = row_ranges(stream_vis, pos, Sk);
  }
  if (tid < 2 * (kTcThreads / 32)) {
    const int w = tid % (kTcThreads / 32), branch = tid / (kTcThreads / 32);
    const int row0 = min(w * 16, nq - 1), row1 = min(w * 16 + 15, nq - 1);
    const HeadVisibility vis = branch == 0 ? full_vis : stream_vis;  // a copy: a reference would put both in local memory
    sWarps[tid] = to_ranges(vis.keys_for_positions(q0 + row0 + shift, q0 + row1 + shift, Sk), Sk);
  }

  const T* q_base = p.q.row<T>(b, 0, h);
  const T* k_base = p.k.row<T>(b, 0, kvh);
  const T* v_base = p.v.row<T>(b, 0, kvh);
  const uint32_t sQ_u = smem_u32(sQ), sK_u = smem_u32(sK), sV_u = smem_u32(sV);
  constexpr uint32_t kKVBytes = kTcBlockK * D * sizeof(T);

  load_tile<T, D, kTcBlockQ>(sQ_u, q_base, p.q.stride_s, q0, Sq);
  cp_async_commit();
  if (n_blocks > 0) {
    const KeyRange blk = walk_block(walk, 0, kTcBlockK);
    load_tile<T, D, kTcBlockK>(sK_u, k_base, p.k.stride_s, blk.lo, blk.hi);
    load_tile<T, D, kTcBlockK>(sV_u, v_base, p.v.stride_s, blk.lo, blk.hi);
  }
  cp_async_commit();

  TcBranch<D> full, stream;  // without kAlpha `full` is never used (and takes no registers)
  if (kAlpha) full.init(hs, t == 0);
  stream.init(hs, t == 0);

  const int warp_row0 = warp * 16;
  const bool warp_active = warp_row0 < nq;
  const int64_t pos_first = q0 + warp_row0 + shift;
  const int64_t pos_last = q0 + min(warp_row0 + 15, nq - 1) + shift;
  const float scale2 = hs.softmax_scale * kLog2e;
  const float* bias = p.key_bias.present() ? p.key_bias.row<float>(b, h) : nullptr;
  const int64_t bias_stride = p.key_bias.stride_n;

  for (int blk_i = 0; blk_i < n_blocks; ++blk_i) {
    const int buf = blk_i & 1;
    if (blk_i + 1 < n_blocks) {
      const KeyRange nxt = walk_block(walk, blk_i + 1, kTcBlockK);
      load_tile<T, D, kTcBlockK>(sK_u + (buf ^ 1) * kKVBytes, k_base, p.k.stride_s, nxt.lo, nxt.hi);
      load_tile<T, D, kTcBlockK>(sV_u + (buf ^ 1) * kKVBytes, v_base, p.v.stride_s, nxt.lo, nxt.hi);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const KeyRange blk = walk_block(walk, blk_i, kTcBlockK);
    const int j0 = static_cast<int>(blk.lo), nvalid = static_cast<int>(blk.hi - blk.lo);
    // a warp skips a block none of its rows sees (the tile's walk is the union over 8 warps):
    // exact, since such a block changes neither the running max nor the sums
    const bool do_full = kAlpha && plan.full && touches(sWarps[warp], j0, j0 + nvalid);
    const bool do_stream = plan.streaming && touches(sWarps[kTcThreads / 32 + warp], j0, j0 + nvalid);
    if (warp_active && (do_full || do_stream)) {
      // S = Q K^T for the warp's 16 rows and the block's 64 keys
      float x[kTcBlockK / 8][4];
#pragma unroll
      for (int nt = 0; nt < kTcBlockK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[nt][e] = 0.f;
      const uint32_t sKb = sK_u + buf * kKVBytes;
      // unrolled by 2, not fully: a full unroll lets ptxas hoist every K fragment load, which
      // spilled 220 bytes per thread in the alpha variant (44 bytes this way, 0 without alpha)
#pragma unroll 2
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, sQ_u + swizzled<D>(warp_row0 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < kTcBlockK / 16; ++np) {
          uint32_t kb[4];
          const int key = np * 16 + (lane & 7) + ((lane >> 4) & 1) * 8;
          ldmatrix_x4(kb, sKb + swizzled<D>(key, ks * 2 + ((lane >> 3) & 1)));
          mma_16816<T>(x[2 * np], a, kb[0], kb[1]);
          mma_16816<T>(x[2 * np + 1], a, kb[2], kb[3]);
        }
      }
      // logits in log2 units: (q.k * scale + key_bias) * log2 e
#pragma unroll
      for (int nt = 0; nt < kTcBlockK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = x[nt][e] * scale2;
          const int col = nt * 8 + 2 * t + (e & 1);
          if (bias != nullptr && col < nvalid) v = fmaf(bias[(int64_t(j0) + col) * bias_stride], kLog2e, v);
          x[nt][e] = v;
        }
      const uint32_t sVb = sV_u + buf * kKVBytes;
      const int r0 = warp_row0 + g;
      // one branch after the other (P V right after its softmax): only one P is live at a time,
      // the logits x stay live for the second branch
      uint32_t pa[kTcBlockK / 16][4];
      if (do_full) {
        uint32_t mask = 0xffffffffu;
        if (!(nvalid == kTcBlockK && full_vis.block_fully_visible(pos_first, pos_last, j0, j0 + kTcBlockK))) {
          const RowRanges rr[2] = {sRowsFull[r0], sRowsFull[r0 + 8]};
          mask = tc_mask(rr, j0, nvalid, t);
        }
        tc_softmax<T, D>(full, x, mask, pa);
        tc_pv<T, D>(full, pa, sVb, lane);
      }
      if (do_stream) {
        uint32_t mask = 0xffffffffu;
        if (!(nvalid == kTcBlockK && stream_vis.block_fully_visible(pos_first, pos_last, j0, j0 + kTcBlockK))) {
          const RowRanges rr[2] = {sRowsStream[r0], sRowsStream[r0 + 8]};
          mask = tc_mask(rr, j0, nvalid, t);
        }
        tc_softmax<T, D>(stream, x, mask, pa);
        tc_pv<T, D>(stream, pa, sVb, lane);
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
  }

  cp_async_wait<0>();  // an item with no key block still has its Q copy in flight
  if (!warp_active) return;
  // finish: row sums over the quad, alpha mix, epilogue, stores
  float inv_f[2], inv_s[2], lse_f[2], lse_s[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    OnlineSoftmax<float> f = kAlpha ? full.row[i] : OnlineSoftmax<float>{0.f, 0.f}, s = stream.row[i];
    f.sum += __shfl_xor_sync(0xffffffffu, f.sum, 1);
    f.sum += __shfl_xor_sync(0xffffffffu, f.sum, 2);
    s.sum += __shfl_xor_sync(0xffffffffu, s.sum, 1);
    s.sum += __shfl_xor_sync(0xffffffffu, s.sum, 2);
    inv_f[i] = f.inverse_sum();
    inv_s[i] = s.inverse_sum();
    lse_f[i] = f.lse(Log2{}) * kLn2;  // -inf stays -inf
    lse_s[i] = s.lse(Log2{}) * kLn2;
  }
  const float* os = p.out_scale.present() ? p.out_scale.row<float>(b, h) : nullptr;
  const float* ob = p.out_bias.present() ? p.out_bias.row<float>(b, h) : nullptr;
  float* lse = static_cast<float*>(p.lse) + (b * p.heads_q + h) * Sq;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_row0 + g + 8 * i;
    if (r >= nq) continue;
    const int64_t qi = q0 + r;
    if (t == 0) {
      lse[qi] = plan.streaming ? lse_s[i] : lse_f[i];
      // what the backward reads; a branch not computed saves o = 0 and lse = -inf
      if (p.lse_full != nullptr) static_cast<float*>(p.lse_full)[(b * p.heads_q + h) * Sq + qi] = plan.full ? lse_f[i] : kNegInf;
    }
    T* out = const_cast<T*>(p.out.row<T>(b, qi, h));
    const int64_t saved_row = ((b * p.heads_q + h) * Sq + qi) * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int d = n * 8 + 2 * t;
      float res[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float of = kAlpha ? full.o[n][2 * i + e] * inv_f[i] : 0.f;
        const float ost = stream.o[n][2 * i + e] * inv_s[i];
        float o = plan.full && plan.streaming ? mix_alpha(hs.alpha, of, ost) : (plan.full ? of : ost);
        const float sc = os ? os[(d + e) * p.out_scale.stride_n] : 1.f;
        const float bi = ob ? ob[(d + e) * p.out_bias.stride_n] : 0.f;
        res[e] = epilogue(o, sc, bi, hs.gate);
      }
      *reinterpret_cast<uint32_t*>(out + d) = TypeOps<T>::pack2(res[0], res[1]);
      if (p.o_stream != nullptr)
        *reinterpret_cast<float2*>(static_cast<float*>(p.o_stream) + saved_row + d) =
            plan.streaming ? make_float2(stream.o[n][2 * i] * inv_s[i], stream.o[n][2 * i + 1] * inv_s[i])
                           : make_float2(0.f, 0.f);
      if (kAlpha && p.o_full != nullptr)
        *reinterpret_cast<float2*>(static_cast<float*>(p.o_full) + saved_row + d) =
            plan.full ? make_float2(full.o[n][2 * i] * inv_f[i], full.o[n][2 * i + 1] * inv_f[i])
                      : make_float2(0.f, 0.f);
    }
  }
#endif
}

// ------------------------------------------------------------------------------------------
// Generic kernel: float accumulation, plain FMA, any D <= 512 (a lane's columns d = lane + 32 k,
// k < kDimsPerLane: 8 up to D = 256, 16 up to 512).

constexpr int kGenRowsPerWarp = kGenericBlockQ / (kGenericThreads / 32);  // 4
constexpr int kGenDimsPerLane = 8;                                          // D <= 256
constexpr int kGenWideDimsPerLane = kGenericMaxHeadDim / 32;                // 16: D <= 512

template <int kDimsPerLane>
struct GenBranch {
  float o[kGenRowsPerWarp][kDimsPerLane];
  OnlineSoftmax<float> row[kGenRowsPerWarp];  // natural units: the max same on every lane, this lane's part of the sum
};

template <typename T, int kDimsPerLane>
__global__ void __launch_bounds__(kGenericThreads)
    generic_forward_kernel(const AttentionParams p, const WorkItem* __restrict__ items) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int D = static_cast<int>(p.head_dim);
  const int ldk = D + 1;  // K rows padded: lane = key reads K[lane][d] across 32 banks
  float* sQ = reinterpret_cast<float*>(smem_raw);     // [16][D]
  float* sK = sQ + kGenericBlockQ * D;                // [32][D + 1]
  float* sV = sK + kGenericBlockK * ldk;              // [32][D]
  RowRanges* sRows = reinterpret_cast<RowRanges*>(sV + kGenericBlockK * D);  // [2][16]

  const ItemStart it(p, items[blockIdx.x], kGenericBlockQ);
  const int64_t b = it.b, h = it.h, Sq = p.seqlen_q, Sk = p.seqlen_k, q0 = it.q0, shift = it.shift, kvh = it.kvh;
  const int nq = it.nq;
  const HeadScalars<float>& hs = it.hs;
  const BranchPlan& plan = it.plan;
  const HeadVisibility &stream_vis = it.stream_vis, &full_vis = it.full_vis;
  const VisibleKeys& walk = it.walk;
  const VisibleKeys stream_tile = stream_vis.keys_for_positions(q0 + shift, q0 + nq - 1 + shift, Sk);
  const int n_blocks = static_cast<int>(walk_blocks(walk, kGenericBlockK));

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid < kGenericBlockQ) {
    const int64_t pos = q0 + tid + shift;
    sRows[tid] = row_ranges(full_vis, pos, Sk);
    sRows[kGenericBlockQ + tid] = row_ranges(stream_vis, pos, Sk);
  }
  for (int idx = tid; idx < kGenericBlockQ * D; idx += kGenericThreads) {
    const int r = idx / D, d = idx % D;
    sQ[idx] = r < nq ? TypeOps<T>::to_float(p.q.row<T>(b, q0 + r, h)[d]) : 0.f;
  }

  GenBranch<kDimsPerLane> full, stream;
#pragma unroll
  for (int ri = 0; ri < kGenRowsPerWarp; ++ri) {
    full.row[ri] = stream.row[ri] = OnlineSoftmax<float>::start(hs.has_sink_logit, hs.sink_logit, lane == 0);
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) full.o[ri][k] = stream.o[ri][k] = 0.f;
  }
  const int row0 = warp * kGenRowsPerWarp;
  const float* bias = p.key_bias.present() ? p.key_bias.row<float>(b, h) : nullptr;

  auto update = [&](GenBranch<kDimsPerLane>& br, int branch, const float (&x)[kGenRowsPerWarp], int j0, int nvalid) {
    float pr[kGenRowsPerWarp];
#pragma unroll
    for (int ri = 0; ri < kGenRowsPerWarp; ++ri) {
      const int r = row0 + ri;
      const bool vis = lane < nvalid && r < nq && in_ranges(sRows[branch * kGenericBlockQ + r], j0 + lane);
      float mx = vis ? x[ri] : kNegInf;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float corr = br.row[ri].rescale(mx, FastExp{});
      pr[ri] = vis ? __expf(x[ri] - br.row[ri].reference()) : 0.f;
      br.row[ri].add(pr[ri], corr);
#pragma unroll
      for (int k = 0; k < kDimsPerLane; ++k) br.o[ri][k] *= corr;
    }
    for (int c = 0; c < nvalid; ++c) {
      float pc[kGenRowsPerWarp];
#pragma unroll
      for (int ri = 0; ri < kGenRowsPerWarp; ++ri) pc[ri] = __shfl_sync(0xffffffffu, pr[ri], c);
      const float* vrow = sV + c * D;
#pragma unroll
      for (int k = 0; k < kDimsPerLane; ++k) {
        const int d = lane + 32 * k;
        if (d < D) {
          const float v = vrow[d];
#pragma unroll
          for (int ri = 0; ri < kGenRowsPerWarp; ++ri) br.o[ri][k] = fmaf(pc[ri], v, br.o[ri][k]);
        }
      }
    }
  };

  for (int blk_i = 0; blk_i < n_blocks; ++blk_i) {
    const KeyRange blk = walk_block(walk, blk_i, kGenericBlockK);
    const int j0 = static_cast<int>(blk.lo), nvalid = static_cast<int>(blk.hi - blk.lo);
    __syncthreads();  // the previous block's K/V are no longer read (and sQ/sRows are written)
    for (int idx = tid; idx < kGenericBlockK * D; idx += kGenericThreads) {
      const int r = idx / D, d = idx % D;
      float kv = 0.f, vv = 0.f;
      if (r < nvalid) {
        kv = TypeOps<T>::to_float(p.k.row<T>(b, j0 + r, kvh)[d]);
        vv = TypeOps<T>::to_float(p.v.row<T>(b, j0 + r, kvh)[d]);
      }
      sK[r * ldk + d] = kv;
      sV[r * D + d] = vv;
    }
    __syncthreads();
    const bool do_full = plan.full;
    const bool do_stream = plan.streaming && (!plan.full || meets(stream_tile, blk));
    if (row0 >= nq) continue;
    // logits of the warp's rows for key j0 + lane (natural units)
    float x[kGenRowsPerWarp];
#pragma unroll
    for (int ri = 0; ri < kGenRowsPerWarp; ++ri) x[ri] = 0.f;
    const float* krow = sK + lane * ldk;
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int ri = 0; ri < kGenRowsPerWarp; ++ri) x[ri] = fmaf(sQ[(row0 + ri) * D + d], kd, x[ri]);
    }
    const float bj = (bias != nullptr && lane < nvalid) ? bias[(int64_t(j0) + lane) * p.key_bias.stride_n] : 0.f;
#pragma unroll
    for (int ri = 0; ri < kGenRowsPerWarp; ++ri) x[ri] = fmaf(x[ri], hs.softmax_scale, bj);
    if (do_full) update(full, 0, x, j0, nvalid);
    if (do_stream) update(stream, 1, x, j0, nvalid);
  }
  if (row0 >= nq) return;

  const float* os = p.out_scale.present() ? p.out_scale.row<float>(b, h) : nullptr;
  const float* ob = p.out_bias.present() ? p.out_bias.row<float>(b, h) : nullptr;
#pragma unroll
  for (int ri = 0; ri < kGenRowsPerWarp; ++ri) {
    const int r = row0 + ri;
    if (r >= nq) break;
    OnlineSoftmax<float> f = full.row[ri], s = stream.row[ri];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      f.sum += __shfl_xor_sync(0xffffffffu, f.sum, off);
      s.sum += __shfl_xor_sync(0xffffffffu, s.sum, off);
    }
    const float inv_f = f.inverse_sum(), inv_s = s.inverse_sum();
    const float lse_f = f.lse(FastLog{}), lse_s = s.lse(FastLog{});
    const int64_t qi = q0 + r;
    const int64_t head_row = (b * p.heads_q + h) * Sq + qi;
    if (lane == 0) {
      static_cast<float*>(p.lse)[head_row] = plan.streaming ? lse_s : lse_f;
      if (p.lse_full != nullptr) static_cast<float*>(p.lse_full)[head_row] = plan.full ? lse_f : kNegInf;
    }
    T* out = const_cast<T*>(p.out.row<T>(b, qi, h));
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) {
      const int d = lane + 32 * k;
      if (d >= D) break;
      const float of = full.o[ri][k] * inv_f, ost = stream.o[ri][k] * inv_s;
      const float o = plan.full && plan.streaming ? mix_alpha(hs.alpha, of, ost) : (plan.full ? of : ost);
      const float sc = os ? os[d * p.out_scale.stride_n] : 1.f;
      const float bi = ob ? ob[d * p.out_bias.stride_n] : 0.f;
      out[d] = TypeOps<T>::from_float(epilogue(o, sc, bi, hs.gate));
      if (p.o_stream != nullptr) static_cast<float*>(p.o_stream)[head_row * D + d] = plan.streaming ? ost : 0.f;
      if (p.o_full != nullptr) static_cast<float*>(p.o_full)[head_row * D + d] = plan.full ? of : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Heads gated off exactly: out = 0, lse = -inf; the saved branches, when kept, 0 and -inf (as on the CPU).

template <typename T>
__global__ void skipped_heads_kernel(const AttentionParams p, const int32_t* __restrict__ heads) {
  const int64_t b = heads[2 * blockIdx.x], h = heads[2 * blockIdx.x + 1];
  const int64_t D = p.head_dim, Sq = p.seqlen_q;
  float* lse = static_cast<float*>(p.lse) + (b * p.heads_q + h) * Sq;
  const int64_t head_row = (b * p.heads_q + h) * Sq;
  for (int64_t idx = threadIdx.x; idx < Sq * D; idx += blockDim.x) {
    const int64_t i = idx / D, d = idx % D;
    const_cast<T*>(p.out.row<T>(b, i, h))[d] = TypeOps<T>::from_float(0.f);
    if (d == 0) lse[i] = kNegInf;
    // the saved branches, when kept, as for a branch not computed
    if (p.o_stream != nullptr) static_cast<float*>(p.o_stream)[(head_row + i) * D + d] = 0.f;
    if (p.o_full != nullptr) static_cast<float*>(p.o_full)[(head_row + i) * D + d] = 0.f;
    if (p.lse_full != nullptr && d == 0) static_cast<float*>(p.lse_full)[head_row + i] = kNegInf;
  }
}

template <typename T, int D, bool kAlpha>
cudaError_t launch_tc_variant(const AttentionParams& p, const WorkItem* items, int64_t n_items, cudaStream_t stream) {
  const int smem = static_cast<int>(tensor_core_smem_bytes(D, kAlpha));
  // once per (kernel, device): smem_opt_in.h
  const cudaError_t attr = opt_in_dynamic_smem(reinterpret_cast<const void*>(tc_forward_kernel<T, D, kAlpha>), smem);
  if (attr != cudaSuccess) return attr;
  tc_forward_kernel<T, D, kAlpha><<<static_cast<unsigned>(n_items), kTcThreads, smem, stream>>>(p, items);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_tc(const AttentionParams& p, const WorkItem* items, int64_t n_items, cudaStream_t stream) {
  return p.alpha.present() ? launch_tc_variant<T, D, true>(p, items, n_items, stream)
                           : launch_tc_variant<T, D, false>(p, items, n_items, stream);
}

// The narrow variant opts in once to what its widest head dim needs (80 KiB: within every sm_80+ GPU's
// limit); the wide one to what each launch needs (up to 161 KiB at D = 512, past what some GPUs
// allow, so that dims just past 256 still run there).
template <typename T, int kDimsPerLane>
cudaError_t launch_generic_variant(const AttentionParams& p, const WorkItem* items, int64_t n_items,
                                   cudaStream_t stream) {
  const int smem = static_cast<int>(generic_smem_bytes(p.head_dim));
  const int opt_in = kDimsPerLane == kGenDimsPerLane ? static_cast<int>(generic_smem_bytes(32 * kDimsPerLane)) : smem;
  const cudaError_t attr =
      opt_in_dynamic_smem(reinterpret_cast<const void*>(generic_forward_kernel<T, kDimsPerLane>), opt_in);
  if (attr != cudaSuccess) return attr;
  generic_forward_kernel<T, kDimsPerLane><<<static_cast<unsigned>(n_items), kGenericThreads, smem, stream>>>(p, items);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_generic(const AttentionParams& p, const WorkItem* items, int64_t n_items, cudaStream_t stream) {
  return p.head_dim <= 32 * kGenDimsPerLane ? launch_generic_variant<T, kGenDimsPerLane>(p, items, n_items, stream)
                                            : launch_generic_variant<T, kGenWideDimsPerLane>(p, items, n_items, stream);
}

// A chunk of words in the kernel's parameters (4 KiB, the classic parameter limit).
constexpr int kUploadChunkWords = 1000;
struct UploadChunk {
  int32_t words[kUploadChunkWords];
};

__global__ void upload_words_kernel(int32_t* dst, const UploadChunk chunk, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = chunk.words[i];
}

template <typename T>
cudaError_t launch_skipped(const AttentionParams& p, const int32_t* heads, int64_t n_heads, cudaStream_t stream) {
  skipped_heads_kernel<T><<<static_cast<unsigned>(n_heads), 256, 0, stream>>>(p, heads);
  return cudaGetLastError();
}

}  // namespace

bool tensor_core_supported(DType dtype, int64_t head_dim) {
  return (dtype == DType::kBFloat16 || dtype == DType::kFloat16) && (head_dim == 64 || head_dim == 128);
}

bool tensor_core_choice(DType dtype, int64_t head_dim, bool alpha, bool rows_aligned, int major, int64_t smem_optin,
                        bool force_generic) {
  if (force_generic || !tensor_core_supported(dtype, head_dim) || !rows_aligned) return false;
  if (major < 8) return false;  // cp.async and bf16 mma.sync: sm_80 and newer (the kernel traps below)
  return tensor_core_smem_bytes(head_dim, alpha) <= smem_optin;
}

cudaError_t launch_upload_words(int32_t* dst, const int32_t* src, int64_t n, cudaStream_t stream) {
  UploadChunk chunk;
  for (int64_t first = 0; first < n; first += kUploadChunkWords) {
    const int count = static_cast<int>(n - first < kUploadChunkWords ? n - first : kUploadChunkWords);
    for (int i = 0; i < count; ++i) chunk.words[i] = src[first + i];
    upload_words_kernel<<<1, 256, 0, stream>>>(dst + first, chunk, count);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int64_t tensor_core_smem_bytes(int64_t head_dim, bool alpha) {
  // Q tile, two K and two V blocks (2-byte elements), each warp's key ranges for both branches,
  // each row's for the streaming branch and, with alpha, for the full branch
  return (kTcBlockQ + 4 * kTcBlockK) * head_dim * 2 +
         (2 * kTcThreads / 32 + (alpha ? 2 : 1) * kTcBlockQ) * int64_t(sizeof(RowRanges));
}

int64_t generic_smem_bytes(int64_t head_dim) {
  return (kGenericBlockQ * head_dim + kGenericBlockK * (head_dim + 1) + kGenericBlockK * head_dim) * 4 +
         2 * kGenericBlockQ * int64_t(sizeof(RowRanges));
}

cudaError_t launch_tensor_core_forward(const AttentionParams& p, DType dtype, const WorkItem* items, int64_t n_items,
                                       cudaStream_t stream) {
  if (n_items == 0) return cudaSuccess;
  if (dtype == DType::kBFloat16) {
    if (p.head_dim == 64) return launch_tc<__nv_bfloat16, 64>(p, items, n_items, stream);
    if (p.head_dim == 128) return launch_tc<__nv_bfloat16, 128>(p, items, n_items, stream);
  } else if (dtype == DType::kFloat16) {
    if (p.head_dim == 64) return launch_tc<__half, 64>(p, items, n_items, stream);
    if (p.head_dim == 128) return launch_tc<__half, 128>(p, items, n_items, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_generic_forward(const AttentionParams& p, DType dtype, const WorkItem* items, int64_t n_items,
                                   cudaStream_t stream) {
  if (n_items == 0) return cudaSuccess;
  if (p.head_dim > kGenericMaxHeadDim) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_generic<float>(p, items, n_items, stream);
    case DType::kBFloat16: return launch_generic<__nv_bfloat16>(p, items, n_items, stream);
    case DType::kFloat16: return launch_generic<__half>(p, items, n_items, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_skipped_heads(const AttentionParams& p, DType dtype, const int32_t* heads, int64_t n_heads,
                                 cudaStream_t stream) {
  if (n_heads == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_skipped<float>(p, heads, n_heads, stream);
    case DType::kBFloat16: return launch_skipped<__nv_bfloat16>(p, heads, n_heads, stream);
    case DType::kFloat16: return launch_skipped<__half>(p, heads, n_heads, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace headops
