"""Limits (issue 8, "Reliability", item 5): 64-bit index arithmetic, values at the int32 and
int64 limits, and caches that run for a very long time.

1. Element offsets past 2**31. A tensor of more than 2**31 elements does not fit this machine,
   but its *address space* does: a big ``torch.empty`` is only reserved (the kernel maps pages
   when they are first written), so the tests place small views at element offsets past 2**31
   of such a buffer and write only the elements the views cover. The resident memory each test
   adds is checked to stay small. Covered: q/k/v/key_bias with batch and head strides past
   2**31 (forward and backward), a sequence stride past int32 (the kernel's copy fallback), a
   forward over 2**31 + 40 keys (int64 positions; a windowed head reads only its keys), and
   kv_append/decode_attention on storages whose heads start past element 2**31.
2. The raw ops raise cleanly (RuntimeError, never a crash) on lengths, windows, sinks and
   split_keys at the int32 and int64 limits and on 2**31 new tokens or queries (stride-0
   views), or compute what those values mean; decode positions are right up to 2**63 - 1 (the
   visibility rule used to overflow past ~2**62 and treat a window-1 head as unlimited).
3. A streaming cache through more than a million ring wraps (and to positions past 2**24 and
   past 2**31): the sinks and the last window tokens are exactly what was written (each token's
   value encodes its position) and decode equals attention over sinks + window.
4. Budget heads at long lengths: exactly `budget` tokens kept, the sinks and the most recent
   always among them, every kept slot holding the token of its position.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import headops
from headops import reference

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
INT64_MAX = 2 ** 63 - 1
INT32_MAX = 2 ** 31 - 1


# ------------------------------------------------------------------------------- helpers


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def reserve(numel, dtype):
    """An uninitialised buffer of `numel` elements: address space only until written."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as e:  # the OS refused the reservation (strict overcommit)
        pytest.skip(f"cannot reserve {numel} elements of {dtype}: {e}")


class resident_growth_below:
    """with resident_growth_below(mib): the process's resident set may grow by at most `mib`."""

    def __init__(self, mib):
        self.mib = mib

    def __enter__(self):
        self.before = rss_mib()
        return self

    def __exit__(self, exc_type, *exc):
        grown = rss_mib() - self.before
        if exc_type is None:
            assert grown < self.mib, f"resident memory grew by {grown:.0f} MiB (limit {self.mib})"


def fill_(view, gen, scale=1.0):
    """Writes random values into a view of a big buffer (touching only its elements)."""
    view.copy_((torch.randn(view.shape, generator=gen, dtype=F64) * scale).to(view.dtype))
    return view


def close(got, want, dtype):
    atol = {F64: 1e-10, F32: 2e-5, torch.float16: 3e-3, BF16: 2e-2}[dtype]
    torch.testing.assert_close(got.to(F64), want.to(F64), atol=atol, rtol=atol)


# -------------------------------------------------- 1. element offsets past 2**31 (strides)


@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16], ids=str)
def test_batch_and_head_strides_past_2_31(dtype):
    # One buffer of 1.5 * 2**31 elements (12 GiB of address space in float32), of which ~100 KiB
    # is written: k and v have a batch stride of 2**31 (row b = 1 starts past element 2**31), q has
    # a head stride of 2**29 and a batch stride of 2**30 + 2**20 (head 3 of row 1 lies past 2**31),
    # and in float32 key_bias also has a batch stride of 2**31. Forward and backward against the
    # same values in contiguous tensors (headops and the float64 reference).
    B, Sq, Sk, Hq, Hkv, D = 2, 40, 100, 4, 2, 32
    buf = reserve(3 * 2 ** 30 + 2 ** 21, dtype)
    gen = torch.Generator().manual_seed(0)
    with resident_growth_below(200):
        k = fill_(buf.as_strided((B, Sk, Hkv, D), (2 ** 31, Hkv * D, D, 1), 0), gen)
        v = fill_(buf.as_strided((B, Sk, Hkv, D), (2 ** 31, Hkv * D, D, 1), 2 ** 16), gen)
        q = fill_(buf.as_strided((B, Sq, Hq, D), (2 ** 30 + 2 ** 20, D, 2 ** 29, 1), 2 ** 18), gen)
        assert q.storage_offset() + q.stride(0) + 3 * q.stride(2) > 2 ** 31
        kw = dict(window=torch.tensor([-1, 7, 30, -1]), sinks=torch.tensor([0, 2, 1, 3]),
                  gate=torch.tensor([1.0, 0.5, -1.0, 0.0]), sink_logit=torch.tensor([0.0, 1.0, -1.0, 2.0]))
        if dtype == F32:
            kw["key_bias"] = fill_(buf.as_strided((B, Hq, Sk), (2 ** 31, Sk, 1), 2 ** 17), gen)
        dense = [t.clone() for t in (q, k, v)]
        out = headops.attention(q, k, v, **kw)
        want = headops.attention(*dense, **kw)
        close(out, want, dtype)
        ref_kw = {n: (t.double() if t.is_floating_point() else t) for n, t in kw.items()}
        close(out, reference.attention(*(t.double() for t in dense), **ref_kw), dtype)

        # backward: gradients of the strided views equal those of the contiguous copies
        dout = torch.randn(out.shape, generator=gen, dtype=F64).to(dtype)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        dense_leaves = [t.detach().requires_grad_(True) for t in dense]
        got = torch.autograd.grad(headops.attention(*leaves, **kw), leaves, dout)
        exp = torch.autograd.grad(headops.attention(*dense_leaves, **kw), dense_leaves, dout)
        for name, g, e in zip("qkv", got, exp):
            assert g.shape == e.shape, name
            close(g, e, dtype)
    del buf


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_sequence_stride_past_int32(dtype):
    # a sequence stride of 2**31 + 64 elements does not fit BLAS's int leading dimension: the op
    # copies such an operand once (rows_addressable); the result is that of contiguous inputs
    B, Sq, Sk, Hq, Hkv, D = 1, 2, 2, 2, 1, 8
    stride = 2 ** 31 + 64
    buf = reserve(stride * (Sk - 1) + 4 * D * Hkv + 64, dtype)
    gen = torch.Generator().manual_seed(1)
    with resident_growth_below(100):
        k = fill_(buf.as_strided((B, Sk, Hkv, D), (0, stride, D, 1), 0), gen)
        v = fill_(buf.as_strided((B, Sk, Hkv, D), (0, stride, D, 1), 2 * D), gen)
        q = torch.randn(B, Sq, Hq, D, generator=gen, dtype=F64).to(dtype)
        assert k.stride(1) > INT32_MAX
        out = headops.attention(q, k, v, causal=False, sink_logit=torch.tensor([0.5, -0.5]))
        want = reference.attention(q.double(), k.double(), v.double(), causal=False,
                                   sink_logit=torch.tensor([0.5, -0.5], dtype=F64))
        close(out, want, dtype)
    del buf


def manual_attention(qrow, keys, values, positions, scale):
    """softmax(q . k_j * scale) . v_j over the given key rows, in float64."""
    logits = (keys.double() @ qrow.double()) * scale
    return torch.softmax(logits, 0) @ values.double()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_forward_over_more_than_2_31_keys(dtype):
    # Sk = 2**31 + 40 keys with head dim 1: k is a view of one buffer of Sk + 1 elements and v the
    # same buffer shifted by one (v_j = k_(j+1); 8 GiB of address space in float32). Only the
    # sinks and the last keys are written: the three queries (positions 2**31 + 37 .. 39) of
    # streaming heads (window 4 and 1, sinks 2 and 0) read nothing else, and their key positions
    # past 2**31 are int64 all the way.
    Sk, Sq, Hq = 2 ** 31 + 40, 3, 2
    buf = reserve(Sk + 1, dtype)
    gen = torch.Generator().manual_seed(2)
    window, sinks = [4, 1], [2, 0]
    with resident_growth_below(200):
        fill_(buf[:8], gen)
        fill_(buf[Sk - 16:], gen)
        k = buf.as_strided((1, Sk, 1, 1), (0, 1, 1, 1), 0)
        v = buf.as_strided((1, Sk, 1, 1), (0, 1, 1, 1), 1)
        q = torch.randn(1, Sq, Hq, 1, generator=gen, dtype=F64).to(dtype)
        with headops.count_work() as w:
            out = headops.attention(q, k, v, window=torch.tensor(window), sinks=torch.tensor(sinks),
                                    gate=torch.tensor([1.0, -2.0]), softmax_scale=0.7)
        assert w.score_elements < 10_000  # windowed heads: no pass over the 2**31 keys
        for i in range(Sq):
            pos = Sk - Sq + i
            for h in range(Hq):
                vis = sorted(set(range(sinks[h])) | set(range(pos - window[h] + 1, pos + 1)))
                idx = torch.tensor(vis)
                want = manual_attention(q[0, i, h], buf[idx].view(-1, 1), buf[idx + 1].view(-1, 1), vis, 0.7)
                want = want * [1.0, -2.0][h]
                close(out[0, i, h], want, dtype)
    del buf


def test_decode_storages_with_heads_past_element_2_31():
    # kv_append and decode_attention on hand-made storages (raw ops). The keys' storage is one
    # reserved buffer of 2**31 + 9000 bfloat16 elements (4 GiB of address space; the values' the
    # same) that holds both the full KV head's segment [1, 1, n, 64] (n * 64 = 2**31 + 4096: its
    # last positions lie past element 2**31) and, after it, the streaming KV head's slots
    # (ring_offset * 64 past 2**31 too). The prompt writes positions 0 .. 2; then the row jumps
    # to n - 7 (the raw ops take any length: the untouched middle is never read since every
    # query head has a window), four tokens are appended and the last one is decoded.
    D, n = 64, 2 ** 25 + 64
    Hq, Hkv = 4, 2
    ring_off, ring_sinks, ring_size = n + 64, 2, 5
    slots = ring_off + ring_sinks + ring_size
    kbuf, vbuf = reserve(slots * D, BF16), reserve(slots * D, BF16)
    full_k, full_v = kbuf[:n * D].view(1, 1, n, D), vbuf[:n * D].view(1, 1, n, D)
    ring_k, ring_v = kbuf.view(1, slots, D), vbuf.view(1, slots, D)  # slots [0, n) alias the full segment: unused
    assert ring_off * D > 2 ** 31 and (n - 7) * D > 2 ** 31
    kv_kind, kv_index = torch.tensor([0, 1]), torch.tensor([0, 0])
    tables = (kv_kind, kv_index, torch.tensor([ring_off]), torch.tensor([ring_sinks]), torch.tensor([ring_size]))
    gen = torch.Generator().manual_seed(3)
    positions = list(range(3)) + list(range(n - 7, n - 3))
    # tokens[p] = [k of KV head 0, k of KV head 1, v of KV head 0, v of KV head 1]
    tokens = {p: [torch.randn(D, generator=gen, dtype=F64).to(BF16) for _ in range(2 * Hkv)] for p in positions}

    def kv(ps):  # [1, len(ps), Hkv, D] keys and values of those positions
        k = torch.stack([torch.stack(tokens[p][:Hkv]) for p in ps]).unsqueeze(0)
        v = torch.stack([torch.stack(tokens[p][Hkv:]) for p in ps]).unsqueeze(0)
        return k, v

    window = torch.tensor([[3, 1, 4, 2]])  # query heads 2, 3 on the streaming head (window <= ring 5)
    sinks = torch.tensor([[2, 0, 2, 1]])
    with resident_growth_below(300):
        k, v = kv(positions[:3])
        torch.ops.headops.kv_append(k, v, [full_k], [full_v], ring_k, ring_v, torch.tensor([0]), *tables)
        k, v = kv(positions[3:])
        torch.ops.headops.kv_append(k, v, [full_k], [full_v], ring_k, ring_v, torch.tensor([n - 7]), *tables)
        L = n - 3  # the row holds positions 0 .. n - 4; the query is at n - 4
        q = torch.randn(1, 1, Hq, D, generator=gen, dtype=F64).to(BF16)
        for split in (1024, 2):
            out = torch.ops.headops.decode_attention(q, [full_k], [full_v], ring_k, ring_v, torch.tensor([L]), *tables,
                                                     True, D ** -0.5, None, window, sinks, None, None, None, None,
                                                     None, None, split)
            for h in range(Hq):
                kvh, pos = h // 2, L - 1
                vis = sorted(set(range(int(sinks[0, h]))) | set(range(pos - int(window[0, h]) + 1, pos + 1)))
                keys = torch.stack([tokens[p][kvh] for p in vis])
                vals = torch.stack([tokens[p][Hkv + kvh] for p in vis])
                close(out[0, 0, h], manual_attention(q[0, 0, h], keys, vals, vis, D ** -0.5), BF16)
        # where the tokens went: the full head's slot p, the streaming head's sinks and ring slots
        for p in positions:
            assert torch.equal(full_k[0, 0, p], tokens[p][0]) and torch.equal(full_v[0, 0, p], tokens[p][Hkv])
            slot = ring_off + (p if p < ring_sinks else ring_sinks + (p - ring_sinks) % ring_size)
            if p < ring_sinks or p >= n - 7:
                assert torch.equal(ring_k[0, slot], tokens[p][1]) and torch.equal(ring_v[0, slot], tokens[p][Hkv + 1])
    del full_k, full_v, ring_k, ring_v, kbuf, vbuf


# ------------------------------------------------- 2. the raw ops at the int32/int64 limits


_RAW_LIMITS_SCRIPT = textwrap.dedent("""
    import sys, torch, headops
    F = torch.float64
    B, D = 1, 4
    I64 = 2 ** 63 - 1
    e = torch.empty(0, dtype=torch.int64)

    def full_layer(length, Sq=1):
        fk, fv = [torch.zeros(B, 1, 64, D, dtype=F)], [torch.zeros(B, 1, 64, D, dtype=F)]
        ring = torch.zeros(B, 0, D, dtype=F)
        return (fk, fv, ring, ring.clone(), torch.tensor([length]), torch.tensor([0]), torch.tensor([0]), e, e, e)

    def ring_layer(length):
        ring = torch.zeros(B, 6, D, dtype=F)
        return ([], [], ring, ring.clone(), torch.tensor([length]), torch.tensor([1]), torch.tensor([0]),
                torch.tensor([0]), torch.tensor([1]), torch.tensor([5]))

    def budget_layer(length):
        ring = torch.zeros(B, 6, D, dtype=F)
        return ([], [], ring, ring.clone(), torch.tensor([length]), torch.tensor([2]), torch.tensor([0]), e, e, e,
                torch.tensor([[[0, 6, 1, 1]]]), torch.full((B, 6), -1, dtype=torch.int64), torch.zeros(B, 6))

    def append(layer, Sq=1):
        k = torch.randn(B, Sq, 1, D, dtype=F)
        torch.ops.headops.kv_append(k, k, *layer)

    def decode(layer, Sq=1, window=None, sinks=None, split=1024):
        q = torch.randn(B, Sq, 1, D, dtype=F)
        w = None if window is None else torch.tensor([[window]])
        s = None if sinks is None else torch.tensor([[sinks]])
        head, budget = layer[:10], layer[10:]
        return torch.ops.headops.decode_attention(q, *head, True, 0.5, None, w, s, None, None, None, None, None, None,
                                                  split, *budget)

    def decode_queries(Sq):  # 2**31 query rows of one value (stride 0): more than the row holds
        q = torch.zeros(B, 1, 1, D, dtype=F).expand(B, Sq, 1, D)
        return torch.ops.headops.decode_attention(q, *full_layer(5), True, 0.5, None, None, None, None, None, None,
                                                  None, None, None, 1024)

    def fwd(window=None, sinks=None):
        q = torch.randn(1, 3, 1, D, dtype=F)
        w = None if window is None else torch.tensor([[window]])
        s = None if sinks is None else torch.tensor([[sinks]])
        return torch.ops.headops.attention_fwd(q, q, q, True, False, 0.5, None, w, s, None, None, None, None, None,
                                               None, True, True, False)

    CASES = {
        "append_full_length_int64_max": lambda: append(full_layer(I64)),
        "append_full_length_int64_max_minus_1": lambda: append(full_layer(I64 - 1), Sq=2),
        "append_full_length_int32_max": lambda: append(full_layer(2 ** 31 - 1)),
        "append_ring_length_int64_max": lambda: append(ring_layer(I64)),
        "append_ring_length_int64_max_minus_1": lambda: append(ring_layer(I64 - 1)),
        "append_ring_length_int64_max_minus_1_two_tokens": lambda: append(ring_layer(I64 - 1), Sq=2),
        "append_budget_length_int64_max": lambda: append(budget_layer(I64)),
        "append_budget_length_int64_max_minus_1": lambda: append(budget_layer(I64 - 1)),
        "decode_full_length_int64_max": lambda: decode(full_layer(I64)),
        "decode_full_length_int32_max": lambda: decode(full_layer(2 ** 31 - 1)),
        "decode_ring_window_int64_max_two_queries": lambda: decode(ring_layer(10), Sq=2, window=I64),
        "decode_ring_sinks_int64_max": lambda: decode(ring_layer(10), window=2, sinks=I64),
        "decode_split_keys_int64_max": lambda: decode(full_layer(9), window=3, sinks=1, split=I64),
        "decode_ring_split_keys_int64_max": lambda: decode(ring_layer(9), window=3, sinks=1, split=I64),
        "decode_ring_length_int64_max": lambda: decode(ring_layer(I64), window=2, sinks=1),
        "decode_2_31_queries": lambda: decode_queries(2 ** 31),
        "append_2_31_tokens_past_capacity": lambda: torch.ops.headops.kv_append(
            *(torch.zeros(B, 1, 1, D, dtype=F).expand(B, 2 ** 31, 1, D),) * 2, *full_layer(0)),
        "fwd_window_int64_max": lambda: fwd(window=I64, sinks=I64),
        "fwd_window_int32_max": lambda: fwd(window=2 ** 31 - 1, sinks=2 ** 31),
        "fwd_window_int64_min": lambda: fwd(window=-I64 - 1),
    }
    for name, case in CASES.items():
        try:
            case()
        except RuntimeError as ex:
            print(name, "raised", str(ex).splitlines()[0][:200], flush=True)
        else:
            print(name, "ok", flush=True)
""")

# what each case must do: raise a RuntimeError, or run (computing something well defined)
RAW_LIMIT_OUTCOMES = {
    "append_full_length_int64_max": "raised",  # used to crash (segfault): len + Sq wrapped around
    "append_full_length_int64_max_minus_1": "raised",
    "append_full_length_int32_max": "raised",  # past the full storage's capacity
    "append_ring_length_int64_max": "raised",  # the new length would be 2**63: used to write to a negative slot
    "append_ring_length_int64_max_minus_1": "ok",  # position 2**63 - 2, length 2**63 - 1
    "append_ring_length_int64_max_minus_1_two_tokens": "raised",
    "append_budget_length_int64_max": "raised",
    "append_budget_length_int64_max_minus_1": "ok",
    "decode_full_length_int64_max": "raised",  # past the capacity
    "decode_full_length_int32_max": "raised",
    "decode_ring_window_int64_max_two_queries": "raised",  # used to pass: w + Sq - 1 wrapped around
    "decode_ring_sinks_int64_max": "raised",  # more sinks than the head keeps
    "decode_split_keys_int64_max": "ok",  # j + split_keys used to wrap around (two key ranges)
    "decode_ring_split_keys_int64_max": "ok",
    "decode_ring_length_int64_max": "ok",  # q0 += split_keys used to wrap around past the last position
    "decode_2_31_queries": "raised",  # checked before anything of that size is allocated
    "append_2_31_tokens_past_capacity": "raised",
    "fwd_window_int64_max": "ok",  # unlimited in effect
    "fwd_window_int32_max": "ok",
    "fwd_window_int64_min": "ok",  # < 0: unlimited
}


def test_raw_ops_at_the_int64_limits_raise_cleanly():
    # (the timeout is a hang guard: an ASan-preloaded child on a busy machine takes minutes)
    proc = subprocess.run([sys.executable, "-c", _RAW_LIMITS_SCRIPT], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the process died (returncode {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    got = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.strip()}
    assert got.keys() == RAW_LIMIT_OUTCOMES.keys(), proc.stdout
    wrong = {n: (got[n], want) for n, want in RAW_LIMIT_OUTCOMES.items() if got[n] != want}
    assert not wrong, f"{wrong}\n{proc.stdout}"


def ring_tables(length, ring=4, sinks=1):
    return (torch.tensor([length]), torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), torch.tensor([sinks]),
            torch.tensor([ring]))


@pytest.mark.parametrize("length", [2 ** 31 + 5, 2 ** 40 + 3, 2 ** 62 + 2 ** 61 + 7, INT64_MAX],
                         ids=["2^31", "2^40", "2^62+2^61", "int64_max"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_decode_positions_up_to_int64_max(length, causal):
    # a streaming head (sinks 1, ring 4) whose row holds `length` tokens: queries with windows 1
    # and 3 and sinks 0 and 1 see exactly their keys. The visibility rule computed Sk + |pos|,
    # which wrapped around past 2**62 and made every window unlimited.
    B, D, Hq = 1, 4, 3
    gen = torch.Generator().manual_seed(4)
    ring_k = torch.randn(B, 5, D, generator=gen, dtype=F64)
    ring_v = torch.randn(B, 5, D, generator=gen, dtype=F64)
    q = torch.randn(B, 1, Hq, D, generator=gen, dtype=F64)
    window, sinks = [1, 3, 4], [0, 1, 1]
    out = torch.ops.headops.decode_attention(q, [], [], ring_k, ring_v, *ring_tables(length), causal, 0.5, None,
                                             torch.tensor([window]), torch.tensor([sinks]), None, None, None, None,
                                             None, None, 1024)
    pos = length - 1
    for h in range(Hq):
        vis = sorted(set(range(sinks[h])) | set(range(pos - window[h] + 1, pos + 1)))
        slots = [p if p < 1 else 1 + (p - 1) % 4 for p in vis]
        want = manual_attention(q[0, 0, h], ring_k[0, slots], ring_v[0, slots], vis, 0.5)
        torch.testing.assert_close(out[0, 0, h], want, atol=1e-12, rtol=1e-12, msg=lambda m: f"head {h}: {m}")


def test_forward_positions_with_huge_windows_are_unlimited():
    # windows and sinks at the int32 and int64 limits behave as unlimited (no wrap-around in
    # the visibility rule), causal and not
    q, k, v = (torch.randn(1, 9, 4, 8, dtype=F64) for _ in range(3))
    huge = torch.tensor([INT32_MAX, INT32_MAX + 1, INT64_MAX, INT64_MAX - 1])
    for causal in (True, False):
        want = headops.attention(q, k, v, causal=causal)
        torch.testing.assert_close(headops.attention(q, k, v, causal=causal, window=huge), want, atol=1e-12, rtol=0)
        torch.testing.assert_close(headops.attention(q, k, v, causal=causal, window=1, sinks=huge), want,
                                   atol=1e-12, rtol=0)


# ------------------------------------------------ 3. a streaming cache for a very long time


def encode(positions, D):
    """Token values that spell their position exactly in float32: (p >> 16, p & 0xffff, ...)."""
    p = torch.as_tensor(positions, dtype=torch.int64)
    cols = [(p >> 16).to(F32), (p & 0xFFFF).to(F32)]
    cols += [((p * (c + 3)) % 7).to(F32) - 3 for c in range(D - 2)]
    return torch.stack(cols, -1)


def decode_position(row):
    return (int(row[0]) << 16) + int(row[1])


def streaming_cache(window, sinks, max_step=1, D=4):
    return headops.HeadSparseCache(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=D, kinds="streaming",
                                   window=window, sinks=sinks, max_step=max_step, dtype=F32)


def check_ring(cache, D, marker_ranges=()):
    """The sinks and ring slots hold exactly the tokens of the positions they should."""
    st = cache._layers[0]
    L = int(st.lengths[0])
    s, r, off = int(st.ring_sinks[0]), int(st.ring_size[0]), int(st.ring_offset[0])
    kept = list(range(min(s, L))) + list(range(max(s, L - r), L))
    assert cache._layers[0].kept_positions(0, 0).tolist() == kept
    for p in kept:
        slot = off + (p if p < s else s + (p - s) % r)
        if any(a <= p < b for a, b in marker_ranges):
            continue
        assert decode_position(st.ring_k[0, slot]) == p, f"slot of position {p}"
        assert torch.equal(st.ring_k[0, slot], encode([p], D)[0]) and torch.equal(st.ring_v[0, slot], -encode([p], D)[0])
    return kept


def decode_and_check(cache, L, window, sinks, D, gen, steps=3, scale=2.0 ** -16):
    """Decode steps at positions L, L + 1, ...: each equals attention over the sinks and the
    window of every query head (token values from encode; keys scaled so logits stay ~1)."""
    for i in range(steps):
        p = L + i
        tok = encode([p], D).view(1, 1, 1, D)
        q = torch.randn(1, 1, 2, D, generator=gen, dtype=F64).to(F32)
        out = cache.attention(0, q, tok, -tok, softmax_scale=scale)
        for h in range(2):
            vis = sorted(set(range(sinks[h])) | set(range(p - window[h] + 1, p + 1)))
            want = manual_attention(q[0, 0, h], encode(vis, D), -encode(vis, D), vis, scale)
            # values up to 65535 (the low bits of the position): float32 rounding of the logits
            # moves the average by ~1e-2 at most; a key off by one position moves it by far more
            torch.testing.assert_close(out[0, 0, h].double(), want, atol=2e-2, rtol=1e-5,
                                       msg=lambda m: f"position {p}, head {h}: {m}")


def test_streaming_cache_survives_millions_of_ring_wraps():
    # sinks 2 + a ring of 3 slots (window 3, max_step 1); 2**24 + 1000 tokens, each with values
    # that encode its position, appended in chunks of 2**20 (the kernel writes only what stays):
    # ~5.6 million ring wraps. Then decode steps at positions past 2**24 (float32 cannot hold
    # them as one value: the positions are int64 throughout).
    D, window, sinks = 4, [3, 2], [2, 1]
    cache = streaming_cache(window, sinks, max_step=1, D=D)
    assert cache._layers[0].ring_capacity == [3]  # (the ring grows to it at the first append)
    N = 2 ** 24 + 1000
    chunk = 2 ** 20
    for p0 in range(0, N, chunk):
        pos = torch.arange(p0, min(N, p0 + chunk))
        tok = encode(pos, D).view(1, -1, 1, D)
        cache.append(0, tok, -tok)
        if p0 == 0:
            check_ring(cache, D)
    assert int(cache.seq_lengths(0)[0]) == N and N // 3 > 5_000_000
    check_ring(cache, D)
    gen = torch.Generator().manual_seed(5)
    decode_and_check(cache, N, window, sinks, D, gen)
    check_ring(cache, D)
    # decode steps one token at a time keep wrapping
    decode_and_check(cache, N + 3, window, sinks, D, gen, steps=50)
    check_ring(cache, D)


def test_streaming_cache_positions_past_2_31():
    # 2**31 tokens of one constant value (a stride-0 view: no memory) between real tokens, then
    # real tokens and decode steps at positions past 2**31; the ring has max_step - 1 spare slots.
    # (Head dim 2: each decode step of the cache currently reserves B * Sk * Hkv * D elements,
    # see test_streaming_decode_at_long_lengths_allocates_nothing_dense.)
    D, window, sinks = 2, [3, 2], [2, 1]
    cache = streaming_cache(window, sinks, max_step=2, D=D)
    head = encode(torch.arange(10), D).view(1, -1, 1, D)
    cache.append(0, head, -head)
    marker = torch.full((1, 1, 1, D), 7.0)
    cache.append(0, marker.expand(1, 2 ** 31, 1, D), marker.expand(1, 2 ** 31, 1, D))
    L = 10 + 2 ** 31
    tail = encode(torch.arange(L, L + 6), D).view(1, -1, 1, D)
    cache.append(0, tail, -tail)
    L += 6
    assert int(cache.seq_lengths(0)[0]) == L > 2 ** 31
    check_ring(cache, D)
    gen = torch.Generator().manual_seed(6)
    decode_and_check(cache, L, window, sinks, D, gen)
    check_ring(cache, D)


def test_streaming_decode_at_long_lengths_allocates_nothing_dense():
    # a streaming-only cache holds sinks + window tokens whatever the length; a decode step at
    # position 2**24 must not need memory in proportion to the length
    Hq, Hkv, D = 32, 8, 128
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds="streaming",
                                    window=64, sinks=4, dtype=F32)
    filler = torch.zeros(1, 1, Hkv, D).expand(1, 2 ** 24, Hkv, D)
    cache.append(0, filler, filler)
    q, k = torch.randn(1, 1, Hq, D), torch.randn(1, 1, Hkv, D)
    with resident_growth_below(100):
        out = cache.attention(0, q, k, k)
    assert torch.isfinite(out).all()


# ------------------------------------------------------ 4. budget heads at long lengths


def budget_cache(budget, recent, sinks, D=4, max_step=3):
    return headops.HeadSparseCache(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=D, kinds="budget",
                                   window=-1, sinks=sinks, budget=budget, budget_recent=recent, max_step=max_step,
                                   dtype=F32)


def check_budget(cache, budget, recent, kept_sinks, D, marker_ranges=()):
    st = cache._layers[0]
    L = int(st.lengths[0])
    pos = st.slot_pos[0]
    kept = pos[pos >= 0]
    assert kept.numel() == min(budget, L), f"{kept.numel()} tokens kept at length {L}"
    assert kept.unique().numel() == kept.numel() and int(kept.min()) >= 0 and int(kept.max()) < L
    assert set(range(min(kept_sinks, L))) <= set(kept.tolist()), "a sink was evicted"
    assert set(range(max(0, L - recent), L)) <= set(kept.tolist()), "a recent token was evicted"
    for slot in torch.nonzero(pos >= 0).flatten().tolist():
        p = int(pos[slot])
        if any(a <= p < b for a, b in marker_ranges):
            assert torch.equal(st.ring_k[0, slot], torch.full((D,), 7.0))
        else:
            assert decode_position(st.ring_k[0, slot]) == p, f"slot {slot} holds position {p}'s token?"
            assert torch.equal(st.ring_v[0, slot], -encode([p], D)[0])
    mass = st.slot_mass[0][pos >= 0]
    assert torch.isfinite(mass).all() and bool((mass >= 0).all())
    return sorted(kept.tolist())


def budget_step_reference(cache, q, L, D, scale, marker_ranges=()):
    """Attention of the query at position L - 1 over exactly the kept tokens."""
    kept = cache._layers[0].kept_positions(0, 0).tolist()
    keys = torch.stack([torch.full((D,), 7.0) if any(a <= p < b for a, b in marker_ranges) else encode([p], D)[0]
                        for p in kept])
    vals = torch.stack([torch.full((D,), 7.0) if any(a <= p < b for a, b in marker_ranges) else -encode([p], D)[0]
                        for p in kept])
    return torch.stack([manual_attention(q[0, 0, h], keys, vals, kept, scale) for h in range(q.shape[2])])


def test_budget_heads_keep_exactly_their_budget_over_many_steps():
    # budget 16 (sinks 2, recent 4): a 3000-token prompt (SnapKV selection), 1500 decode steps of
    # 1-3 tokens, a 2**20-token append, 2**24 tokens of a constant (stride-0 view) and more
    # decode steps past position 2**24: after every call exactly 16 tokens are kept, the sinks and
    # the 4 latest among them, each slot holding its position's token; decode equals attention
    # over the kept set.
    D, budget, recent, sinks = 4, 16, 4, [2, 1]
    scale = 2.0 ** -16
    cache = budget_cache(budget, recent, sinks, D)
    gen = torch.Generator().manual_seed(7)
    S = 3000
    q = torch.randn(1, S, 2, D, generator=gen, dtype=F64).to(F32)
    tok = encode(torch.arange(S), D).view(1, S, 1, D)
    cache.attention(0, q, tok, -tok, softmax_scale=scale)
    check_budget(cache, budget, recent, 2, D)
    L, i = S, 0
    while L < S + 3000:
        n = 1 + i % 3
        tok = encode(torch.arange(L, L + n), D).view(1, n, 1, D)
        qs = torch.randn(1, n, 2, D, generator=gen, dtype=F64).to(F32)
        out = cache.attention(0, qs, tok, -tok, softmax_scale=scale)
        L += n
        i += 1
        check_budget(cache, budget, recent, 2, D)
        if n == 1 and i % 100 == 1:
            torch.testing.assert_close(out[0, 0].double(), budget_step_reference(cache, qs, L, D, scale),
                                       atol=2e-2, rtol=1e-5)
    # a long append (evictions inside one kernel call), then 2**24 constant tokens
    tok = encode(torch.arange(L, L + 2 ** 20), D).view(1, -1, 1, D)
    cache.append(0, tok, -tok)
    L += 2 ** 20
    check_budget(cache, budget, recent, 2, D)
    marker = torch.full((1, 1, 1, D), 7.0).expand(1, 2 ** 24, 1, D)
    cache.append(0, marker, marker)
    markers = [(L, L + 2 ** 24)]
    L += 2 ** 24
    check_budget(cache, budget, recent, 2, D, markers)
    for _ in range(20):
        tok = encode([L], D).view(1, 1, 1, D)
        qs = torch.randn(1, 1, 2, D, generator=gen, dtype=F64).to(F32)
        out = cache.attention(0, qs, tok, -tok, softmax_scale=scale)
        L += 1
        kept = check_budget(cache, budget, recent, 2, D, markers)
        assert kept[-1] == L - 1 > 2 ** 24
        torch.testing.assert_close(out[0, 0].double(), budget_step_reference(cache, qs, L, D, scale, markers),
                                   atol=2e-2, rtol=1e-5)


# ------------------------------------------------------ 5. a cache past its max_length


@pytest.mark.parametrize("kinds", ["full", ["full", "streaming"], ["budget", "full"]])
def test_a_cache_past_max_length_raises_and_changes_nothing(kinds):
    Hq, Hkv, D = 4, 2, 8
    kw = dict(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, kinds=kinds, window=[-1, -1, 4, 4],
              sinks=1, budget=6, budget_recent=2, dtype=torch.float64, max_length=10)
    if kinds == ["budget", "full"]:
        kw["window"] = [-1, -1, -1, -1]
    cache = headops.HeadSparseCache(**kw)
    x = lambda S, H: torch.randn(1, S, H, D, dtype=torch.float64)  # noqa: E731
    cache.attention(0, x(8, Hq), x(8, Hkv), x(8, Hkv))
    cache.attention(0, x(2, Hq), x(2, Hkv), x(2, Hkv))  # exactly max_length
    nbytes, lengths = cache.nbytes(), cache.seq_lengths().clone()
    for call in (lambda: cache.attention(0, x(1, Hq), x(1, Hkv), x(1, Hkv)),
                 lambda: cache.append(0, x(1, Hkv), x(1, Hkv))):
        with pytest.raises(ValueError, match="max_length = 10"):
            call()
        assert torch.equal(cache.seq_lengths(), lengths) and cache.nbytes() == nbytes
    fresh = headops.HeadSparseCache(**dict(kw, batch_size=2))
    with pytest.raises(ValueError, match="max_length"):
        fresh.attention(0, torch.randn(2, 11, Hq, D, dtype=torch.float64), x(11, Hkv).expand(2, -1, -1, -1),
                        x(11, Hkv).expand(2, -1, -1, -1), lengths=[11, 3])
    out = fresh.attention(0, torch.randn(2, 11, Hq, D, dtype=torch.float64), x(11, Hkv).expand(2, -1, -1, -1),
                          x(11, Hkv).expand(2, -1, -1, -1), lengths=[10, 3])  # rows hold 10 and 3
    assert out.shape == (2, 11, Hq, D) and fresh.get_seq_length() == 10


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_max_length_must_be_a_positive_int(bad):
    with pytest.raises((ValueError, TypeError), match="max_length"):
        headops.HeadSparseCache(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, max_length=bad)
