"""Property-based tests (hypothesis) of headops.HeadSparseCache against full recomputation.

Random caches: batch 1..3, 1..3 KV heads of random kinds (full / streaming / budget), GQA
groups of 1..3 query heads with their own windows and sinks (streaming heads: a window; budget
heads: none), head dims 1..64 (16..80 in bfloat16 and float16), float64 (mostly), float32,
bfloat16 and float16, max_step 1..5, budget_recent 0..3,
one or two layers (window/sinks/kinds given per head or per layer, as lists or tensors), both
layouts, causal or not. A prompt of 1..20 tokens (per-row ``lengths=`` sometimes, or stored with
``cache.append``), then 0..12 decode calls of 1..max_step tokens, with random per-head arguments
in each accepted form (gate, softmax_scale, sink_logit, out_scale, out_bias, key_bias by original
position, alpha on the query heads of full KV heads).

Property (DESIGN section 2): every call's output equals ``headops.attention`` and
``headops.reference.attention`` over the row's whole sequence so far (bottom-right aligned), with
the same per-head spec; for budget heads, over exactly the kept set (a -inf key mask on the keys
the cache no longer holds, read with ``kept_positions``) - except the prompt call, which sees the
whole prompt. Also: no NaN, padded prompt rows exactly 0, ``seq_lengths`` (other layers stay
empty), ``ideal_nbytes`` equals the kept tokens counted from the spec, ``nbytes`` holds at least
that, rings and budget slots are allocated once and the full storage grows in bounded chunks,
``dense_nbytes``.

A fixed number of examples (HEADOPS_HYPOTHESIS_EXAMPLES scales it: 3/20 of it, 300 by default),
derandomized, with the drawn data seed in every failure message.
"""

import math
import os

import pytest
import torch

import headops
from headops import reference

from conftest import OUT_ATOL, OUT_RTOL

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = max(1, int(os.environ.get("HEADOPS_HYPOTHESIS_EXAMPLES", "2000")) * 3 // 20)
F64 = torch.float64
TOL = {torch.float64: (1e-9, 1e-9)} | {dtype: (OUT_ATOL[dtype], OUT_RTOL[dtype])
                                       for dtype in (torch.float32, torch.bfloat16, torch.float16)}


# ------------------------------------------------------------------------------ the draw


@st.composite
def cache_case(draw):
    c = {}
    B = c["B"] = draw(st.integers(1, 3))
    Hkv = c["Hkv"] = draw(st.integers(1, 3))
    group = c["group"] = draw(st.integers(1, 3))
    Hq = c["Hq"] = Hkv * group
    c["dtype"] = draw(st.sampled_from([F64, F64, F64, torch.float32, torch.bfloat16, torch.float16]))
    # 16-bit rows widen to float in whole vector pairs of the decode kernel (32 elements on
    # AVX-512, 16 on AVX2) and a tail
    half = c["dtype"] in (torch.bfloat16, torch.float16)
    D = c["D"] = draw(st.sampled_from([16, 17, 33, 64, 80] if half else [1, 2, 3, 8, 16, 17, 64]))
    c["layout"] = draw(st.sampled_from(["bshd", "bhsd"]))
    c["causal"] = draw(st.sampled_from([True, True, True, False]))
    max_step = c["max_step"] = draw(st.integers(1, 5))
    recent = c["budget_recent"] = draw(st.integers(0, 3))
    L = c["L"] = draw(st.integers(1, 2))
    c["layer"] = draw(st.integers(0, L - 1))
    kinds = c["kinds"] = [draw(st.sampled_from(["full", "streaming", "budget"])) for _ in range(Hkv)]
    window, sinks, budgets = [], [], []
    for h in range(Hkv):
        for _ in range(group):
            if kinds[h] == "full":
                window.append(draw(st.sampled_from([-1, -1, 1, 2, 3, 5, 8, 30])))
            elif kinds[h] == "streaming":
                window.append(draw(st.integers(1, 8)))
            else:
                window.append(draw(st.sampled_from([-1, -5])))
            sinks.append(draw(st.sampled_from([0, 0, 1, 2, 3, 25])))
        if kinds[h] == "budget":
            need = max(sinks[h * group:(h + 1) * group]) + recent + 1
            budgets.append(need + draw(st.integers(0, 6)))
        else:
            budgets.append(draw(st.sampled_from([None, 7])))  # ignored for other kinds
    c["compensation"] = [draw(st.sampled_from([None, "weighted", "unweighted"])) if kind == "streaming" else None
                         for kind in kinds]
    c["prefill"] = draw(st.sampled_from(["spec", "spec", "full"]))
    c["allocation"] = draw(st.sampled_from(["uniform", "adakv"])) if "budget" in kinds else "uniform"
    if c["allocation"] == "adakv":  # AdaKV shares one budget per layer
        top = max(b for b, kind in zip(budgets, kinds) if kind == "budget")
        budgets = [top if kind == "budget" else b for b, kind in zip(budgets, kinds)]
        c["adakv_alpha"] = draw(st.sampled_from([0.0, 0.2, 1.0]))
    c["observation_window"] = draw(st.sampled_from([None, 1, 4]))
    c["pool_kernel"] = draw(st.sampled_from([None, 3]))
    c["window"], c["sinks"], c["budgets"] = window, sinks, budgets
    S = c["S"] = draw(st.integers(1, 20))
    mode = c["prompt"] = draw(st.sampled_from(["attention", "attention", "lengths", "append"]))
    c["lengths"] = [draw(st.integers(1, S)) for _ in range(B)] if mode == "lengths" else None
    c["steps"] = draw(st.lists(st.integers(1, max_step), min_size=0, max_size=12))
    # beam search's reorder_cache before one of the steps: each row becomes a drawn row (repeats allowed)
    c["reorder"] = (draw(st.integers(0, len(c["steps"]))), [draw(st.integers(0, B - 1)) for _ in range(B)]) \
        if B > 1 and c["steps"] and draw(st.integers(0, 3)) == 0 else None
    # assisted generation's crop before one of the steps (not the first): the last 1..max_step + 1 tokens
    c["crop"] = (draw(st.integers(1, len(c["steps"]) - 1)), draw(st.integers(1, max_step + 1))) \
        if len(c["steps"]) > 1 and draw(st.integers(0, 3)) == 0 else None
    c["seed"] = draw(st.integers(0, 2**31 - 1))

    # per-head arguments, each in one of its accepted forms
    full_q = [kinds[h // group] == "full" for h in range(Hq)]

    def vec(values):
        form = draw(st.sampled_from(["heads", "batch", "batch1"]))
        t = torch.tensor(values, dtype=F64)
        if form == "batch":  # [B, Hq], rows differ (zeros stay zeros: alpha stays 0 off the full KV heads)
            return torch.stack([t * (1.0 - 0.15 * b) for b in range(B)])
        return t if form == "heads" else t.unsqueeze(0)

    def values(options):
        return [draw(st.sampled_from(options)) for _ in range(Hq)]

    args = {}
    if draw(st.booleans()):
        form = draw(st.sampled_from(["float", "tensor", "scalar_tensor"]))
        if form == "float":
            args["softmax_scale"] = draw(st.sampled_from([0.1, 0.5, 1.3]))
        elif form == "scalar_tensor":
            args["softmax_scale"] = torch.tensor(draw(st.sampled_from([0.2, 0.9])), dtype=F64)
        else:
            args["softmax_scale"] = vec(values([0.05, 0.3, 0.7, 1.5]))
    if draw(st.booleans()):
        args["gate"] = draw(st.sampled_from([0.5, -1.0])) if draw(st.booleans()) else vec(
            values([1.0, 0.0, -0.7, 1.6, 0.4]))
    if draw(st.booleans()):
        args["sink_logit"] = draw(st.sampled_from([0.5, -math.inf])) if draw(st.booleans()) else vec(
            values([0.5, -math.inf, 1.5, -1.0, 2.0]))
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(Hq, D), (B, Hq, D), (1, Hq, D)]))
        args["out_scale"] = shape
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(Hq, D), (B, Hq, D), (1, Hq, D)]))
        args["out_bias"] = shape
    if draw(st.booleans()):  # by original position: a shape over the whole sequence, cut per call
        args["key_bias"] = draw(st.sampled_from(["keys", "heads_keys", "full", "batch_1_keys", "one_heads_keys",
                                                 "heads_1", "scalar"]))
        c["key_bias_masks"] = draw(st.booleans())
    if any(full_q) and draw(st.booleans()):
        a = [draw(st.sampled_from([0.0, 0.3, 1.0, 0.8])) if full_q[h] else 0.0 for h in range(Hq)]
        args["alpha"] = 0.0 if not any(a) and draw(st.booleans()) else (
            draw(st.sampled_from([0.25, 1.0])) if all(full_q) and draw(st.booleans()) else vec(a))
    c["args"] = args

    # the constructor's forms of window, sinks, kinds and budget
    c["window_form"] = draw(st.sampled_from(["list", "tensor", "layers"]))
    c["kinds_form"] = draw(st.sampled_from(["list", "layers", "str"]))
    return c


# ------------------------------------------------------------------------------ helpers


def build_cache(c):
    L, Hq = c["L"], c["Hq"]
    window, sinks, kinds, budgets = c["window"], c["sinks"], c["kinds"], c["budgets"]
    if c["window_form"] == "tensor":
        window, sinks = torch.tensor(window), torch.tensor(sinks, dtype=torch.int32)
    elif c["window_form"] == "layers":
        window, sinks, budgets = [window] * L, [sinks] * L, [budgets] * L
    if c["kinds_form"] == "layers":
        kinds = [kinds] * L
    elif c["kinds_form"] == "str" and len(set(kinds)) == 1:
        kinds = kinds[0]
    compensation = c["compensation"] if c["window_form"] != "layers" else [c["compensation"]] * L
    options = {name: c[name] for name in ("prefill", "allocation", "adakv_alpha", "observation_window", "pool_kernel")
               if name in c}
    return headops.HeadSparseCache(num_layers=L, num_heads=Hq, num_kv_heads=c["Hkv"], head_dim=c["D"], kinds=kinds,
                                   window=window, sinks=sinks, budget=budgets, budget_recent=c["budget_recent"],
                                   max_step=c["max_step"], dtype=c["dtype"], batch_size=c["B"],
                                   compensation=compensation, **options)


def materialise_args(c, gen, N):
    """Tensors of the per-head arguments (key_bias over N original positions)."""
    B, Hq, D = c["B"], c["Hq"], c["D"]
    out = {}
    for name, value in c["args"].items():
        if name in ("out_scale", "out_bias"):
            out[name] = torch.randn(value, generator=gen, dtype=F64)
        elif name == "key_bias":
            shape = {"keys": (N,), "heads_keys": (Hq, N), "full": (B, Hq, N), "batch_1_keys": (B, 1, N),
                     "one_heads_keys": (1, Hq, N), "heads_1": (Hq, 1), "scalar": ()}[value]
            kb = torch.randn(shape, generator=gen, dtype=F64)
            if c.get("key_bias_masks") and kb.dim() and kb.shape[-1] == N and N > 2:
                kb[..., 1] = -math.inf  # a masked key
            out[name] = kb
        else:
            out[name] = value
    return out


def cut_key_bias(kb, n, N):
    """key_bias for the first n original positions (broadcast forms stay as they are)."""
    return kb[..., :n] if kb.dim() and kb.shape[-1] == N else kb


def row_args(args, b, B):
    """Batch row b of the per-head arguments (a batch axis sliced where there is one)."""
    out = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            batched = value.dim() == (2 if name in ("gate", "softmax_scale", "sink_logit", "alpha") else 3)
            if batched and value.shape[0] == B and B > 1:
                value = value[b:b + 1]
        out[name] = value
    return out


def to_layout(t, layout):
    return t if layout == "bshd" else t.transpose(1, 2)


def kept_bias(cache, layer, b, c, n):
    """[Hq, n] 0 / -inf: the keys row b's KV heads hold (budget heads only: others see everything)."""
    group = c["group"]
    mask = torch.zeros(c["Hq"], n, dtype=F64)
    for h, kind in enumerate(c["kinds"]):
        if kind == "budget":
            kept = cache._layers[layer].kept_positions(b, h)
            size = cache._layers[layer].budget_sizes(b)[int(cache._layers[layer].kv_index[h])]
            assert kept.numel() == min(n, size), "a budget head holds min(length, its size) tokens"
            if c["allocation"] != "adakv":
                assert size == c["budgets"][h]
            assert kept.numel() == 0 or (int(kept.max()) < n and int(kept.min()) >= 0)
            row = torch.full((n,), -math.inf, dtype=F64)
            row[kept] = 0.0
            mask[h * group:(h + 1) * group] = row
    return mask


def kv_ring(c, h):
    """(sinks, ring) a streaming KV head keeps, from the spec: the largest of its query heads'."""
    served = range(h * c["group"], (h + 1) * c["group"])
    return max(c["sinks"][q] for q in served), max(c["window"][q] for q in served) + c["max_step"] - 1


def kept_tokens(c, n, sizes, written):
    """Tokens a row of length n keeps per KV head (and its compensation tokens), from the spec
    alone; `sizes`: the row's budget head sizes (the spec's budgets unless AdaKV reallocated);
    `written`: the most the row has held (a crop leaves a wrapped ring's oldest slots overwritten
    by the tokens it dropped)."""
    total = 0
    for h, kind in enumerate(c["kinds"]):
        if kind == "full":
            total += n
        elif kind == "streaming":
            sinks, ring = kv_ring(c, h)
            total += min(n, sinks) + max(0, n - max(sinks, written - ring))
            total += c["compensation"][h] is not None and n > sinks + ring
        else:
            total += min(n, sizes[h])
    return total


def ring_slots(c, seen):
    """(least, most) slots the streaming storage holds once rows of up to `seen` tokens arrived:
    each ring holds what it received past its sinks (at least 1), rounded up to 64 slots, at most
    its capacity; budget heads their budgets (shared among a row's budget heads)."""
    least = most = 0
    for h, kind in enumerate(c["kinds"]):
        if kind == "streaming":
            s, cap = kv_ring(c, h)
            need = max(seen - s, 1)
            least += s + min(cap, need)
            most += s + min(cap, -(-need // 64) * 64)
        elif kind == "budget":
            least += c["budgets"][h]
            most += c["budgets"][h]
    return least, most


def compare(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    got = got.to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not bool(torch.isnan(got).any()), f"{what}: NaN"
    assert bool(torch.isfinite(got).all()), f"{what}: not finite"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------ the property


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny calls: on a small shared machine the thread pools' spin-waits make each ~10x
    slower. Correctness is the property here (the kernels' threading is tested in test_kvcache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cache_case())
def test_cache_matches_full_recomputation(c):
    seed, B, Hq, Hkv, D, dtype, layout = c["seed"], c["B"], c["Hq"], c["Hkv"], c["D"], c["dtype"], c["layout"]
    layer, S, steps, lengths, causal = c["layer"], c["S"], c["steps"], c["lengths"], c["causal"]
    gen = torch.Generator().manual_seed(seed)
    N = S + sum(steps)  # tokens per row, at most (each row's positions 0 .. N - 1)
    q = torch.randn(B, N, Hq, D, generator=gen, dtype=F64).to(dtype)  # bshd; passed in `layout`
    k = torch.randn(B, N, Hkv, D, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(B, N, Hkv, D, generator=gen, dtype=F64).to(dtype)
    args = materialise_args(c, gen, N)
    kb_full = args.pop("key_bias", None)
    window, sinks = torch.tensor(c["window"]), torch.tensor(c["sinks"])
    group = c["group"]
    where = f"seed {seed}, case {({n: x for n, x in c.items() if n != 'args'})}, args {c['args']}"

    cache = build_cache(c)
    bpt = 2 * D * torch.empty((), dtype=dtype).element_size()  # K and V of one token
    least, most = ring_slots(c, 0)
    comp_bytes = c["L"] * B * sum(x is not None for x in c["compensation"]) * (2 * D * 8 + 8)  # float64 sums, count
    empty_bytes = cache.nbytes()
    assert c["L"] * B * least * bpt + comp_bytes <= empty_bytes <= c["L"] * B * most * (bpt + 12) + comp_bytes + 2048, \
        where

    def call(qs, ks, vs, n_keys, **extra):
        kw = dict(args, **extra)
        if kb_full is not None:
            kw["key_bias"] = cut_key_bias(kb_full, n_keys, N)
        out = cache.attention(layer, to_layout(qs, layout), to_layout(ks, layout), to_layout(vs, layout),
                              layout=layout, causal=causal, **kw)
        assert out.dtype == dtype and out.shape == to_layout(qs, layout).shape, where
        return to_layout(out, layout)

    def oracle(b, qs, n, mask, *, prompt=False):
        """Row b: queries qs ([1, m, Hq, D], the last m of positions 0 .. n - 1) over keys 0 .. n - 1
        (the prompt call: the spec's visibility, or full attention with prefill="full"; later calls:
        the spec's, plus one key per compensated streaming KV head that has evicted tokens: the mean
        of what it evicted, logit + log(count) when weighted, visible to its query heads - placed
        first, every sink moved by one so that positions keep their distances)."""
        kw = row_args(args, b, B)
        kb = torch.zeros(1, Hq, n, dtype=F64)
        if kb_full is not None:
            kb = kb + row_args({"key_bias": cut_key_bias(kb_full, n, N)}, b, B)["key_bias"]
        if mask is not None:
            kb = kb + mask
        kk, vv = k[b:b + 1, :n], v[b:b + 1, :n]
        if prompt and c["prefill"] == "full":
            spec = dict(kw, key_bias=kb, causal=causal)
        elif prompt or all(x is None for x in c["compensation"]):
            spec = dict(kw, key_bias=kb, window=window, sinks=sinks, causal=causal)
        else:
            k0, v0 = torch.zeros(1, 1, Hkv, D, dtype=dtype), torch.zeros(1, 1, Hkv, D, dtype=dtype)
            b0 = torch.full((1, Hq, 1), -math.inf, dtype=F64)
            for h, comp in enumerate(c["compensation"]):
                s_kv, ring = kv_ring(c, h)
                gone = list(range(s_kv, max(s_kv, n - ring)))
                if comp is None or not gone:
                    continue
                k0[0, 0, h] = k[b, gone, h].double().mean(0).to(dtype)
                v0[0, 0, h] = v[b, gone, h].double().mean(0).to(dtype)
                b0[0, h * group:(h + 1) * group] = math.log(len(gone)) if comp == "weighted" else 0.0
                event("a compensation key")
            kk, vv = torch.cat([k0, kk], 1), torch.cat([v0, vv], 1)
            spec = dict(kw, key_bias=torch.cat([b0, kb], -1), window=window, sinks=sinks + 1, causal=causal)
        same = headops.attention(qs, kk, vv, **spec)  # the same dtype
        ref = reference.attention(qs.double(), kk.double(), vv.double(), **spec)
        return same, ref

    # ---- the prompt
    if c["prompt"] == "append":
        cache.append(layer, to_layout(k[:, :S], layout), to_layout(v[:, :S], layout), layout=layout)
        cur = [S] * B
    elif c["prompt"] == "lengths":
        out = call(q[:, :S], k[:, :S], v[:, :S], S, lengths=lengths)
        for b, n in enumerate(lengths):
            assert bool((out[b, n:] == 0).all()), f"row {b}: padded prompt rows must be exactly 0; {where}"
            same, ref = oracle(b, q[b:b + 1, :n], n, None, prompt=True)
            compare(out[b:b + 1, :n], same.to(F64), dtype, f"prompt row {b} vs headops.attention; {where}")
            compare(out[b:b + 1, :n], ref, dtype, f"prompt row {b} vs the reference; {where}")
        cur = list(lengths)
    else:
        out = call(q[:, :S], k[:, :S], v[:, :S], S)
        for b in range(B):
            same, ref = oracle(b, q[b:b + 1, :S], S, None, prompt=True)
            compare(out[b:b + 1], same.to(F64), dtype, f"prompt row {b} vs headops.attention; {where}")
            compare(out[b:b + 1], ref, dtype, f"prompt row {b} vs the reference; {where}")
        cur = [S] * B

    def check_state(i):
        assert cache.seq_lengths(layer).tolist() == cur, f"call {i}: seq_lengths; {where}"
        for other in range(c["L"]):
            if other != layer:
                assert cache.seq_lengths(other).tolist() == [0] * B
        assert cache.get_seq_length(layer) == max(cur)
        st_ = cache._layers[layer]
        sizes = [[st_.budget_sizes(b)[int(st_.kv_index[h])] if kind == "budget" else None
                  for h, kind in enumerate(c["kinds"])] for b in range(B)]
        ideal = sum(kept_tokens(c, n, sizes[b], written[b]) for b, n in enumerate(cur)) * bpt
        assert cache.ideal_nbytes() == ideal, f"call {i}: ideal_nbytes; {where}"
        assert cache.dense_nbytes() == max(cur) * B * Hkv * bpt
        held = cache.nbytes()
        assert held >= ideal, f"call {i}: nbytes {held} < ideal {ideal}; {where}"
        # the full storage grows in bounded chunks, the rings with what they received, up to capacity
        cap = st_.capacity()
        assert cap == sum(seg.shape[2] for seg in st_.full_k), f"call {i}: capacity {cap} != the segments'; {where}"
        assert cap == 0 if "full" not in c["kinds"] else max(cur) <= cap <= 1.25 * max(cur) + 64 + c["max_step"], \
            f"call {i}: capacity {cap}; {where}"
        least, most = ring_slots(c, max(cur))
        assert least <= st_.slots_held <= most, f"call {i}: {st_.slots_held} streaming slots; {where}"

    written = list(cur)
    check_state(0)
    event(f"kinds: {', '.join(sorted(set(c['kinds'])))}")
    event(f"prompt: {c['prompt']}")

    # ---- decode calls: row b's next n tokens sit at its own positions cur[b] ..
    for i, n in enumerate(steps, 1):
        if c["reorder"] is not None and c["reorder"][0] == i - 1:  # the rows' histories follow them
            rows = c["reorder"][1]
            cache.reorder_cache(torch.tensor(rows))
            q, k, v = q[rows], k[rows], v[rows]
            cur = [cur[b] for b in rows]
            written = [written[b] for b in rows]
            check_state(f"{i} (reordered)")
            event("rows reordered")
        if c["crop"] is not None and c["crop"][0] == i - 1 and c["crop"][1] <= min(cur):
            dropped = c["crop"][1]
            try:
                cache.crop(-dropped)
            except NotImplementedError:  # (exact only without budget heads and compensation's evictions, and
                # for a wrapped ring up to max_step tokens)
                assert "budget" in c["kinds"] or any(x is not None for x in c["compensation"]) or (
                    "streaming" in c["kinds"] and dropped > c["max_step"]), where
                event("a crop refused")
            else:
                cur = [x - dropped for x in cur]
                for t in (q, k, v):  # the positions come again with other tokens
                    for b in range(B):
                        t[b, cur[b]:cur[b] + dropped] = torch.randn(t[b, cur[b]:cur[b] + dropped].shape,
                                                                    generator=gen, dtype=F64).to(dtype)
                check_state(f"{i} (cropped)")
                event("cropped")
        new = [torch.stack([t[b, cur[b]:cur[b] + n] for b in range(B)]) for t in (q, k, v)]
        cur = [x + n for x in cur]
        written = [max(w, x) for w, x in zip(written, cur)]
        out = call(*new, max(cur))
        check_state(i)
        for b in range(B):
            p = cur[b]
            mask = kept_bias(cache, layer, b, c, p)
            if bool(torch.isinf(mask).any()):
                event("a budget head evicted tokens")
            if any(kind == "streaming" for kind in c["kinds"]) and p > ring_slots(c, p)[0]:
                event("a streaming ring wrapped")
            same, ref = oracle(b, q[b:b + 1, p - n:p], p, mask)
            compare(out[b:b + 1], same.to(F64), dtype, f"call {i} row {b} vs headops.attention; {where}")
            compare(out[b:b + 1], ref, dtype, f"call {i} row {b} vs the reference; {where}")
