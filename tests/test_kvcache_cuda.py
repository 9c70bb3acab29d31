"""headops.HeadSparseCache on CUDA tensors (csrc/kvcache/cuda/: kv_append and decode_attention)
against the same cache on the CPU.

Each case builds the same cache twice, on the device under test and on the CPU, feeds both the
same rounded inputs (a prompt, then decode steps of one or several tokens) and compares every
step's output and the state the kernels write: what each head keeps (streaming rings, budget
heads' slot positions and attention masses) and the compensation sums. The CPU op is itself
tested against headops.attention over the whole sequence (tests/test_kvcache.py), so agreement
with it is agreement with the contract. Full, streaming, budget and compensated heads, GQA
(groups larger than the kernel's 16-row chunk too), split-K over long full heads, every
per-head argument, heads gated off, head dims that are not a multiple of 32, float32, bfloat16
and float16.

Skipped without a GPU. HEADOPS_TEST_CUDA_DEVICE=cpu runs the file on the CPU kernels (a dry run
of the tests themselves); the GPU-specific tests (CUDA graph capture, no synchronisation) then
skip. Run on an H200 (bench/gpu_suite.sh, 2026-12-04), all passing (the key-split decode kernel
too, which then replaced the first one).
"""

import math

import pytest
import torch

import headops

from conftest import CUDA_DRY_RUN, CUDA_TEST_DEVICE, gpu_only, needs_cuda, tiny_llama_twins

CUDA, DRY_RUN = CUDA_TEST_DEVICE, CUDA_DRY_RUN
pytestmark = needs_cuda

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# device output against the CPU op on the same rounded inputs (both accumulate in float32)
TOL = {F32: (2e-5, 2e-5), BF16: (2e-2, 2e-2), F16: (3e-3, 3e-3)}


def synchronize():
    if not DRY_RUN:
        torch.cuda.synchronize()


def make_pair(**kw):
    """The same cache on the device under test and on the CPU."""
    return (headops.HeadSparseCache(device=CUDA, **kw), headops.HeadSparseCache(device="cpu", **kw))


def draw(shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def per_head(names, B, Hq, D, N, g, *, gate_zero=None):
    """Per-head arguments (float32 on the CPU): softmax_scale, sink_logit, out_scale, out_bias,
    gate (head `gate_zero` gated off exactly), key_bias over N positions."""
    out = {}
    if "softmax_scale" in names:
        out["softmax_scale"] = 0.05 + torch.rand(B, Hq, generator=g, dtype=torch.float64).float() * 0.3
    if "sink_logit" in names:
        out["sink_logit"] = draw((Hq,), F32, g)
    if "out_scale" in names:
        out["out_scale"] = draw((Hq, D), F32, g)
    if "out_bias" in names:
        out["out_bias"] = draw((B, Hq, D), F32, g)
    if "gate" in names:
        gate = torch.rand(B, Hq, generator=g, dtype=torch.float64).float() + 0.5
        if gate_zero is not None:
            gate[:, gate_zero] = 0.0
        out["gate"] = gate
    if "key_bias" in names:
        out["key_bias"] = draw((B, Hq, N), F32, g, 0.5)
    return out


def state(cache, layer=0):
    """What the kernels wrote: per (row, KV head) the kept positions, keys and values, and the
    budget heads' masses and the compensation sums (on the CPU)."""
    st = cache._layers[layer]
    out = {}
    for b in range(len(st.held)):
        for h in range(cache.num_kv_heads):
            pos, k, v = st.kept_kv(b, h)
            out[(b, h)] = (pos.cpu(), k.cpu(), v.cpu())
    if st.slot_pos is not None:
        out["slot_pos"] = st.slot_pos.cpu()
        out["slot_mass"] = st.slot_mass.cpu()
    if st.comp_k is not None:
        out["comp"] = (st.comp_k.cpu(), st.comp_v.cpu(), st.comp_n.cpu())
    return out


def run_pair(cache_kw, *, B, Hq, Hkv, D, S, steps, dtype, names=(), gate_zero=None, seed=0, alpha=None,
             compare_state=True):
    g = torch.Generator().manual_seed(seed)
    N = S + sum(steps)
    q, k, v = (draw((B, N, H, D), dtype, g) for H in (Hq, Hkv, Hkv))
    args = per_head(names, B, Hq, D, N, g, gate_zero=gate_zero)
    if alpha is not None:
        args["alpha"] = alpha
    dev, cpu = make_pair(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, batch_size=B, dtype=dtype,
                         **cache_kw)
    p = 0
    atol, rtol = TOL[dtype]
    for n in [S] + list(steps):
        kw = dict(args)
        if "key_bias" in kw:
            kw["key_bias"] = kw["key_bias"][..., :p + n]
        sl = slice(p, p + n)
        want = cpu.attention(0, q[:, sl], k[:, sl], v[:, sl], **kw)
        got = dev.attention(0, q[:, sl].to(CUDA), k[:, sl].to(CUDA), v[:, sl].to(CUDA),
                            **{name: t.to(CUDA) for name, t in kw.items()})
        synchronize()
        assert got.device.type == torch.device(CUDA).type and got.dtype == dtype
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"step at position {p} ({n} tokens): {m}")
        p += n
    if compare_state:
        assert_same_state(dev, cpu)
    return dev, cpu


def assert_same_state(dev, cpu):
    got, want = state(dev), state(cpu)
    assert got.keys() == want.keys()
    for key in want:
        if key == "slot_mass":
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)
        elif key == "comp":
            for x, y in zip(got[key], want[key]):  # the same float64 sums, in the same order
                assert torch.equal(x, y)
        else:
            for x, y in zip(got[key], want[key]):
                assert torch.equal(x, y), key


DTYPES = [F32, BF16, F16]
ALL = ("softmax_scale", "sink_logit", "out_scale", "out_bias", "gate", "key_bias")

# ---------------------------------------------------------------------------------- full heads


@pytest.mark.parametrize("dtype", DTYPES)
# 7 and 12 (2-byte rows of 24 bytes): rows the kernel copies element by element (not on 16 bytes);
# 7, 66, 130, 144: a lane's slice of the value row reaching past D (144: 8 accumulators a lane)
@pytest.mark.parametrize("D", [7, 8, 12, 40, 64, 66, 128, 130, 144])
def test_full_heads_gqa(dtype, D):
    run_pair(dict(kinds="full", max_step=4), B=2, Hq=8, Hkv=2, D=D, S=37, steps=[1, 3, 1, 4], dtype=dtype,
             names=ALL, gate_zero=3, seed=D)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_full_heads_split_keys_and_windows(dtype):
    """Long full heads split into ranges of split_keys (several CTAs and a merge), query heads
    with windows and sinks on full KV heads (the walk is the group's union), alpha mixing."""
    B, Hq, Hkv, D = 2, 6, 3, 64
    window = [-1, 30, 5, -1, 70, 1]
    sinks = [0, 4, 2, 0, 0, 3]
    alpha = torch.tensor([0.0, 0.25, 1.0, 0.5, 0.75, 0.3])
    run_pair(dict(kinds="full", window=window, sinks=sinks, max_step=3, split_keys=48), B=B, Hq=Hq, Hkv=Hkv, D=D,
             S=300, steps=[1, 2, 3, 1], dtype=dtype, names=ALL, alpha=alpha)


def test_full_heads_many_tiles_per_warp():
    """One split of 700 keys (split_keys given: None would choose 128 on a GPU): 22 tiles of 32,
    several per warp, whose partials are merged in the CTA."""
    run_pair(dict(kinds="full", max_step=2, split_keys=1024), B=1, Hq=8, Hkv=2, D=128, S=700, steps=[1, 2, 1],
             dtype=BF16, names=("softmax_scale", "sink_logit", "gate"), gate_zero=6, seed=5)


def test_three_row_groups():
    """12 rows (4 query heads on one KV head, 3 new tokens) over splits of 64 keys in float32 at
    D = 256: 3 warps, one row group each."""
    run_pair(dict(kinds="full", max_step=3, split_keys=64), B=1, Hq=4, Hkv=1, D=256, S=150, steps=[3, 1, 3],
             dtype=F32, names=("softmax_scale", "gate"), seed=23)


def test_full_heads_head_dim_256():
    """The largest head dim: 8 accumulators per lane, shared memory past 48 KiB (opted in); the
    kernel with two warps (the 2 tiles of split_keys=64; four would need 262 KiB)."""
    run_pair(dict(kinds="full", max_step=2, split_keys=64), B=1, Hq=4, Hkv=1, D=256, S=150, steps=[1, 2],
             dtype=F32, names=("softmax_scale", "out_bias"))


@pytest.mark.parametrize("dtype", [F32, BF16])
# 257: the lanes' 16-column slices reaching past D, bf16 rows (514 bytes) copied element by element;
# 264 float32: a value row of 1056 bytes that the last lane's 64-byte slice needs rounded up to 1088
@pytest.mark.parametrize("D", [257, 264, 512])
def test_head_dims_past_256(dtype, D):
    """Gemma 4's full-attention head dim (512) and dims just past 256: the wide instantiation (16
    value columns a lane; float32 at D = 512: one warp a CTA), over full, streaming (compensated)
    and budget KV heads, a step of 3 tokens and every per-head argument."""
    run_pair(dict(kinds=["full", "streaming", "budget"], window=[-1, -1, 9, 9, -1, -1], sinks=[0, 1, 2, 2, 0, 0],
                  compensation=[None, "weighted", None], budget=[None, None, 20], budget_recent=3, max_step=3,
                  split_keys=32),
             B=2, Hq=6, Hkv=3, D=D, S=45, steps=[1, 3, 1], dtype=dtype, names=ALL, gate_zero=4, seed=D)


def test_large_gqa_group_walks_rows_in_chunks():
    """32 query heads on one KV head and 3 new tokens: 96 rows, six chunks of 16."""
    run_pair(dict(kinds="full", max_step=3, split_keys=64), B=1, Hq=32, Hkv=1, D=32, S=90, steps=[3, 1, 3],
             dtype=F32, names=ALL, gate_zero=5)


def test_whole_group_gated_off():
    gate = torch.ones(2, 4)
    gate[:, :2] = 0.0  # KV head 0's whole group
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, S = 2, 4, 2, 16, 20
    q, k, v = (draw((B, S + 2, H, D), F32, g) for H in (Hq, Hkv, Hkv))
    dev, cpu = make_pair(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, batch_size=B, dtype=F32)
    for c in (dev, cpu):
        c.attention(0, q[:, :S].to(c.device), k[:, :S].to(c.device), v[:, :S].to(c.device))
    want = cpu.attention(0, q[:, S:], k[:, S:], v[:, S:], gate=gate)
    got = dev.attention(0, q[:, S:].to(CUDA), k[:, S:].to(CUDA), v[:, S:].to(CUDA), gate=gate.to(CUDA))
    assert torch.equal(got[:, :, :2].cpu(), torch.zeros_like(got[:, :, :2].cpu()))
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- streaming heads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compensation", [None, "weighted", "unweighted"])
def test_streaming_and_full_heads_with_wrapping_rings(dtype, compensation):
    """Two full and two streaming KV heads (GQA 2), rings that wrap many times, sinks, steps of
    several tokens, compensation of what the rings evict."""
    Hkv, G = 4, 2
    kinds = ["full", "streaming", "full", "streaming"]
    window = [-1, -1, 6, 6, -1, 3, 5, 2]
    sinks = [0, 0, 2, 1, 0, 0, 3, 1]
    comp = [None, compensation, None, compensation]
    run_pair(dict(kinds=kinds, window=window, sinks=sinks, compensation=comp, max_step=3, split_keys=16),
             B=2, Hq=Hkv * G, Hkv=Hkv, D=24, S=29, steps=[1, 3, 2, 1, 3, 3, 1, 2, 1], dtype=dtype,
             names=("softmax_scale", "sink_logit", "out_scale", "gate", "key_bias"), gate_zero=7, seed=11)


def test_long_prompt_into_short_ring():
    """A prompt longer than the ring: kv_append skips what the ring would overwrite within the
    call and folds it straight from the input into the compensation."""
    run_pair(dict(kinds="streaming", window=8, sinks=2, compensation="weighted", max_step=2), B=2, Hq=2, Hkv=1,
             D=16, S=100, steps=[2, 1, 2], dtype=F32, names=("sink_logit",))


# -------------------------------------------------------------------------------- budget heads


@pytest.mark.parametrize("Sq", [1, 2])
def test_budget_heads(Sq):
    """Budget heads beside a full and a streaming one: eviction of the least attended token
    (kv_append on the device) after each step's attention mass (decode on the device)."""
    kinds = ["budget", "full", "streaming", "budget"]
    run_pair(dict(kinds=kinds, window=[-1, -1, -1, -1, 6, 6, -1, -1], sinks=[0, 1, 0, 0, 2, 0, 1, 0],
                  budget=[12, None, None, 10], budget_recent=3, max_step=2, split_keys=8),
             B=2, Hq=8, Hkv=4, D=16, S=30, steps=[Sq] * 8, dtype=F32,
             names=("softmax_scale", "sink_logit", "gate"), seed=5 + Sq)


def test_budget_heads_many_slots_and_row_chunks():
    """Budget heads of 150 slots (five tiles: several warps add attention mass) and a group of 4
    query heads with 2 new tokens (8 rows: two chunks of 4)."""
    run_pair(dict(kinds=["budget", "full"], budget=[150, None], budget_recent=4, max_step=2),
             B=2, Hq=8, Hkv=2, D=32, S=200, steps=[2, 2, 1, 2], dtype=F32,
             names=("softmax_scale", "sink_logit", "gate"), gate_zero=1, seed=17)


def test_budget_heads_with_six_rows_a_head():
    """GQA 6 with 1 or 2 new tokens (6 or 12 rows): a budget head's rows in passes of 4, the last
    one partly past the group, beside a full head whose row groups are partly empty."""
    run_pair(dict(kinds=["budget", "full"], budget=[150, None], budget_recent=4, max_step=2),
             B=2, Hq=12, Hkv=2, D=32, S=200, steps=[1, 2, 1], dtype=F32,
             names=("softmax_scale", "sink_logit"), seed=29)


def test_rings_and_budgets_larger_than_the_row():
    """A window of 200 and a budget of 150 slots over rows of 20-24 tokens: most tiles of their
    walk hold no token (walked past, in the budget's mass pass too)."""
    run_pair(dict(kinds=["streaming", "budget"], window=[200, 200, -1, -1], sinks=[2, 2, 0, 0],
                  budget=[None, 150], budget_recent=4, max_step=2),
             B=2, Hq=4, Hkv=2, D=32, S=20, steps=[1, 2, 1], dtype=F32, names=("softmax_scale",), seed=31)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_beam_reorder_row_repeats_and_reset_on_the_device_as_on_the_cpu(dtype):
    """HeadSparseCache.reorder_cache (beam search: in place, rows repeated and dropped),
    batch_repeat_interleave and reset over device storages: every later step and the state the
    kernels write as the CPU cache's after the same operations."""
    dev, cpu = make_pair(num_layers=1, num_heads=6, num_kv_heads=3, head_dim=16, kinds=["budget", "full", "streaming"],
                         window=[-1, -1, -1, -1, 5, 4], sinks=[0, 1, 0, 0, 2, 1], budget=[10, None, None],
                         budget_recent=3, compensation=[None, None, "weighted"], max_step=2)
    g = torch.Generator().manual_seed(41)
    atol, rtol = TOL[dtype]

    def steps(sizes, B):
        for n in sizes:
            q, k, v = (draw((B, n, H, 16), dtype, g) for H in (6, 3, 3))
            want = cpu.attention(0, q, k, v, softmax_scale=0.4)
            got = dev.attention(0, q.to(CUDA), k.to(CUDA), v.to(CUDA), softmax_scale=0.4)
            synchronize()
            torch.testing.assert_close(got.cpu().float(), want.float(), atol=atol, rtol=rtol)

    steps([20, 1, 2, 1, 1, 2], 3)
    ring = dev._layers[0].ring_k.data_ptr()
    cpu.reorder_cache(torch.tensor([2, 0, 0]))
    dev.reorder_cache(torch.tensor([2, 0, 0], device=CUDA))
    assert dev._layers[0].ring_k.data_ptr() == ring
    assert_same_state(dev, cpu)
    steps([1, 2, 1], 3)
    cpu.batch_repeat_interleave(2)
    dev.batch_repeat_interleave(2)
    steps([1, 1], 6)
    assert_same_state(dev, cpu)
    cpu.reset()
    dev.reset()
    steps([15, 1, 2, 1], 6)
    assert_same_state(dev, cpu)


def test_budget_heads_bfloat16_outputs():
    run_pair(dict(kinds="budget", budget=16, budget_recent=2, max_step=1), B=1, Hq=4, Hkv=2, D=64, S=40,
             steps=[1] * 6, dtype=BF16, compare_state=False)


# -------------------------------------------------------------------------- the raw ops, graphs


def decode_args(cache, q, layer=0):
    st = cache._layers[layer]
    D = cache.head_dim
    return (q, st.full_k, st.full_v, st.ring_k, st.ring_v, st.lengths, st.kv_kind, st.kv_index, st.ring_offset,
            st.ring_sinks, st.ring_size, True, 1.0 / math.sqrt(D), None, st.windows.expand(q.shape[0], -1),
            st.sinks.expand(q.shape[0], -1), None, None, None, None, None, None,
            cache.split_keys or headops.cache.SPLIT_KEYS, *st.budget_args(), *st.comp_args())


def filled_cache(B=2, Hq=4, Hkv=2, D=32, S=70, dtype=F32):
    g = torch.Generator().manual_seed(7)
    cache = headops.HeadSparseCache(num_layers=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, batch_size=B,
                                    dtype=dtype, device=CUDA, kinds=["full", "streaming"], window=[-1, -1, 9, 9],
                                    sinks=[0, 0, 2, 2], compensation=[None, "weighted"], max_step=2,
                                    split_keys=32)
    q, k, v = (draw((B, S, H, D), dtype, g).to(CUDA) for H in (Hq, Hkv, Hkv))
    cache.attention(0, q, k, v)
    cache.attention(0, q[:, :1], k[:, :1], v[:, :1])
    return cache, draw((B, 1, Hq, D), dtype, g).to(CUDA)


def test_float64_is_refused_on_cuda_or_computed_on_cpu():
    cache, q = filled_cache()
    if DRY_RUN:
        return
    with pytest.raises(RuntimeError, match="float64 is CPU only"):
        torch.ops.headops.decode_attention(*decode_args(cache, q.double()))


@gpu_only
def test_decode_step_is_capturable_in_a_cuda_graph():
    cache, q = filled_cache()
    args = decode_args(cache, q)
    eager = torch.ops.headops.decode_attention(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.headops.decode_attention(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.headops.decode_attention(*args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)
    q.copy_(torch.randn_like(q))  # a replay reads the new query
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, torch.ops.headops.decode_attention(*args), atol=0, rtol=0)


@gpu_only
def test_decode_step_does_not_synchronise():
    """A whole cache decode step (append, ring growth, decode) with a gate on the device under
    torch.cuda.set_sync_debug_mode("error"): any device-to-host synchronisation raises."""
    cache, q = filled_cache()
    g = torch.Generator().manual_seed(1)
    k, v = (draw((2, 1, 2, 32), F32, g).to(CUDA) for _ in range(2))
    gate = torch.ones(2, 4, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cache.attention(0, q, k, v, gate=gate)
        out = cache.attention(0, q, k, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@gpu_only
def test_decode_step_with_host_gate_does_not_synchronise():
    """A patched model's HeadSpec keeps its gate on the host: the cache copies it to the device once
    (headops._args.on_device) and a later step with the same gate copies nothing."""
    cache, q = filled_cache()
    g = torch.Generator().manual_seed(2)
    k, v = (draw((2, 1, 2, 32), F32, g).to(CUDA) for _ in range(2))
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0])  # on the CPU
    cache.attention(0, q, k, v, gate=gate)  # first use: the one copy (synchronising) happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cache.attention(0, q, k, v, gate=gate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


@gpu_only
def test_whole_cache_decode_step_captured_in_a_cuda_graph():
    """HeadSparseCache.attention (append, then decode) captured once and replayed once equals the
    same step run eagerly on a twin cache: output, lengths and what the streaming ring keeps. (One
    replay: the Python mirror of the lengths advances at capture, the device state at replay.)"""
    captured_cache, q = filled_cache()
    eager_cache, _ = filled_cache()
    g = torch.Generator().manual_seed(3)
    steps = [tuple(draw((2, 1, H, 32), F32, g).to(CUDA) for H in (4, 2, 2)) for _ in range(2)]
    for cache in (captured_cache, eager_cache):  # warm-up step (device copies of the tables, smem opt-in)
        cache.attention(0, *steps[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = captured_cache.attention(0, *steps[1])
    graph.replay()
    want = eager_cache.attention(0, *steps[1])
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    a, b = captured_cache._layers[0], eager_cache._layers[0]
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.ring_k, b.ring_k) and torch.equal(a.comp_n, b.comp_n)



def _replay_cache():
    """A prompt of 120 tokens in a full KV head and a streaming one (window 300, its ring at 128
    slots): twenty more tokens cross the full storage's capacity (128) and the ring's, so reserve()
    has to grow both before a capture."""
    g = torch.Generator().manual_seed(9)
    cache = headops.HeadSparseCache(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, batch_size=2,
                                    dtype=F32, device=CUDA, kinds=["full", "streaming"], window=[-1, -1, 300, 300],
                                    sinks=[0, 0, 2, 2], max_step=1, split_keys=32)
    q, k, v = (draw((2, 120, H, 32), F32, g).to(CUDA) for H in (4, 2, 2))
    cache.attention(0, q, k, v)
    return cache


@gpu_only
def test_decode_steps_replayed_from_one_cuda_graph():
    """A decode loop on one CUDA graph: reserve() the storages for every step (here it must grow the
    full storage and the ring), capture one HeadSparseCache.attention step on static inputs,
    replay it with each step's inputs copied in, then sync_lengths(): every output, the lengths and
    what each head keeps equal an eager twin's (reserved alike: the same layout). Replays past the
    reserve are reported."""
    captured, eager = _replay_cache(), _replay_cache()
    g = torch.Generator().manual_seed(5)
    steps = [tuple(draw((2, 1, H, 32), F32, g).to(CUDA) for H in (4, 2, 2)) for _ in range(21)]
    for cache in (captured, eager):
        cache.attention(0, *steps[0])  # warm-up (device copies of the tables, shared-memory opt-in)
        st = cache._layers[0]
        layout = (len(st.full_k), list(st.ring_alloc))
        cache.reserve(cache.get_seq_length() + len(steps) - 1)
        assert (len(st.full_k), list(st.ring_alloc)) != layout  # (reserve had to grow them)
    static = [t.clone() for t in steps[1]]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = captured.attention(0, *static)
    outs = []
    for step in steps[1:]:
        for buffer, t in zip(static, step):
            buffer.copy_(t)
        graph.replay()
        outs.append(out.clone())
    captured.sync_lengths()
    wants = [eager.attention(0, *step) for step in steps[1:]]
    torch.cuda.synchronize()
    for i, (got, want) in enumerate(zip(outs, wants)):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"replay {i}: {m}")
    assert captured._layers[0].held == eager._layers[0].held == [141, 141]
    got_state, want_state = state(captured), state(eager)
    assert got_state.keys() == want_state.keys()
    for key in want_state:
        for x, y in zip(got_state[key], want_state[key]):
            assert torch.equal(x, y), key
    for _ in range(captured._layers[0].room() - captured.get_seq_length() + 1):  # one replay too many
        graph.replay()
    with pytest.raises(RuntimeError, match="reserve"):
        captured.sync_lengths()
    assert captured._layers[0].held == [141, 141]  # (the mirror left as it was)


@gpu_only
def test_key_bias_is_refused_under_capture():
    """key_bias is indexed by position and its length is fixed at capture: a replayed step would
    give the keys it appends no bias, so a capture with key_bias is refused by name."""
    cache = _replay_cache()
    q, k, v = (torch.randn(2, 1, H, 32, device=CUDA) for H in (4, 2, 2))
    cache.attention(0, q, k, v, key_bias=torch.zeros(4, 121, device=CUDA))
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="key_bias cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cache.attention(0, q, k, v, key_bias=torch.zeros(4, 122, device=CUDA))
    assert cache._layers[0].held == [121, 121]  # refused: nothing changed


# ------------------------------------------------------------------ a GPU user's whole path


# the methods a GPU user's whole path is run with: their HeadSpec for a model
WHOLE_PATH_SPECS = {
    "duo": lambda model: headops.HeadSpec.from_scores(model, torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                                                      full_fraction=0.5, window=5, sinks=2),
    "razor": lambda model: headops.HeadSpec.razor(model, {0: [1]}, window=4, sinks=1),
    "snapkv": lambda model: headops.HeadSpec.budget(model, budget=9, observation_window=3),
    "headkv": lambda model: headops.HeadSpec.headkv(model, torch.tensor([[3.0, 1.0], [1.0, 2.0]]), budget=8,
                                                    beta=1.2, observation_window=3),
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("method", sorted(WHOLE_PATH_SPECS))
def test_patched_model_generates_on_the_device_as_on_the_cpu(method, padded):
    """What a GPU user runs (README): a model patched with a method's HeadSpec, generating with
    HeadSparseCache(model, spec) on the device (the CUDA append and decode kernels under a real
    model, the cache made from the first call's tensors), against the same on the CPU: the same
    greedy tokens, the same step scores, the same tokens kept per head. Left-padded: a batch as a
    tokenizer pads it for generation (the cache holds each row from its first token)."""
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    # the GPU machine's transformers may be older than the one pinned here: generate() takes the
    # cache as `cache` from 5.24 on, as `past_key_values` before
    cache_kwarg = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"

    cpu_model, dev_model = tiny_llama_twins(CUDA)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :6] = 0
    runs = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        spec = WHOLE_PATH_SPECS[method](model)
        headops.patch(model, spec)
        cache = headops.HeadSparseCache(model, spec, budget_recent=2)  # (budget heads: small budgets)
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=10,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                             **{cache_kwarg: cache})
        runs[name] = (out, cache)
    (want, cpu_cache), (got, dev_cache) = runs["cpu"], runs["device"]
    assert torch.equal(got.sequences.cpu(), want.sequences)
    for g_scores, w_scores in zip(got.scores, want.scores):
        torch.testing.assert_close(g_scores.cpu(), w_scores, atol=2e-4, rtol=2e-4)
    assert dev_cache.get_seq_length() == cpu_cache.get_seq_length() == 21 + 9  # (the caches were used)
    for layer in range(2):
        a, b = dev_cache._layers[layer], cpu_cache._layers[layer]
        assert a.held == b.held == [30, 24 if padded else 30] and a.pads == b.pads
        for row in range(2):
            for kv_head in range(2):
                assert torch.equal(a.kept_kv(row, kv_head)[0].cpu(), b.kept_kv(row, kv_head)[0])


def assert_device_run_as_cpu(runs):
    """runs["device"] and runs["cpu"], each (greedy tokens, loss, a gate's gradient): the same
    tokens, the loss and gradient to float rounding."""
    (want_tokens, want_loss, want_grad), (tokens, loss, grad) = runs["cpu"], runs["device"]
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(loss, want_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad, want_grad, atol=2e-5, rtol=2e-4)


def test_static_cache_and_packed_rows_on_the_device_as_on_the_cpu():
    """transformers' StaticCache (its query offset a tensor on the device: one read a forward) and
    a flattened training batch (sequences packed into a row, attended one by one; position_ids
    read once a forward) through a patched model on the device, against the same on the CPU:
    the same greedy tokens, the same loss and gate gradient."""
    transformers = pytest.importorskip("transformers")
    cpu_model, dev_model = tiny_llama_twins(CUDA)
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    lengths = [5, 4, 6]
    packed = torch.randint(1, 97, (sum(lengths),), generator=torch.Generator().manual_seed(7))
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": part.tolist()} for part in packed.split(lengths)])
    runs = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        spec = headops.HeadSpec.streaming(model, {0: [0], 1: [1]}, window=3, sinks=1)
        spec.gate = torch.ones(spec.num_layers, spec.num_heads, device=model.device, requires_grad=True)
        headops.patch(model, spec)  # (a gate that learns lives on the model's device: patch keeps this leaf)
        tokens = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=8,
                                do_sample=False, pad_token_id=0, cache_implementation="static")
        loss = model(**{n: t.to(model.device) for n, t in batch.items()}, use_cache=False).loss
        loss.backward()
        runs[name] = (tokens.cpu(), loss.detach().cpu(), spec.gate.grad.cpu())
    assert_device_run_as_cpu(runs)


def test_encoder_decoder_and_compiled_packed_rows_on_the_device_as_on_the_cpu():
    """A patched BART on the device (its three stacks of attention, transformers' cache) and a
    compiled Llama over packed rows (sequence_ids computed in the graph from position_ids on the
    device: one copy to the host per layer), against the same on the CPU: the same greedy tokens,
    logits and gate gradient."""
    pytest.importorskip("transformers")
    from headops.testing import tiny_bart

    cpu_bart = tiny_bart()[0]
    dev_bart = tiny_bart()[0].to(CUDA)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    runs = {}
    for name, model in (("cpu", cpu_bart), ("device", dev_bart)):
        spec = headops.HeadSpec.dense(model).mask_heads({1: [0], 4: [2], 6: [3]})
        spec.gate = spec.gate.to(model.device).requires_grad_(True)
        headops.patch(model, spec)
        on = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
        with torch.no_grad():
            tokens = model.generate(**on, max_new_tokens=6, do_sample=False)
        loss = model(**on, labels=ids[:, :6].contiguous().to(model.device)).loss
        loss.backward()
        runs[name] = (tokens.cpu(), loss.detach().cpu(), spec.gate.grad.cpu())
    assert_device_run_as_cpu(runs)

    cpu_model, dev_model = tiny_llama_twins(CUDA)
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    tokens = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(9))
    logits = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        headops.patch(model, headops.HeadSpec.streaming(model, {0: [1]}, window=3, sinks=1))
        forward = torch.compile(lambda i, p, m=model: m(input_ids=i, position_ids=p, use_cache=False).logits,
                                fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            logits[name] = forward(tokens.to(model.device), packed.to(model.device)).cpu()
    torch.testing.assert_close(logits["device"], logits["cpu"], atol=2e-5, rtol=2e-5)


def test_static_cache_compiled_in_one_graph_on_the_device_as_on_the_cpu():
    """A compiled (fullgraph) forward through transformers' StaticCache: the keys end where the
    mask says, read by the op (on the device: one copy to the host per layer); a chunked prefill
    and decode steps of a left-padded batch, the same logits on the device as on the CPU."""
    transformers = pytest.importorskip("transformers")
    cpu_model, dev_model = tiny_llama_twins(CUDA)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        headops.patch(model, headops.HeadSpec.streaming(model, {0: [0], 1: [1]}, window=3, sinks=1))
        step = torch.compile(lambda i, m, c, model=model: model(i, attention_mask=m, cache=c, use_cache=True).logits,
                             fullgraph=True, backend="aot_eager")
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        on = {"ids": ids.to(model.device), "mask": mask.to(model.device)}
        with torch.no_grad():
            runs = [step(on["ids"][:, :5], on["mask"][:, :5], cache), step(on["ids"][:, 5:9], on["mask"][:, :9], cache)]
            runs += [step(on["ids"][:, t:t + 1], on["mask"][:, :t + 1], cache) for t in range(9, 12)]
        logits[name] = [r.cpu() for r in runs]
    for got, want in zip(logits["device"], logits["cpu"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["latent", "hybrid", "per_layer", "gemma4_head_dims", "shared_kv", "falcon_h1",
                                    "gemma4_image_text"])
def test_latent_attention_and_hybrid_models_on_the_device_as_on_the_cpu(family):
    """DeepSeek V3 (values of another head dim, padded on the device too), Qwen3.5 (Gated DeltaNet
    layers beside two attention layers) and Gemma 4 (layers of other head dims and KV heads; and a
    small one whose last 4 layers read layers 2 and 3's keys) and Falcon-H1 (attention beside a
    Mamba-2 mixer in every layer) and Gemma 4's image-text class (its language model patched, its
    towers as they are), and Gemma 4 at its released head dims (256 in sliding layers, 512 in
    full-attention ones: the CUDA kernels' wide variants) patched on the device against the
    same on the CPU: a left-padded batch's greedy tokens through transformers' cache (Qwen3.5,
    Gemma 4: and a HeadSparseCache), the loss and a gate gradient."""
    pytest.importorskip("transformers")
    from headops.testing import (tiny_falcon_h1, tiny_hybrid, tiny_latent_attention, tiny_multimodal,
                                 tiny_per_layer_shapes)

    make = {"latent": lambda: tiny_latent_attention("deepseek_v3"), "hybrid": lambda: tiny_hybrid("qwen3_5"),
            "per_layer": tiny_per_layer_shapes, "falcon_h1": tiny_falcon_h1, "gemma4_image_text": tiny_multimodal,
            "gemma4_head_dims": lambda: tiny_per_layer_shapes(head_dim=256, global_head_dim=512),
            "shared_kv": lambda: tiny_per_layer_shapes(False, num_hidden_layers=8, num_kv_shared_layers=4,
                                                       layer_types=["sliding_attention", "full_attention"] * 4)}[family]
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    runs = {}
    for name, model in (("cpu", make()[0]), ("device", make()[0].to(CUDA))):
        # (Gemma 4: its full-attention layer; the small ones: layer 5 reads layer 3's keys, layer 3 layer 1's)
        streaming = {5: [0]} if family in ("per_layer", "gemma4_head_dims", "shared_kv") else {1: [0]} if family == "gemma4_image_text" \
            else {0: [1]}
        spec = headops.HeadSpec.streaming(model, streaming, window=4, sinks=1).mask_heads({1: [2]})
        spec.gate = spec.gate.to(model.device).requires_grad_(True)
        headops.patch(model, spec)
        on = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
        with torch.no_grad():
            tokens = model.generate(**on, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
            if family != "latent":  # (and through a HeadSparseCache: Qwen3.5's beside its Gated DeltaNet's states)
                cache = headops.HeadSparseCache(model, spec)
                tokens = torch.cat([tokens, model.generate(**on, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                                           pad_token_id=0, cache=cache)])
        loss = model(**on, labels=on["input_ids"]).loss
        loss.backward()
        runs[name] = (tokens.cpu(), loss.detach().cpu(), spec.gate.grad.cpu())
    assert_device_run_as_cpu(runs)
