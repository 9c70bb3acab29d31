"""A NumPy transcription of the CUDA tensor-core forward kernel (csrc/attention/cuda/forward_kernel.cu),
lane by lane: cp.async tile copies into XOR-swizzled shared memory, ldmatrix (plain and .trans)
as the PTX ISA defines the fragments, mma m16n8k16, the mask bits, the warp skip, the online
softmax in exp2 and the epilogue. It checks the kernel's index arithmetic on a machine without a
GPU; it is NOT the kernel (a transcription can differ from the .cu), and the real check is
tests/test_attention_cuda.py on a GPU.

    python tests/emulate_cuda_tc.py        # a few hundred random cases against headops.reference

Not collected by pytest (no test_ prefix): slow, and a development aid only.
"""

import math
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/python")
from headops import reference  # noqa: E402

BQ, BK, WARPS = 128, 64, 8
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
NEG_INF = -math.inf


# ---------------------------------------------------------------- head_semantics.h, transcribed
def keys_for_positions(causal, window, sinks, pf, pl, Sk):
    causal_end = min(pl + 1, Sk) if causal else Sk
    widest = Sk + max(abs(pf), abs(pl))
    w = -1 if window > widest else window
    if w < 0:
        win = [0, causal_end]
    else:
        win = [max(0, pf - w + 1), causal_end if causal else min(Sk, pl + w)]
    snk = [0, min(sinks, causal_end)]
    if win[1] <= win[0]:
        win = [0, 0]
    if snk[1] <= snk[0]:
        return [0, 0], win
    if win[1] <= win[0] or snk[1] >= win[0]:
        hi = snk[1] if win[1] <= win[0] else max(snk[1], win[1])
        return [0, 0], [0, hi]
    return snk, win


def block_fully_visible(causal, window, sinks, pf, pl, j0, j1):
    if j1 <= j0:
        return True
    if causal and j1 - 1 > pf:
        return False
    if j1 <= sinks:
        return True
    if window < 0:
        return True
    if pl - j0 >= window:
        return False
    if not causal and (j1 - 1) - pf >= window:
        return False
    return True


def clamp(r, Sk):
    return [min(max(r[0], 0), Sk), min(max(r[1], 0), Sk)]


def in_ranges(rr, j):
    return (rr[0][0] <= j < rr[0][1]) or (rr[1][0] <= j < rr[1][1])


def touches(rr, lo, hi):
    return max(rr[0][0], lo) < min(rr[0][1], hi) or max(rr[1][0], lo) < min(rr[1][1], hi)


# ---------------------------------------------------------------- PTX, as the ISA defines it
def swizzled(D, row, chunk):  # bytes
    return (row * (D // 8) + (chunk ^ (row & 7))) * 16


def load_tile(smem, base, D, rows, G, first, end):
    for idx in range(rows * (D // 8)):
        r, c = divmod(idx, D // 8)
        g = first + r
        off = (base + swizzled(D, r, c)) // 2
        smem[off:off + 8] = G[g, c * 8:(c + 1) * 8] if g < end else 0.0


def ldmatrix_x4(smem, addrs, trans=False):
    """addrs[lane]: byte address of row (lane % 8) of matrix (lane // 8). Returns regs[lane][i] as
    a pair (lo, hi) of floats."""
    mats = []
    for i in range(4):
        m = np.stack([smem[addrs[8 * i + r] // 2: addrs[8 * i + r] // 2 + 8] for r in range(8)])
        mats.append(m)
    regs = []
    for T in range(32):
        row = []
        for i in range(4):
            m = mats[i]
            if not trans:
                row.append((m[T // 4, 2 * (T % 4)], m[T // 4, 2 * (T % 4) + 1]))
            else:
                row.append((m[2 * (T % 4), T // 4], m[2 * (T % 4) + 1, T // 4]))
        regs.append(row)
    return regs


def mma(c, a, b0, b1):
    """c[lane][4] += A (a[lane][4] pairs) @ B (b0/b1[lane] pairs), m16n8k16."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for T in range(32):
        g, t = T // 4, T % 4
        A[g, 2 * t:2 * t + 2] = a[T][0]
        A[g + 8, 2 * t:2 * t + 2] = a[T][1]
        A[g, 2 * t + 8:2 * t + 10] = a[T][2]
        A[g + 8, 2 * t + 8:2 * t + 10] = a[T][3]
        B[2 * t:2 * t + 2, g] = b0[T]
        B[2 * t + 8:2 * t + 10, g] = b1[T]
        C[g, 2 * t:2 * t + 2] = c[T][0:2]
        C[g + 8, 2 * t:2 * t + 2] = c[T][2:4]
    Dm = A @ B + C
    for T in range(32):
        g, t = T // 4, T % 4
        c[T][0:2] = Dm[g, 2 * t:2 * t + 2]
        c[T][2:4] = Dm[g + 8, 2 * t:2 * t + 2]


# ---------------------------------------------------------------- the kernel, one item
def run_item(Q, K, V, D, Sq, Sk, q_tile, causal, hs, bias, out_scale, out_bias, out, lse):
    """Q [Sq, D], K/V [Sk, D] (one head), hs: dict of the head's scalars; writes out/lse rows."""
    q0 = q_tile * BQ
    nq = min(BQ, Sq - q0)
    shift = Sk - Sq
    alpha = hs["alpha"]
    plan_full = alpha is not None and alpha != 0.0
    plan_stream = alpha is None or alpha != 1.0
    win, snk = hs["window"], hs["sinks"]
    walk_vis = (causal, -1, 0) if plan_full else (causal, win, snk)
    walk = keys_for_positions(*walk_vis, q0 + shift, q0 + nq - 1 + shift, Sk)
    blocks_in = lambda r: (max(0, r[1] - r[0]) + BK - 1) // BK  # noqa: E731
    n0, n_blocks = blocks_in(walk[0]), blocks_in(walk[0]) + blocks_in(walk[1])

    def walk_block(t):
        r = walk[0] if t < n0 else walk[1]
        lo = r[0] + (t if t < n0 else t - n0) * BK
        return lo, min(lo + BK, r[1])

    smem = np.zeros((BQ + 4 * BK) * D)  # elements: Q, K[2], V[2]
    sQ, sK, sV = 0, BQ * D * 2, (BQ + 2 * BK) * D * 2
    kv_bytes = BK * D * 2
    rows_full = [[clamp(x, Sk) for x in keys_for_positions(causal, -1, 0, q0 + r + shift, q0 + r + shift, Sk)]
                 for r in range(BQ)]
    rows_stream = [[clamp(x, Sk) for x in keys_for_positions(causal, win, snk, q0 + r + shift, q0 + r + shift, Sk)]
                   for r in range(BQ)]
    warps = {}
    for w in range(WARPS):
        r0, r1 = min(w * 16, nq - 1), min(w * 16 + 15, nq - 1)
        warps[(0, w)] = [clamp(x, Sk) for x in keys_for_positions(causal, -1, 0, q0 + r0 + shift, q0 + r1 + shift, Sk)]
        warps[(1, w)] = [clamp(x, Sk) for x in keys_for_positions(causal, win, snk, q0 + r0 + shift, q0 + r1 + shift, Sk)]
    load_tile(smem, sQ, D, BQ, Q, q0, Sq)
    if n_blocks:
        lo, hi = walk_block(0)
        load_tile(smem, sK, D, BK, K, lo, hi)
        load_tile(smem, sV, D, BK, V, lo, hi)
    m0 = hs["sink_logit"] * LOG2E if hs["sink_logit"] is not None else NEG_INF
    st = {}
    for w in range(WARPS):
        for br in ("full", "stream"):
            st[(w, br)] = dict(o=np.zeros((32, D // 8, 4)), m=np.full((32, 2), m0),
                               l=np.array([[1.0 if (m0 != NEG_INF and T % 4 == 0) else 0.0] * 2 for T in range(32)]))
    scale2 = hs["scale"] * LOG2E
    for bi in range(n_blocks):
        buf = bi & 1
        if bi + 1 < n_blocks:
            lo, hi = walk_block(bi + 1)
            load_tile(smem, sK + (buf ^ 1) * kv_bytes, D, BK, K, lo, hi)
            load_tile(smem, sV + (buf ^ 1) * kv_bytes, D, BK, V, lo, hi)
        j0, jh = walk_block(bi)
        nvalid = jh - j0
        for w in range(WARPS):
            row0 = w * 16
            if row0 >= nq:
                continue
            pf, pl = q0 + row0 + shift, q0 + min(row0 + 15, nq - 1) + shift
            do_full = plan_full and touches(warps[(0, w)], j0, j0 + nvalid)
            do_stream = plan_stream and touches(warps[(1, w)], j0, j0 + nvalid)
            if not (do_full or do_stream):
                continue
            x = np.zeros((32, 8, 4))
            for ks in range(D // 16):
                a = ldmatrix_x4(smem, [sQ + swizzled(D, row0 + (l & 15), ks * 2 + (l >> 4)) for l in range(32)])
                for np_ in range(BK // 16):
                    kb = ldmatrix_x4(smem, [sK + buf * kv_bytes + swizzled(D, np_ * 16 + (l & 7) + ((l >> 4) & 1) * 8,
                                                                          ks * 2 + ((l >> 3) & 1)) for l in range(32)])
                    c0 = [x[T, 2 * np_] for T in range(32)]
                    c1 = [x[T, 2 * np_ + 1] for T in range(32)]
                    mma(c0, a, [kb[T][0] for T in range(32)], [kb[T][1] for T in range(32)])
                    mma(c1, a, [kb[T][2] for T in range(32)], [kb[T][3] for T in range(32)])
            for T in range(32):
                t = T % 4
                for nt in range(8):
                    for e in range(4):
                        v = x[T, nt, e] * scale2
                        col = nt * 8 + 2 * t + (e & 1)
                        if bias is not None and col < nvalid:
                            v = bias[j0 + col] * LOG2E + v
                        x[T, nt, e] = v
            for br, active, vis, rows in (("full", do_full, (causal, -1, 0), rows_full),
                                          ("stream", do_stream, (causal, win, snk), rows_stream)):
                if not active:
                    continue
                s = st[(w, br)]
                whole = nvalid == BK and block_fully_visible(*vis, pf, pl, j0, j0 + BK)
                masks = []
                for T in range(32):
                    g, t = T // 4, T % 4
                    mask = 0xffffffff
                    if not whole:
                        rr = [rows[row0 + g], rows[row0 + g + 8]]
                        mask = 0
                        for nt in range(8):
                            for e in range(4):
                                col = nt * 8 + 2 * t + (e & 1)
                                if col < nvalid and in_ranges(rr[e >> 1], j0 + col):
                                    mask |= 1 << (nt * 4 + e)
                    masks.append(mask)
                mx = np.full((32, 2), NEG_INF)
                for T in range(32):
                    for nt in range(8):
                        for e in range(4):
                            if masks[T] >> (nt * 4 + e) & 1:
                                mx[T, e >> 1] = max(mx[T, e >> 1], x[T, nt, e])
                # the quad's max (shfl_xor 1, 2)
                quad_max = np.array([mx[T - T % 4:T - T % 4 + 4].max(axis=0) for T in range(32)])
                pa = [[[None] * 4 for _ in range(4)] for _ in range(32)]
                for T in range(32):
                    m_use, corr = [0, 0], [0, 0]
                    for i in range(2):
                        m_new = max(s["m"][T, i], quad_max[T, i])
                        m_use[i] = 0.0 if m_new == NEG_INF else m_new
                        corr[i] = 2.0 ** (s["m"][T, i] - m_use[i]) if s["m"][T, i] != NEG_INF else 0.0
                        s["m"][T, i] = m_new
                    sums = [0.0, 0.0]
                    for nt in range(8):
                        p = [2.0 ** (x[T, nt, e] - m_use[e >> 1]) if (masks[T] >> (nt * 4 + e) & 1) and
                             x[T, nt, e] != NEG_INF else 0.0 for e in range(4)]
                        for e in range(4):
                            sums[e >> 1] += p[e]
                        pa[T][nt // 2][(nt & 1) * 2 + 0] = (p[0], p[1])
                        pa[T][nt // 2][(nt & 1) * 2 + 1] = (p[2], p[3])
                    for i in range(2):
                        s["l"][T, i] = s["l"][T, i] * corr[i] + sums[i]
                    s["o"][T, :, 0:2] *= corr[0]
                    s["o"][T, :, 2:4] *= corr[1]
                for kk in range(BK // 16):
                    for dp in range(D // 16):
                        b = ldmatrix_x4(smem, [sV + buf * kv_bytes + swizzled(D, kk * 16 + (l & 7) + ((l >> 3) & 1) * 8,
                                                                             dp * 2 + (l >> 4)) for l in range(32)],
                                        trans=True)
                        a = [pa[T][kk] for T in range(32)]
                        c0 = [s["o"][T, 2 * dp] for T in range(32)]
                        c1 = [s["o"][T, 2 * dp + 1] for T in range(32)]
                        mma(c0, a, [b[T][0] for T in range(32)], [b[T][1] for T in range(32)])
                        mma(c1, a, [b[T][2] for T in range(32)], [b[T][3] for T in range(32)])
    # finish
    for w in range(WARPS):
        row0 = w * 16
        if row0 >= nq:
            continue
        for T in range(32):
            g, t = T // 4, T % 4
            q = T - t
            for i in range(2):
                r = row0 + g + 8 * i
                if r >= nq:
                    continue
                res = {}
                for br in ("full", "stream"):
                    s = st[(w, br)]
                    lsum = s["l"][q:q + 4, i].sum()
                    inv = 1.0 / lsum if lsum > 0 else 0.0
                    res[br] = (inv, (s["m"][T, i] + math.log2(lsum)) * LN2 if lsum > 0 else NEG_INF)
                lse[q0 + r] = res["stream"][1] if plan_stream else res["full"][1]
                for n in range(D // 8):
                    for e in range(2):
                        d = n * 8 + 2 * t + e
                        of = st[(w, "full")]["o"][T, n, 2 * i + e] * res["full"][0]
                        os_ = st[(w, "stream")]["o"][T, n, 2 * i + e] * res["stream"][0]
                        o = alpha * of + (1 - alpha) * os_ if (plan_full and plan_stream) else (of if plan_full else os_)
                        sc = out_scale[d] if out_scale is not None else 1.0
                        bi_ = out_bias[d] if out_bias is not None else 0.0
                        out[q0 + r, d] = hs["gate"] * (o * sc + bi_)


def emulate(q, k, v, causal, scale, window, sinks, alpha, bias, sink_logit, out_scale, out_bias, gate):
    """One (batch, head) pair: q [Sq, D], k/v [Sk, D] float64 arrays."""
    Sq, D = q.shape
    Sk = k.shape[0]
    out = np.zeros((Sq, D))
    lse = np.zeros(Sq)
    hs = dict(scale=scale, window=window, sinks=sinks, alpha=alpha, sink_logit=sink_logit, gate=gate)
    for tile in range((Sq + BQ - 1) // BQ):
        run_item(q, k, v, D, Sq, Sk, tile, causal, hs, bias, out_scale, out_bias, out, lse)
    return out, lse


def main(cases=40, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for case in range(cases):
        D = int(rng.choice([64, 128]))
        Sq = int(rng.integers(1, 300))
        Sk = int(rng.integers(1, 500))
        causal = bool(rng.integers(0, 2))
        window = int(rng.choice([-1, 1, 2, 5, 17, 64, 65, 100, 1000]))
        sinks = int(rng.choice([0, 0, 1, 3, 64, 70]))
        alpha = [None, None, 0.0, 1.0, 0.3, 0.8][int(rng.integers(0, 6))]
        use_bias = bool(rng.integers(0, 2))
        sink_logit = [None, 0.5, -30.0][int(rng.integers(0, 3))]
        q = torch.randn(Sq, D, dtype=torch.float64).to(torch.bfloat16).double()
        k = torch.randn(Sk, D, dtype=torch.float64).to(torch.bfloat16).double()
        v = torch.randn(Sk, D, dtype=torch.float64).to(torch.bfloat16).double()
        bias = torch.randn(Sk, dtype=torch.float64) if use_bias else None
        out_scale = torch.randn(D, dtype=torch.float64)
        out_bias = torch.randn(D, dtype=torch.float64)
        gate, scale = 0.7, 1 / math.sqrt(D)
        got, got_lse = emulate(q.numpy(), k.numpy(), v.numpy(), causal, scale, window, sinks, alpha,
                               None if bias is None else bias.numpy(), sink_logit, out_scale.numpy(),
                               out_bias.numpy(), gate)
        kw = dict(causal=causal, window=window, sinks=sinks, gate=gate, out_scale=out_scale.view(1, D),
                  out_bias=out_bias.view(1, D))
        if alpha is not None:
            kw["alpha"] = alpha
        if bias is not None:
            kw["key_bias"] = bias
        if sink_logit is not None:
            kw["sink_logit"] = sink_logit
        ref = reference.attention(q.view(1, Sq, 1, D), k.view(1, Sk, 1, D), v.view(1, Sk, 1, D),
                                  return_lse=alpha is None, **kw)
        if alpha is None:
            ref, ref_lse = ref
            finite = np.isfinite(ref_lse[0, 0].numpy())
            assert np.array_equal(finite, np.isfinite(got_lse)), f"case {case}: lse -inf rows differ"
            lerr = np.abs(ref_lse[0, 0].numpy()[finite] - got_lse[finite]).max(initial=0.0)
        else:
            lerr = 0.0
        err = np.abs(ref[0, :, 0].numpy() - got).max()
        worst = max(worst, err, lerr)
        flag = "" if max(err, lerr) < 1e-9 else "   <-- MISMATCH"
        print(f"case {case:3d}: D={D} Sq={Sq} Sk={Sk} causal={causal} window={window} sinks={sinks} "
              f"alpha={alpha} bias={use_bias} sink={sink_logit}: max|out err| {err:.2e} lse {lerr:.2e}{flag}",
              flush=True)
    print("worst", worst)
    return worst


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    sys.exit(0 if main(n) < 1e-9 else 1)
