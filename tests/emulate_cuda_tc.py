"""A NumPy transcription of the CUDA tensor-core forward kernel (csrc/attention/cuda/forward_kernel.cu),
lane by lane: cp.async tile copies into XOR-swizzled shared memory, ldmatrix (plain and .trans)
as the PTX ISA defines the fragments, mma m16n8k16, the mask bits, the warp skip, the online
softmax in exp2 and the epilogue. It checks the kernel's index arithmetic on a machine without a
GPU; it is NOT the kernel (a transcription can differ from the .cu), and the real check is
tests/test_attention_cuda.py on a GPU.

    python tests/emulate_cuda_tc.py [N]    # N random cases against headops.reference

tests/test_cuda_emulation.py runs a few small cases in the suite. The visibility and online-softmax
rules are the headers' own (head_semantics.h, online_softmax.h through headops._C.semantics); the
rest (tiles, fragments, masks, warp skips, the epilogue's order) is transcribed.
"""

import math
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/python")
from headops import _C, reference  # noqa: E402

BQ, BK, WARPS = 128, 64, 8
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
NEG_INF = -math.inf


# ------------------------------------ head_semantics.h and online_softmax.h, through headops._C.semantics
# the rules themselves (compiled from the headers the kernel includes), not a transcription
def keys_for_positions(causal, window, sinks, pf, pl, Sk):
    sink_keys, window_keys = _C.semantics.keys_for_positions(causal, window, sinks, pf, pl, Sk)
    return list(sink_keys), list(window_keys)


def block_fully_visible(causal, window, sinks, pf, pl, j0, j1):
    return _C.semantics.block_fully_visible(causal, window, sinks, pf, pl, j0, j1)


def nan_max(a, b):
    return b if (b > a or b != b) else a


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
    has_sink = hs["sink_logit"] is not None
    st = {}
    for w in range(WARPS):
        for br in ("full", "stream"):
            # TcBranch::init: OnlineSoftmax::start in log2 units; lane t == 0 of a quad counts the sink
            starts = [_C.semantics.softmax_start(has_sink, hs["sink_logit"] * LOG2E if has_sink else 0.0, T % 4 == 0)
                      for T in range(32)]
            st[(w, br)] = dict(o=np.zeros((32, D // 8, 4)), m=np.array([[m0] * 2 for m0, _ in starts]),
                               l=np.array([[l0] * 2 for _, l0 in starts]))
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
                                mx[T, e >> 1] = nan_max(mx[T, e >> 1], x[T, nt, e])
                # the quad's max (shfl_xor 1, 2; np.max keeps a NaN as nan_max does)
                quad_max = np.array([mx[T - T % 4:T - T % 4 + 4].max(axis=0) for T in range(32)])
                pa = [[[None] * 4 for _ in range(4)] for _ in range(32)]
                for T in range(32):
                    m_use, corr = [0, 0], [0, 0]
                    for i in range(2):
                        s["m"][T, i], m_use[i], corr[i] = _C.semantics.softmax_rescale(
                            s["m"][T, i], s["l"][T, i], quad_max[T, i], True)
                    sums = [0.0, 0.0]
                    for nt in range(8):
                        p = [2.0 ** (x[T, nt, e] - m_use[e >> 1]) if (masks[T] >> (nt * 4 + e) & 1) and
                             x[T, nt, e] != NEG_INF else 0.0 for e in range(4)]
                        for e in range(4):
                            sums[e >> 1] += p[e]
                        pa[T][nt // 2][(nt & 1) * 2 + 0] = (p[0], p[1])
                        pa[T][nt // 2][(nt & 1) * 2 + 1] = (p[2], p[3])
                    for i in range(2):
                        s["l"][T, i] = _C.semantics.softmax_add(s["m"][T, i], s["l"][T, i], sums[i], corr[i])
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
                    lsum = s["l"][q:q + 4, i].sum()  # the quad's parts (shfl_xor 1, 2)
                    inv, lse2 = _C.semantics.softmax_finish(s["m"][T, i], lsum, True)
                    res[br] = (inv, lse2 * LN2)
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


def random_case(case, max_q=300, max_k=500):
    """The inputs of case number `case` (deterministic), as headops.reference.attention kwargs."""
    rng = np.random.default_rng(case)
    gen = torch.Generator().manual_seed(case)
    D = int(rng.choice([64, 128]))
    Sq, Sk = int(rng.integers(1, max_q)), int(rng.integers(1, max_k))
    c = dict(D=D, Sq=Sq, Sk=Sk, causal=bool(rng.integers(0, 2)),
             window=int(rng.choice([-1, 1, 2, 5, 17, 64, 65, 100, 1000])), sinks=int(rng.choice([0, 0, 1, 3, 64, 70])),
             alpha=[None, None, 0.0, 1.0, 0.3, 0.8][int(rng.integers(0, 6))],
             sink_logit=[None, 0.5, -30.0][int(rng.integers(0, 3))], gate=0.7, scale=1 / math.sqrt(D))
    # bfloat16 values, as the tensor-core kernel reads them
    c["q"], c["k"], c["v"] = (torch.randn(n, D, dtype=torch.float64, generator=gen).to(torch.bfloat16).double()
                              for n in (Sq, Sk, Sk))
    c["key_bias"] = torch.randn(Sk, dtype=torch.float64, generator=gen) if rng.integers(0, 2) else None
    c["out_scale"], c["out_bias"] = (torch.randn(D, dtype=torch.float64, generator=gen) for _ in range(2))
    return c


def compare(c):
    """(max |out error|, max |lse error|) of the emulation against the float64 reference."""
    D, Sq, Sk = c["D"], c["Sq"], c["Sk"]
    got, got_lse = emulate(c["q"].numpy(), c["k"].numpy(), c["v"].numpy(), c["causal"], c["scale"], c["window"],
                           c["sinks"], c["alpha"], None if c["key_bias"] is None else c["key_bias"].numpy(),
                           c["sink_logit"], c["out_scale"].numpy(), c["out_bias"].numpy(), c["gate"])
    kw = dict(causal=c["causal"], window=c["window"], sinks=c["sinks"], gate=c["gate"],
              out_scale=c["out_scale"].view(1, D), out_bias=c["out_bias"].view(1, D))
    kw.update({n: c[n] for n in ("alpha", "key_bias", "sink_logit") if c[n] is not None})
    ref = reference.attention(c["q"].view(1, Sq, 1, D), c["k"].view(1, Sk, 1, D), c["v"].view(1, Sk, 1, D),
                              return_lse=c["alpha"] is None, **kw)
    lerr = 0.0
    if c["alpha"] is None:
        ref, ref_lse = ref
        ref_lse = ref_lse[0, 0].numpy()
        finite = np.isfinite(ref_lse)
        assert np.array_equal(finite, np.isfinite(got_lse)), "the rows with lse -inf differ"
        lerr = np.abs(ref_lse[finite] - got_lse[finite]).max(initial=0.0)
    return np.abs(ref[0, :, 0].numpy() - got).max(), lerr


def main(cases=40):
    worst = 0.0
    for case in range(cases):
        c = random_case(case)
        err, lerr = compare(c)
        worst = max(worst, err, lerr)
        flag = "" if max(err, lerr) < 1e-9 else "   <-- MISMATCH"
        print(f"case {case:3d}: " + " ".join(f"{n}={c[n]}" for n in ("D", "Sq", "Sk", "causal", "window", "sinks",
                                                                      "alpha", "sink_logit")) +
              f" bias={c['key_bias'] is not None}: max|out err| {err:.2e} lse {lerr:.2e}{flag}", flush=True)
    print("worst", worst)
    return worst


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    sys.exit(0 if main(n) < 1e-9 else 1)
