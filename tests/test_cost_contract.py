"""The cost contract (DESIGN section 1), measured with the kernel's work counters.

- a (b, h) whose gate is exactly 0 is never computed;
- key blocks that no query of a tile can see are never loaded or multiplied;
- alpha costs one pass over the keys, not two;
- no code path allocates anything of size S x S.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import headops

from conftest import assert_close, make_qkv, reference_f64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counts(q, k, v, **kw):
    with headops.count_work() as w:
        headops.attention(q, k, v, **kw)
    return w


def without_skipped(w):
    return dataclasses.replace(w, heads_skipped=0)


def ceil_div(a, b):
    return -(-a // b)


def add_counts(a, b):
    return headops.WorkCounts(*(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))))


# --------------------------------------------------------------------------- gate exactly 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gated_off_head_is_never_computed(dtype):
    B, S, H, D = 2, 200, 4, 64
    q, k, v = make_qkv(B, S, S, H, H, D, dtype)
    window = torch.tensor([16, -1, 64, 5])  # heads of different cost: the right one must go
    gate = torch.tensor([1.0, 0.0, 0.5, 2.0])
    w = counts(q, k, v, gate=gate, window=window)
    keep = [0, 2, 3]
    w_keep = counts(q[:, :, keep], k[:, :, keep], v[:, :, keep], gate=gate[keep], window=window[keep])
    assert w.heads_skipped == B
    assert w_keep.heads_skipped == 0
    assert without_skipped(w) == w_keep
    out = headops.attention(q, k, v, gate=gate, window=window)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_gated_off_per_batch_row_is_never_computed():
    B, S, H, D = 3, 130, 4, 32
    q, k, v = make_qkv(B, S, S, H, 2, D, torch.float32)
    gate = torch.ones(B, H)
    gate[0, 1] = gate[2, 3] = gate[2, 0] = 0.0
    sinks = torch.tensor([4, 0, 1, 2])
    window = torch.tensor([8, 3, -1, 50])
    w = counts(q, k, v, gate=gate, window=window, sinks=sinks)
    total = headops.WorkCounts()
    for b in range(B):  # the same work one batch row and one kept head at a time
        for h in torch.nonzero(gate[b]).flatten().tolist():
            wb = counts(q[b:b + 1, :, h:h + 1], k[b:b + 1, :, h // 2:h // 2 + 1], v[b:b + 1, :, h // 2:h // 2 + 1],
                        window=window[h:h + 1], sinks=sinks[h:h + 1])
            total = add_counts(total, wb)
    assert w.heads_skipped == 3
    assert without_skipped(w) == total


def test_raw_op_without_skip_computes_gated_off_heads():
    # skip_zero_gate=False (for a gate whose gradient is wanted): the head is computed, its out is
    # still 0 and its lse is the real one
    B, S, H, D = 1, 100, 2, 64
    q, k, v = make_qkv(B, S, S, H, H, D, torch.float64)
    gate = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    args = (q, k, v, True, False, 1 / math.sqrt(D), None, None, None, None, None, None, None, None, gate)
    with headops.count_work() as skipped:
        out_skip, lse_skip, *_ = torch.ops.headops.attention_fwd(*args, True, True, False)
    with headops.count_work() as computed:
        out, lse, *_ = torch.ops.headops.attention_fwd(*args, False, True, False)
    assert skipped.heads_skipped == 1 and computed.heads_skipped == 0
    assert computed.work_items == 2 * skipped.work_items
    assert torch.equal(out, out_skip) and torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.isneginf(lse_skip[:, 0]).all()
    _, ref_lse = reference_f64(q, k, v, return_lse=True)
    assert_close(lse, ref_lse, 1e-9, 1e-9, what="lse")


def test_all_heads_gated_off_compute_nothing():
    q, k, v = make_qkv(2, 100, 100, 4, 4, 64, torch.float32)
    w = counts(q, k, v, gate=0.0, out_bias=torch.ones(4, 64))
    assert w == headops.WorkCounts(heads_skipped=8)


# --------------------------------------------------------------------------- windows and sinks


def causal_window_pairs(S, w):
    """Visible (query, key) pairs of a causal window-w head with Sq = Sk = S."""
    return sum(min(i + 1, w) for i in range(S))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_cost_is_linear_in_the_window(dtype):
    S, w, D = 4096, 128, 64
    block_q, block_k = headops._C.cpu_tile_shape(dtype, D)
    q, k, v = make_qkv(1, S, S, 1, 1, D, dtype)
    win = counts(q, k, v, window=w)
    full = counts(q, k, v)
    assert win.work_items >= ceil_div(S, block_q)
    # every visible pair is computed, and at most a query tile's worth more per query
    assert causal_window_pairs(S, w) <= win.score_elements <= S * (w + 2 * block_q)
    assert win.key_blocks <= win.work_items * ceil_div(w + 2 * block_q, block_k)
    assert win.score_elements < S * S / 2 / 4  # far below causal attention's S^2 / 2
    # plain causal attention skips the blocks above the diagonal
    assert S * (S + 1) / 2 <= full.score_elements <= S * S / 2 + S * 2 * block_q
    # non-causal windows see both sides
    both = counts(q, k, v, window=w, causal=False)
    assert both.score_elements <= S * (2 * w + 2 * block_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("S", [4096, 1000])
def test_causal_diagonal_blocks_stop_at_each_row_groups_last_key(dtype, S):
    # On a block the diagonal crosses, each group of 32 rows multiplies only up to the last key
    # one of its rows sees, in steps of 32 keys (kernels.md): ~16 keys a row past its own on
    # average, where whole query tiles cost about half a tile's height more (128 for float32's
    # 256-row tiles on a 2 MiB L2).
    D = 64
    q, k, v = make_qkv(1, S, S, 1, 1, D, dtype)
    full = counts(q, k, v)
    assert S * (S + 1) / 2 <= full.score_elements <= S * (S + 1) / 2 + S * 32


@pytest.mark.parametrize("w", [1, 7])
def test_tiny_window_cost(w):
    S, D = 1000, 64
    block_q, _ = headops._C.cpu_tile_shape(torch.float32, D)
    q, k, v = make_qkv(2, S, S, 2, 1, D, torch.float32)
    c = counts(q, k, v, window=w)
    assert c.score_elements <= 2 * 2 * S * (w + block_q)


def test_window_output_matches_reference_on_a_slice():
    # bottom-right alignment: queries [S - n, S) with window w only see keys [S - n - w + 1, S)
    S, w, n, D = 4096, 128, 200, 64
    q, k, v = make_qkv(1, S, S, 2, 1, D, torch.float32)
    window = torch.tensor([w, 16])
    sinks = torch.tensor([0, 3])
    out = headops.attention(q, k, v, window=window, sinks=sinks)
    keys = slice(S - n - w, S)
    ref = reference_f64(q[:, S - n:], k[:, keys], v[:, keys], window=window)
    assert_close(out[:, S - n:, 0], ref[:, :, 0], 2e-5, 1e-5)
    # head 1 also sees the 3 sinks: put them in front of its window
    idx = torch.cat([torch.arange(3), torch.arange(S - n - 16, S)])
    ref1 = reference_f64(q[:, S - n:, 1:], k[:, idx], v[:, idx], window=16, sinks=3)
    assert_close(out[:, S - n:, 1:], ref1, 2e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sinks_add_only_their_own_keys(dtype):
    S, w, n_sinks, D = 2048, 128, 4, 64
    block_q, block_k = headops._C.cpu_tile_shape(dtype, D)
    # the packed bfloat16 path reads keys in pairs; headops' own AMX loops in steps of 32
    align = 32 if headops._C.cpu_runs_own_amx_tiles(dtype, D) else 2
    q, k, v = make_qkv(1, S, S, 1, 1, D, dtype)
    win = counts(q, k, v, window=w)
    both = counts(q, k, v, window=w, sinks=n_sinks)
    assert 0 < both.score_elements - win.score_elements <= S * (n_sinks + align)
    assert both.key_blocks - win.key_blocks <= both.work_items * ceil_div(n_sinks + align, block_k)
    assert both.score_elements < S * (w + n_sinks + 2 * block_q + 2 * align)


# --------------------------------------------------------------------------- alpha: one pass


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_alpha_costs_one_pass_over_the_keys(causal):
    S, D = 1024, 64
    q, k, v = make_qkv(1, S, S, 2, 2, D, torch.float32)
    streaming_kw = dict(window=torch.tensor([64, 16]), sinks=torch.tensor([4, 0]), causal=causal)
    full = counts(q, k, v, causal=causal)
    streaming = counts(q, k, v, **streaming_kw)
    mixed = counts(q, k, v, alpha=torch.tensor([0.5, 0.25]), **streaming_kw)
    assert streaming.score_elements < full.score_elements / 4
    assert mixed.work_items == full.work_items
    assert mixed.key_blocks == full.key_blocks  # not full + streaming
    assert mixed.score_elements == full.score_elements
    # both branches multiply P.V (the streaming one only in blocks where it sees something)
    assert full.value_blocks < mixed.value_blocks <= 2 * mixed.key_blocks
    # alpha exactly 1 or 0 computes one branch only
    assert counts(q, k, v, alpha=1.0, **streaming_kw) == full
    assert counts(q, k, v, alpha=0.0, **streaming_kw) == streaming


# --------------------------------------------------------------------------- no S x S memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch, headops
    S, D, w = 65536, 64, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, 1, D) for _ in range(3))
    headops.attention(q[:, :256], k[:, :256], v[:, :256], window=w)  # first-call set-up outside the measure
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with headops.count_work() as c:
        out, lse = headops.attention(q, k, v, window=w, sinks=4, return_lse=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = 128  # the last n queries see keys [S - n - w + 1, S) and the 4 sinks
    idx = torch.cat([torch.arange(4), torch.arange(S - n - w, S)])
    torch.save(dict(out=out[:, -n:].clone(), lse=lse[..., -n:].clone(), q=q[:, -n:].clone(), k=k[:, idx].clone(),
                    v=v[:, idx].clone()), sys.argv[1])
    print(json.dumps(dict(growth=after - before, finite=bool(torch.isfinite(out).all() and torch.isfinite(lse).all()),
                          score_elements=c.score_elements)))
""")


def test_no_s_by_s_memory(tmp_path):
    S, w, D = 65536, 128, 64
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY_SCRIPT)
    slice_file = tmp_path / "slice.pt"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), str(slice_file)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    s_by_s = S * S * 4  # 16 GiB in float32
    assert result["growth"] < 1 << 30, f"peak RSS grew by {result['growth'] / 2**20:.0f} MiB"
    assert result["growth"] < s_by_s / 64
    assert result["finite"]
    block_q, _ = headops._C.cpu_tile_shape(torch.float32, D)
    assert result["score_elements"] < S * (w + 4 + 2 * block_q)
    data = torch.load(slice_file)
    ref, ref_lse = reference_f64(data["q"], data["k"], data["v"], window=w, sinks=4, return_lse=True)
    assert_close(data["out"], ref, 2e-5, 1e-5)
    assert_close(data["lse"], ref_lse, 2e-5, 1e-6, what="lse")
