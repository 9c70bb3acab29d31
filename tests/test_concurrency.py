"""Concurrency and determinism of the CPU kernels (issue 8, "Reliability", item 4).

1. headops.attention (forward, and forward + backward through autograd) called from several
   Python threads at once gives bitwise the results of the same calls made one after another.
   The calls mix dtypes (float32, bfloat16, float16, float64), GQA/MQA, streaming heads
   (window + sinks), alpha, gates (exact zeros), key_bias, sink logits and the epilogue.
2. Decoding on separate HeadSparseCache objects from several threads at once equals the
   serial runs bitwise: outputs, storages and the budget heads' positions and masses.
3. Bitwise run-to-run determinism for a fixed thread count (1 and 2; the previous count is
   restored), and independence of the thread count, where tests/test_attention_cpu.py and
   tests/test_autograd.py do not already cover it: the forward in bfloat16 and float16 (the
   packed brgemm path) and float32 run to run, with every per-head feature; the decode kernel
   with split_keys (split-K partials merged per row) over full, streaming and budget heads.
4. Two generation streams do not mix: two caches interleaved step by step, and two batch rows
   of one cache, each equal a run of that stream alone (bitwise).

The kernels promise (docs/kernels.md, "How the CPU kernel works") that every work item writes only its
own outputs and that partials are merged in a fixed order, so none of this may depend on which
thread ran what. The Python threads really overlap: torch.ops calls release the GIL.
"""

import threading
import time

import pytest
import torch

import headops

from conftest import ALL_FEATURES as ALL, head_params, make_qkv

F64 = torch.float64
THREADS = 4


# ------------------------------------------------------------------------------- helpers


def run_concurrently(jobs, threads=THREADS):
    """Runs the callables `jobs` on `threads` Python threads at once (started together by a
    barrier; thread t runs jobs t, t + threads, ...). Returns their results in job order and
    re-raises the first exception of any thread."""
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(threads)

    def worker(t):
        try:
            barrier.wait()
            for i in range(t, len(jobs), threads):
                results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in pool), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def assert_bitwise(got, want, what):
    """Nested lists/tuples/dicts of tensors equal bitwise (NaN compared by bits too)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for n in want:
            assert_bitwise(got[n], want[n], f"{what}[{n}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bitwise(g, w, f"{what}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        same = torch.equal(bits(got), bits(want))
        assert same, f"{what}: not bitwise equal (max |diff| {(got.double() - want.double()).abs().max().item():.3e})"
    else:
        assert got == want, what


def bits(t):
    """The bytes of a tensor (NaN, -0.0 and every other value compared by its bits)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class thread_count:
    """with thread_count(n): torch's intra-op thread count n, the previous one restored."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


# (B, Sq, Sk, Hq, Hkv, D), dtype, features: a mix of what the forward's paths see
CASES = [
    ((2, 130, 300, 4, 2, 64), torch.float32, ALL),
    ((1, 200, 200, 8, 2, 64), torch.bfloat16, ALL),
    ((2, 70, 150, 4, 1, 32), torch.float64, ALL + ["alpha"]),
    ((1, 257, 257, 4, 4, 128), torch.bfloat16, ["window", "sinks", "gate"]),  # streaming heads beside full ones
    ((2, 64, 400, 6, 3, 80), torch.float16, ALL),
    ((1, 300, 300, 4, 2, 48), torch.float32, ["window", "sinks", "alpha", "gate"]),  # DuoAttention mix
    ((2, 33, 97, 4, 2, 33), torch.bfloat16, ALL + ["alpha"]),  # odd head dim: the converted path
    ((1, 1, 500, 8, 1, 64), torch.float32, ["window", "sinks", "key_bias"]),  # MQA decode-like row
]
CASE_IDS = [f"{str(dt).split('.')[-1]}-Hq{s[3]}-Hkv{s[4]}-D{s[5]}-{len(f)}feat" for s, dt, f in CASES]


def make_case(i, *, per_batch=None):
    """Inputs of CASES[i] (drawn from a seed of their own, so every test sees the same data)."""
    shape, dtype, features = CASES[i]
    B, Sq, Sk, Hq, Hkv, D = shape
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(1000 + i)
        layout = "bhsd" if i % 3 == 2 else "bshd"
        q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, layout, strided=i % 2 == 1)
        kw = head_params(B, Hq, Sk, D, features, per_batch=(i % 4 == 3) if per_batch is None else per_batch)
    kw["layout"] = layout
    return q, k, v, kw


def forward(case):
    q, k, v, kw = case
    if "alpha" in kw:
        return headops.attention(q, k, v, **kw)
    return headops.attention(q, k, v, return_lse=True, **kw)


def forward_backward(case, dout_seed):
    """out and the gradients of sum(out * dout) in q, k, v and every floating per-head tensor."""
    q, k, v, kw = case
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    kw = {n: (t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t) for n, t in kw.items()}
    out = headops.attention(q, k, v, **kw)
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)
    named = {"q": q, "k": k, "v": v, **{n: t for n, t in kw.items() if isinstance(t, torch.Tensor) and t.requires_grad}}
    grads = torch.autograd.grad(out, list(named.values()), dout)
    return out.detach(), dict(zip(named, grads))


# ------------------------------------------------------------- 1. concurrent attention calls


def test_ops_release_the_gil():
    # the tests below only mean something if the Python threads really overlap: a pure-Python
    # thread keeps counting while the forward runs (one intra-op thread: a core is left for it),
    # at a rate comparable to its rate while the main thread sleeps. Were the GIL held during the
    # op, it would count only during the few milliseconds of Python validation.
    q = torch.randn(1, 4096, 8, 64)
    counts, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            counts[0] += 1

    def rate(fn):
        before, t0 = counts[0], time.perf_counter()
        fn()
        return (counts[0] - before) / (time.perf_counter() - t0)

    with thread_count(1):
        headops.attention(q, q, q)  # warm-up
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            sleeping = rate(lambda: time.sleep(0.2))
            during_op = rate(lambda: headops.attention(q, q, q))
        finally:
            stop.set()
            spinner.join()
    print(f"spin rate during the op / while sleeping: {during_op / sleeping:.2f}")
    assert during_op > 0.15 * sleeping, f"Python ran at {during_op:.0f}/s during the op, {sleeping:.0f}/s idle"


def test_concurrent_forward_equals_serial():
    cases = [make_case(i) for i in range(len(CASES))]
    serial = [forward(c) for c in cases]
    # every case twice, the second copy in reverse order: each thread mixes dtypes and shapes
    order = list(range(len(cases))) + list(reversed(range(len(cases))))
    got = run_concurrently([lambda i=i: forward(cases[i]) for i in order])
    for n, i in enumerate(order):
        assert_bitwise(got[n], serial[i], f"call {n} ({CASE_IDS[i]})")


def test_concurrent_forward_backward_equals_serial():
    # float16 forward + backward is in the list too; every floating per-head argument takes a gradient
    picks = [0, 1, 2, 4, 5, 6]
    cases = {i: make_case(i) for i in picks}
    serial = {i: forward_backward(cases[i], 7 + i) for i in picks}
    order = picks + picks[::-1]
    got = run_concurrently([lambda i=i: forward_backward(cases[i], 7 + i) for i in order])
    for n, i in enumerate(order):
        out, grads = got[n]
        assert_bitwise(out, serial[i][0], f"out of call {n} ({CASE_IDS[i]})")
        assert_bitwise(grads, serial[i][1], f"grads of call {n} ({CASE_IDS[i]})")
        assert set(grads) >= {"q", "k", "v"}


def test_concurrent_calls_at_one_intra_op_thread():
    # the same with torch.set_num_threads(1): each Python thread runs its items itself
    cases = [make_case(i) for i in (0, 1, 4)]
    with thread_count(1):
        serial = [forward(c) for c in cases]
        got = run_concurrently([lambda c=c: forward(c) for c in cases * 3], threads=3)
    for n, res in enumerate(got):
        assert_bitwise(res, serial[n % len(cases)], f"call {n}")


# ---------------------------------------------------------------------- 2. concurrent decode


# per KV head kinds and per query head windows / sinks of the decode streams (Hq 6, Hkv 3)
DECODE_SPEC = dict(kinds=["full", "streaming", "budget"], window=[-1, 40, 7, 5, -1, -1], sinks=[0, 3, 2, 0, 1, 2],
                   budget=[None, None, 24], budget_recent=4)


def decode_stream(seed, *, dtype=F64, B=1, S=90, steps=(1, 2, 1, 3, 1, 1, 2, 1, 3, 1, 1, 2, 1, 1),
                  split_keys=32, data=None, lengths=None, **args):
    """A cache (full, streaming and budget KV heads) fed a prompt of S tokens, then the steps.
    Returns (outputs of every call, final storages and tables of the layer)."""
    Hq, Hkv, D = 6, 3, 16
    N = S + sum(steps)
    if data is None:
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, N, h, D, generator=gen, dtype=F64).to(dtype) for h in (Hq, Hkv, Hkv))
    else:
        q, k, v = data
    if not args and seed % 2:
        gen = torch.Generator().manual_seed(seed + 1)
        args = dict(gate=torch.tensor([1.0, 0.0, -0.5, 2.0, 1.0, 0.7], dtype=F64),
                    sink_logit=torch.randn(Hq, generator=gen, dtype=F64),
                    softmax_scale=torch.rand(Hq, generator=gen, dtype=F64) + 0.1)
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, batch_size=B,
                                    dtype=dtype, max_step=3, split_keys=split_keys, **DECODE_SPEC)
    outs = [cache.attention(0, q[:, :S], k[:, :S], v[:, :S], lengths=lengths, **args)]
    p = S
    for n in steps:
        outs.append(cache.attention(0, q[:, p:p + n], k[:, p:p + n], v[:, p:p + n], **args))
        p += n
    return outs, layer_state(cache)


def layer_state(cache):
    """Everything the layer holds (internal state): the full heads' written tokens (the
    segments' unwritten capacity is uninitialised memory), the streaming/budget storage, the
    lengths and the budget heads' slot positions and masses."""
    st = cache._layers[0]
    n = int(st.lengths.max())
    return dict(full_k=torch.cat(st.full_k, 2)[:, :, :n].clone(), full_v=torch.cat(st.full_v, 2)[:, :, :n].clone(),
                ring_k=st.ring_k.clone(), ring_v=st.ring_v.clone(), lengths=st.lengths.clone(),
                slot_pos=st.slot_pos.clone(), slot_mass=st.slot_mass.clone())


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_concurrent_decode_on_separate_caches_equals_serial(dtype):
    seeds = list(range(8))
    serial = [decode_stream(s, dtype=dtype) for s in seeds]
    got = run_concurrently([lambda s=s: decode_stream(s, dtype=dtype) for s in seeds])
    for s in seeds:
        assert_bitwise(got[s], serial[s], f"stream {s}")


# ------------------------------------------------------------------- 3. determinism


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("features", [ALL, ALL + ["alpha"]], ids=["all", "all+alpha"])
def test_forward_bitwise_deterministic_per_thread_count(dtype, features):
    # several query tiles and key blocks, GQA, per-batch parameters; the packed (brgemm) path
    # for 16-bit dtypes at D = 64
    B, Sq, Sk, Hq, Hkv, D = 2, 300, 700, 4, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, strided=True)
    kw = head_params(B, Hq, Sk, D, features, per_batch=True)
    results = {}
    for n in (1, 2):
        with thread_count(n):
            first = headops.attention(q, k, v, return_lse="alpha" not in features, **kw)
            second = headops.attention(q, k, v, return_lse="alpha" not in features, **kw)
        assert_bitwise(second, first, f"{n} thread(s): run to run")
        results[n] = first
    assert_bitwise(results[2], results[1], "1 vs 2 threads")


def test_float16_backward_bitwise_deterministic_per_thread_count():
    # tests/test_autograd.py covers float32, bfloat16 and float64; float16 here, every feature
    B, Sq, Sk, Hq, Hkv, D = 2, 200, 300, 4, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.float16)
    kw = head_params(B, Hq, Sk, D, ALL + ["alpha"])
    case = (q, k, v, kw)
    results = {}
    for n in (1, 2):
        with thread_count(n):
            first = forward_backward(case, 11)
            second = forward_backward(case, 11)
        assert_bitwise(second, first, f"{n} thread(s): run to run")
        results[n] = first
    assert_bitwise(results[2], results[1], "1 vs 2 threads")


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("split_keys", [17, 64, 1024])
def test_decode_bitwise_deterministic_per_thread_count(dtype, split_keys):
    # a 300-token prompt: with split_keys 17 the full head's keys are ~18 items whose partial
    # softmaxes are merged per row; budget heads' masses are updated by every step
    results = {}
    for n in (1, 2):
        with thread_count(n):
            first = decode_stream(3, dtype=dtype, B=2, S=300, split_keys=split_keys)
            second = decode_stream(3, dtype=dtype, B=2, S=300, split_keys=split_keys)
        assert_bitwise(second, first, f"{n} thread(s): run to run")
        results[n] = first
    assert_bitwise(results[2], results[1], "1 vs 2 threads")


# ------------------------------------------------------------ 4. streams do not mix


def stream_data(seed, B, N, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, N, h, 16, generator=gen, dtype=F64).to(dtype) for h in (6, 3, 3))


STEPS = (1, 2, 1, 3, 1, 1, 2, 1, 3, 1, 1, 2, 1, 1, 3, 3, 1)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
def test_two_caches_interleaved_equal_each_alone(dtype):
    # two generation streams of different prompt lengths, stepped alternately (A, B, A, B, ...),
    # then compared with each stream run alone on a fresh cache
    S = {0: 70, 1: 150}
    N = {i: S[i] + sum(STEPS) for i in S}
    data = {i: stream_data(10 + i, 1, N[i], dtype) for i in S}
    args = {0: {}, 1: dict(gate=torch.tensor([0.5, 1.0, 0.0, 1.0, 2.0, 1.0], dtype=F64))}
    alone = {i: decode_stream(0, dtype=dtype, S=S[i], steps=STEPS, data=data[i], **args[i]) for i in S}

    caches = {i: headops.HeadSparseCache(num_layers=1, num_heads=6, num_kv_heads=3, head_dim=16, dtype=dtype,
                                         max_step=3, split_keys=32, **DECODE_SPEC) for i in S}
    outs = {i: [] for i in S}
    pos = dict(S)
    for i in S:
        q, k, v = data[i]
        outs[i].append(caches[i].attention(0, q[:, :S[i]], k[:, :S[i]], v[:, :S[i]], **args[i]))
    for n in STEPS:
        for i in S:
            q, k, v = data[i]
            p = pos[i]
            outs[i].append(caches[i].attention(0, q[:, p:p + n], k[:, p:p + n], v[:, p:p + n], **args[i]))
            pos[i] += n
    for i in S:
        assert_bitwise(outs[i], alone[i][0], f"stream {i}: outputs")
        assert_bitwise(layer_state(caches[i]), alone[i][1], f"stream {i}: storage")


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_two_batch_rows_equal_each_alone(dtype):
    # rows 0 and 1 of one cache hold two streams (same prompt length: the full storage is then
    # laid out alike, so the decode's key ranges and summation order are the same) and take
    # per-batch gates; each row equals a batch-1 cache fed that row alone
    S, N = 120, 120 + sum(STEPS)
    q, k, v = stream_data(20, 2, N, dtype)
    gate = torch.tensor([[1.0, 0.5, 0.0, 1.0, 2.0, 1.0], [0.0, 1.0, 1.0, -1.0, 1.0, 0.3]], dtype=F64)
    both_outs, both_state = decode_stream(0, dtype=dtype, B=2, S=S, steps=STEPS, data=(q, k, v), gate=gate)
    for b in range(2):
        outs, state = decode_stream(0, dtype=dtype, B=1, S=S, steps=STEPS,
                                    data=(q[b:b + 1], k[b:b + 1], v[b:b + 1]), gate=gate[b:b + 1])
        assert_bitwise([o[b:b + 1] for o in both_outs], outs, f"row {b}: outputs")
        row = {n: x[b:b + 1] for n, x in both_state.items()}
        assert_bitwise(row, state, f"row {b}: storage")


def test_two_batch_rows_of_different_lengths_equal_each_alone():
    # prompts of different lengths (lengths=): the rows' full storages are segmented differently
    # from a batch-1 cache's, so split-K ranges (and the summation order) may differ: float64
    # agreement to rounding, and the kept positions and the budget selection exactly
    S, N = 140, 140 + sum(STEPS)
    lengths = [140, 95]
    q, k, v = stream_data(30, 2, N)
    # row 1's tokens after its prompt start at 95: shift its data so both rows step together
    both = decode_stream(0, B=2, S=S, steps=STEPS, data=(q, k, v), lengths=lengths)
    both_outs, both_state = both
    for b, n in enumerate(lengths):
        idx = torch.cat([torch.arange(n), torch.arange(S, N)])
        qb, kb, vb = (t[b:b + 1, idx] for t in (q, k, v))
        outs, state = decode_stream(0, B=1, S=n, steps=STEPS, data=(qb, kb, vb))
        torch.testing.assert_close(both_outs[0][b:b + 1, :n], outs[0], atol=1e-12, rtol=1e-12)
        assert (both_outs[0][b, n:] == 0).all()
        for i, (o_both, o) in enumerate(zip(both_outs[1:], outs[1:])):
            torch.testing.assert_close(o_both[b:b + 1], o, atol=1e-12, rtol=1e-12, msg=lambda m: f"step {i}: {m}")
        assert int(both_state["lengths"][b]) == int(state["lengths"][0])
        # the budget head keeps the same positions (its selection and its masses agree)
        pos_both, pos = both_state["slot_pos"][b], state["slot_pos"][0]
        assert sorted(pos_both[pos_both >= 0].tolist()) == sorted(pos[pos >= 0].tolist())
