"""A line-by-line Python transcription of the CUDA backward (csrc/attention/cuda/backward_kernel.cu)
checked against the CPU backward op on random cases, in float64.

It checks the algorithm and the index arithmetic of the three passes without a GPU (row pass:
epilogue/alpha backward and delta; dq pass over keys_for_query; dk/dv pass over the inverse
visibility, HeadVisibility::queries_for_key), not the compiled kernel. The visibility rules are
head_semantics.h's own, called through headops._C.semantics, so they cannot drift. Run: PYTHONPATH=python python tests/emulate_cuda_bwd.py (or through pytest:
test_emulated_cuda_backward_matches_cpu).
"""

import math

import torch

import headops  # noqa: F401  (registers the ops)
from headops import _C

F64 = torch.float64


def visible(causal, window, sinks, pos, j):
    """HeadVisibility::visible (head_semantics.h itself, through a test hook)."""
    return _C.semantics.visible(causal, window, sinks, pos, j)


def keys_for_query(causal, window, sinks, pos, Sk):
    """The keys a query sees, in the order the kernel walks keys_for_query's two ranges."""
    sink_keys, window_keys = _C.semantics.keys_for_positions(causal, window, sinks, pos, pos, Sk)
    return [j for lo, hi in (sink_keys, window_keys) for j in range(lo, hi)]


def emulate(p):
    """p: dict of the backward op's inputs (bshd layout, float64, per-head tensors [B, Hq] etc.).
    Returns the gradients as the CUDA kernels compute them."""
    q, k, v, dout = p["q"], p["k"], p["v"], p["dout"]
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    causal = p["causal"]
    g = {n: torch.zeros(s, dtype=F64) for n, s in (("q", (B, Sq, Hq, D)), ("k", (B, Sk, Hq, D)),
                                                    ("v", (B, Sk, Hq, D)), ("softmax_scale", (B, Hq)),
                                                    ("alpha", (B, Hq)), ("key_bias", (B, Hq, Sk)),
                                                    ("sink_logit", (B, Hq)), ("out_scale", (B, Hq, D)),
                                                    ("out_bias", (B, Hq, D)), ("gate", (B, Hq)))}

    def ph(name, b, h, default):
        t = p.get(name)
        return default if t is None else t[b, h].item()

    for b in range(B):
        for h in range(Hq):
            scale = ph("softmax_scale", b, h, p["default_scale"])
            window, sinks = int(ph("window", b, h, -1)), int(ph("sinks", b, h, 0))
            has_alpha = p.get("alpha") is not None
            alpha = ph("alpha", b, h, 0.0)
            has_sink = p.get("sink_logit") is not None
            sink_logit = ph("sink_logit", b, h, 0.0)
            gate = ph("gate", b, h, 1.0)
            w_full, w_stream = (alpha, 1 - alpha) if has_alpha else (0.0, 1.0)
            plan_full, plan_stream = (alpha != 0, alpha != 1) if has_alpha else (False, True)
            both = plan_full and plan_stream
            do_scale = 1.0 if both else (w_full if plan_full else w_stream)
            wf, ws = (w_full, w_stream) if both else (1.0, 1.0)
            if p["skipped_zero_gate"] and gate == 0:
                continue
            rows_zero = gate == 0 and p.get("dlse") is None
            want_dalpha = p["want"]["alpha"] and has_alpha
            read_full = has_alpha and (plan_full or want_dalpha)
            read_stream = plan_stream or want_dalpha
            os_ = p["out_scale"][b, h] if p.get("out_scale") is not None else torch.ones(D, dtype=F64)
            ob_ = p["out_bias"][b, h] if p.get("out_bias") is not None else torch.zeros(D, dtype=F64)
            # 1. row pass
            d_o = torch.zeros(Sq, D, dtype=F64)
            delta_s, delta_f = [0.0] * Sq, [0.0] * Sq
            dgate = dalpha = dsink = 0.0
            for i in range(Sq):
                dy = dout[b, i, h]
                of = p["o_full"][b, h, i] if read_full else None
                ost = p["o_stream"][b, h, i] if read_stream else None
                if of is not None or ost is not None:
                    mixed = alpha * of + (1 - alpha) * ost if (of is not None and ost is not None) else \
                        (of if of is not None else ost)
                    dgate += (dy * (mixed * os_ + ob_)).sum().item()
                    g["out_scale"][b, h] += gate * dy * mixed
                g["out_bias"][b, h] += gate * dy
                gg = gate * dy * os_
                dot_f = (gg * of).sum().item() if of is not None else 0.0
                dot_s = (gg * ost).sum().item() if ost is not None else 0.0
                d_o[i] = gg * do_scale
                if gate == 0:
                    delta_s[i] = -p["dlse"][b, h, i].item() if p.get("dlse") is not None else 0.0
                    delta_f[i] = 0.0
                else:
                    if want_dalpha:
                        dalpha += dot_f - dot_s
                    delta_s[i] = w_stream * dot_s if plan_stream else 0.0
                    delta_f[i] = w_full * dot_f if plan_full else 0.0
                    if p.get("dlse") is not None:
                        delta_s[i] -= p["dlse"][b, h, i].item()
                if has_sink:
                    ls = p["lse"][b, h, i].item()
                    if plan_stream and ls != -math.inf:
                        dsink -= math.exp(sink_logit - ls) * delta_s[i]
                    if plan_full:
                        lf = p["lse_full"][b, h, i].item()
                        if lf != -math.inf:
                            dsink -= math.exp(sink_logit - lf) * delta_f[i]
            g["gate"][b, h], g["alpha"][b, h], g["sink_logit"][b, h] = dgate, dalpha, dsink
            if rows_zero or Sk == 0:
                continue
            main = (causal, -1, 0) if plan_full else (causal, window, sinks)
            bias = p["key_bias"][b, h] if p.get("key_bias") is not None else torch.zeros(Sk, dtype=F64)

            def pair(i, j):
                pos = Sk - Sq + i
                kvh = h // group
                s = (q[b, i, h] * k[b, j, kvh]).sum().item()
                dp = (d_o[i] * v[b, j, kvh]).sum().item()
                logit = s * scale + bias[j].item()
                ls = p["lse"][b, h, i].item() if plan_stream else -math.inf
                lf = p["lse_full"][b, h, i].item() if plan_full else -math.inf
                if not both:
                    lse = lf if plan_full else ls
                    delta = delta_f[i] if plan_full else delta_s[i]
                    seen = visible(*main, pos, j) and lse != -math.inf
                    pr = math.exp(logit - lse) if seen else 0.0
                    return pr * (dp - delta), pr
                pf = math.exp(logit - lf) if visible(causal, -1, 0, pos, j) and lf != -math.inf else 0.0
                ps = math.exp(logit - ls) if visible(causal, window, sinks, pos, j) and ls != -math.inf else 0.0
                ds = (pf * (wf * dp - delta_f[i]) if pf != 0 else 0.0) + (ps * (ws * dp - delta_s[i]) if ps != 0 else 0.0)
                return ds, wf * pf + ws * ps

            # 2. dq pass
            for i in range(Sq):
                acc = torch.zeros(D, dtype=F64)
                for j in keys_for_query(*main, Sk - Sq + i, Sk):
                    ds, _ = pair(i, j)
                    acc += ds * k[b, j, h // group]
                g["softmax_scale"][b, h] += (q[b, i, h] * acc).sum().item()
                g["q"][b, i, h] = scale * acc
            # 3. dk/dv pass over the queries that see each key
            for j in range(Sk):
                lo, hi = _C.semantics.queries_for_key(main[0], main[1], main[2], j, Sq, Sk)
                dk, dv, dkb = torch.zeros(D, dtype=F64), torch.zeros(D, dtype=F64), 0.0
                for i in range(lo, hi):
                    ds, pv = pair(i, j)
                    dkb += ds
                    dk += ds * q[b, i, h]
                    dv += pv * d_o[i]
                g["k"][b, j, h], g["v"][b, j, h], g["key_bias"][b, h, j] = scale * dk, dv, dkb
    # the op sums GQA groups
    for n in ("k", "v"):
        g[n] = g[n].view(B, Sk, Hkv, group, D).sum(3)
    return g


GRAD_ORDER = ("q", "k", "v", "softmax_scale", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate")


def random_case(seed, B=2, Sq=9, Sk=11, Hq=4, Hkv=2, D=5, causal=True, alpha=True, dlse=False, want_all=True):
    """Inputs of the backward op from the CPU forward (float64, bshd), all per-head features."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    q, k, v = rnd(B, Sq, Hq, D), rnd(B, Sk, Hkv, D), rnd(B, Sk, Hkv, D)
    per = dict(
        softmax_scale=torch.rand(B, Hq, generator=gen, dtype=F64) * 0.5 + 0.1,
        window=torch.tensor([[[1, 3, -1, Sk + 5][(h + b) % 4] for h in range(Hq)] for b in range(B)]),
        sinks=torch.tensor([[[0, 2, 1, Sk + 1][(h + 2 * b) % 4] for h in range(Hq)] for b in range(B)]),
        alpha=torch.tensor([[[0.3, 0.0, 1.0, 0.6][(h + b) % 4] for h in range(Hq)] for b in range(B)],
                           dtype=F64) if alpha else None,
        key_bias=rnd(B, Hq, Sk),
        sink_logit=rnd(B, Hq),
        out_scale=rnd(B, Hq, D),
        out_bias=rnd(B, Hq, D),
        gate=rnd(B, Hq),
    )
    per["gate"][0, 1] = 0.0
    skip_zero_gate = not want_all  # the gate's gradient wanted: gated-off heads are computed
    skip_unused = not want_all
    out, lse, o_stream, o_full, lse_full = torch.ops.headops.attention_fwd(
        q, k, v, causal, False, 1 / math.sqrt(D), per["softmax_scale"], per["window"], per["sinks"], per["alpha"],
        per["key_bias"], per["sink_logit"], per["out_scale"], per["out_bias"], per["gate"], skip_zero_gate,
        skip_unused, True)
    p = dict(q=q, k=k, v=v, dout=rnd(B, Sq, Hq, D), causal=causal, default_scale=1 / math.sqrt(D),
             o_stream=o_stream, lse=lse, o_full=o_full if alpha else None, lse_full=lse_full if alpha else None,
             dlse=rnd(B, Hq, Sq) if dlse and not alpha else None, skipped_zero_gate=skip_zero_gate,
             want={n: want_all or n in ("q", "k", "v") for n in GRAD_ORDER}, **per)
    return p


def cpu_op_grads(p):
    needs = [int(p["want"][n]) for n in GRAD_ORDER]
    res = torch.ops.headops.attention_bwd(
        p["dout"], p["dlse"], p["q"], p["k"], p["v"], p["o_stream"], p["lse"], p["o_full"], p["lse_full"],
        p["causal"], False, p["default_scale"], p["softmax_scale"], p["window"], p["sinks"], p["alpha"],
        p["key_bias"], p["sink_logit"], p["out_scale"], p["out_bias"], p["gate"], p["skipped_zero_gate"], needs)
    return dict(zip(GRAD_ORDER, res))


def compare(seed, **kw):
    p = random_case(seed, **kw)
    got, want = emulate(p), cpu_op_grads(p)
    worst = 0.0
    for n in GRAD_ORDER:
        if not p["want"][n] or p.get(n, 0) is None or want[n].numel() == 0:
            continue
        err = (got[n] - want[n]).abs().max().item()
        worst = max(worst, err / (1 + want[n].abs().max().item()))
        assert err <= 1e-10 * (1 + want[n].abs().max().item()), (seed, kw, n, err)
    return worst


CASES = [
    dict(),
    dict(causal=False),
    dict(alpha=False, dlse=True),
    dict(alpha=False, dlse=True, causal=False, Sq=13, Sk=6),
    dict(want_all=False),
    dict(Sq=1, Sk=12, Hq=2, Hkv=1),
    dict(Sq=14, Sk=5, causal=True),
]

if __name__ == "__main__":
    for n, case in enumerate(CASES):
        print(case, f"worst relative error {compare(n, **case):.1e}")
