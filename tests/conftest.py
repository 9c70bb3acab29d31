"""Shared fixtures and helpers of the headops test suite.

Every test runs with its own fixed seed (derived from its node id, printed so that a failure
can be replayed). Inputs are drawn in float64 and rounded to the dtype under test; the oracle
(`headops.reference`) then runs in float64 on the *rounded* values, so the only difference
left is the kernel's own arithmetic.
"""

import os
import warnings
import zlib

import pytest
import torch

import headops
from headops import reference

# The CUDA test files (test_attention_cuda, test_kvcache_cuda) run on a GPU and skip without one;
# HEADOPS_TEST_CUDA_DEVICE=cpu runs them on the CPU kernels instead: a dry run of the tests
# themselves (helpers, tolerances) on a machine without a GPU, where the GPU-only tests skip.
CUDA_TEST_DEVICE = os.environ.get("HEADOPS_TEST_CUDA_DEVICE", "cuda")
CUDA_DRY_RUN = CUDA_TEST_DEVICE == "cpu"
needs_cuda = pytest.mark.skipif(
    not CUDA_DRY_RUN and (not torch.cuda.is_available() or not getattr(headops._C, "cuda_compiled", False)),
    reason="needs a CUDA GPU and a build with the CUDA kernels")
gpu_only = pytest.mark.skipif(CUDA_DRY_RUN, reason="GPU-specific (dry run on the CPU)")

LAYOUTS = ("bshd", "bhsd")
# every per-head feature of head_params except alpha (which excludes return_lse)
ALL_FEATURES = ["scale", "window", "sinks", "key_bias", "sink_logit", "out_scale", "out_bias", "gate"]

# Absolute tolerances on outputs of magnitude ~1 (values are N(0, 1), attention averages them):
#   float64: both sides compute in double; only the summation order differs.
#   float32: float accumulation and a ~20-bit vectorised exp.
#   bfloat16: the probabilities are rounded to bfloat16 (8-bit mantissa) before P.V on the
#             packed path, and the output itself is rounded to bfloat16 (|x| <= 4: step 2**-6 / 2).
#   float16: the output is rounded to float16 (10-bit mantissa); P stays float32, except on the
#            packed path (brgemm runs float16: AVX512-FP16, AMX-FP16) of a call not saved for
#            the backward, which rounds P to float16 before P.V (largest error seen there: 0.41
#            of these tolerances, 2026-12-05). On AMX without AMX-FP16 float16 runs in two
#            bfloat16 parts instead, float-accurate to ~2**-17 (test_float16_in_two_bfloat16_parts_is_float_accurate).
OUT_ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
OUT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# lse is computed in float (double for float64) from exactly the same rounded inputs.
LSE_ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def pytest_sessionstart(session):
    # `make test-asan` must not silently test the ordinary build
    if os.environ.get("HEADOPS_EXPECT_SANITIZED") == "1" and not headops._C.sanitized:
        raise pytest.UsageError(f"HEADOPS_EXPECT_SANITIZED=1 but {headops._C.__file__} is not the sanitizer build")
    # autograd's engine starts its device threads at a process's first backward; if fake tensors
    # (opcheck, torch.compile) were used before it, it starts one, and the ranks that
    # headops.testing.run_ranks forks afterwards cannot run a backward ("autograd's threading in
    # combination with fork-based multiprocessing"): a first backward now, whatever order the
    # test files run in
    warm = torch.zeros(1, requires_grad=True)
    warm.sum().backward()
    # every new CPU tensor starts as NaN (float32; bf16 halves and float64 become junk): an output
    # element a kernel leaves unwritten fails its comparison instead of passing as a stray zero
    try:
        headops._C.cpu_junk_fill(True)
    except RuntimeError as e:  # a torch whose libc10 lacks the switch: the tests run without it
        warnings.warn(f"unwritten outputs are not detected in this run: {e}")


@pytest.fixture(autouse=True)
def seeded_rng(request):
    """A fixed, per-test seed (stable across runs and orderings)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    print(f"torch seed for {request.node.nodeid}: {seed}")
    yield seed


# ---------------------------------------------------------------------------------------------
# inputs


def _tensor(B, S, H, D, dtype, layout, strided):
    """One [B, S, H, D] ("bshd") or [B, H, S, D] ("bhsd") tensor, drawn in float64.

    With strided=True it is a view into a larger buffer stored in the *other* layout, padded
    along batch, sequence, heads and the last dim, then sliced and transposed: every stride
    differs from the contiguous one while the last dim stays contiguous.
    """
    if not strided:
        shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "bshd":  # stored [B, H, S, D]
        store = torch.randn(B + 1, H + 2, S + 3, D + 5, dtype=torch.float64).to(dtype)
        view = store[1:, 1:H + 1, 2:S + 2, :D].transpose(1, 2)
    else:  # stored [B, S, H, D]
        store = torch.randn(B + 1, S + 3, H + 2, D + 5, dtype=torch.float64).to(dtype)
        view = store[1:, 2:S + 2, 1:H + 1, :D].transpose(1, 2)
    assert view.stride(-1) == 1
    return view


def make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype=torch.float64, layout="bshd", strided=False):
    """Random q, k, v for `layout`; strided=True gives non-contiguous views (contiguous last dim)."""
    q = _tensor(B, Sq, Hq, D, dtype, layout, strided)
    k = _tensor(B, Sk, Hkv, D, dtype, layout, strided)
    v = _tensor(B, Sk, Hkv, D, dtype, layout, strided)
    return q, k, v


def per_head(B, Hq, values=None, *, per_batch=False, dtype=torch.float64, low=0.0, high=1.0):
    """A per-head parameter: `values` ([Hq] list) or uniform draws in [low, high).

    per_batch=True gives a [B, Hq] tensor whose rows differ (a random permutation per row for
    explicit values, fresh draws otherwise)."""
    if values is not None:
        t = torch.tensor(values, dtype=dtype)
        assert t.shape == (Hq,)
        if per_batch:
            t = torch.stack([t[torch.randperm(Hq)] for _ in range(B)])
        return t
    shape = (B, Hq) if per_batch else (Hq,)
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high).to(dtype)


def head_params(B, Hq, Sk, D, features, *, per_batch=False):
    """Keyword arguments of headops.attention for a set of feature names (random values).

    Features: scale (per-head tensor), window, sinks, alpha, key_bias, sink_logit, out_scale,
    out_bias, gate (with an exact zero). Windows and sinks are picked relative to Sk so that
    they cut the keys in interesting places (1, a few, more than Sk, unlimited).
    """
    ph = lambda values=None, **kw: per_head(B, Hq, values, per_batch=per_batch, **kw)  # noqa: E731
    cycle = lambda options: [options[h % len(options)] for h in range(Hq)]  # noqa: E731
    kw = {}
    for f in features:
        if f == "scale":
            kw["softmax_scale"] = ph(low=0.05, high=0.4)
        elif f == "window":
            kw["window"] = ph(cycle([1, 5, max(1, Sk // 3), -1, Sk + 10, 2]), dtype=torch.int64)
        elif f == "sinks":
            kw["sinks"] = ph(cycle([3, 0, 1, max(1, Sk // 2), Sk + 4]), dtype=torch.int64)
        elif f == "alpha":
            kw["alpha"] = ph(cycle([0.25, 0.0, 1.0, 0.7, 0.5]))
        elif f == "key_bias":
            shape = (B, Hq, Sk) if per_batch else (Hq, Sk)
            kw["key_bias"] = torch.randn(shape, dtype=torch.float64)
        elif f == "sink_logit":
            kw["sink_logit"] = ph(low=-2.0, high=3.0)
        elif f == "out_scale":
            kw["out_scale"] = torch.randn((B, Hq, D) if per_batch else (Hq, D), dtype=torch.float64)
        elif f == "out_bias":
            kw["out_bias"] = torch.randn((B, Hq, D) if per_batch else (Hq, D), dtype=torch.float64)
        elif f == "gate":
            g = ph(low=-1.5, high=1.5)
            if per_batch:
                g[0, 0] = 0.0  # gated off in one batch row only
                if B > 1:
                    g[1, -1] = 0.0
            else:
                g[Hq // 2] = 0.0
            kw["gate"] = g
        else:
            raise KeyError(f)
    return kw


# ---------------------------------------------------------------------------------------------
# comparisons


def upcast(*tensors):
    return tuple(t.to(torch.float64) for t in tensors)


def reference_f64(q, k, v, **kw):
    """The oracle in float64 on the (already rounded) inputs."""
    return reference.attention(*upcast(q, k, v), **kw)


def gate_zero_mask(gate, B, Hq):
    """[B, Hq] bool: heads whose gate is exactly 0 (their lse is -inf by contract)."""
    if gate is None:
        return torch.zeros(B, Hq, dtype=torch.bool)
    return (torch.as_tensor(gate) == 0).expand(B, Hq)


def assert_no_new_nonfinite(got, want):
    """NaN (or inf) must never appear where the reference is finite."""
    got = got.to(torch.float64)
    finite = torch.isfinite(want)
    bad = finite & ~torch.isfinite(got)
    assert not bad.any(), f"{int(bad.sum())} non-finite values where the reference is finite, first at " \
                          f"{tuple(bad.nonzero()[0].tolist())}"
    assert not (got.isnan() & ~want.isnan()).any(), "NaN where the reference has none"


def half_ulp_excess(got, want):
    """max over elements of (|got - want| - half a float16 ulp of want), over max|want|: what a
    float16 result carries beyond its own rounding (want: the float64 reference)."""
    ulp = torch.where(want.abs() >= 2**-14, 2.0 ** (torch.floor(torch.log2(want.abs())) - 10),
                      torch.full_like(want, 2.0**-24))
    return (((got.double() - want).abs() - ulp / 2).max() / want.abs().max()).item()


def assert_close(got, want, atol, rtol=0.0, what="out"):
    got = got.to(torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert_no_new_nonfinite(got, want)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_against_reference(q, k, v, *, atol=None, rtol=None, lse_atol=None, **kw):
    """Runs headops.attention and the float64 oracle on the same inputs and compares out, and
    lse unless alpha is given (heads gated off exactly must have lse -inf). Returns (out, ref)."""
    dtype = q.dtype
    atol = OUT_ATOL[dtype] if atol is None else atol
    rtol = OUT_RTOL[dtype] if rtol is None else rtol
    want_lse = kw.get("alpha") is None
    got = headops.attention(q, k, v, return_lse=want_lse, **kw)
    ref = reference_f64(q, k, v, return_lse=want_lse, **kw)
    if want_lse:
        (got, got_lse), (ref, ref_lse) = got, ref
    assert got.dtype == dtype and got.shape == q.shape
    assert_close(got, ref, atol, rtol)
    if want_lse:
        assert got_lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        check_lse(got_lse, ref_lse, q, kw, LSE_ATOL[dtype] if lse_atol is None else lse_atol)
    return got, ref


def check_lse(got_lse, ref_lse, q, kw, atol):
    """lse against the reference's; a head gated off exactly must give -inf (it is never computed)."""
    layout = kw.get("layout", "bshd")
    B, Hq = q.shape[0], q.shape[2] if layout == "bshd" else q.shape[1]
    assert got_lse.shape == ref_lse.shape
    off = gate_zero_mask(kw.get("gate"), B, Hq)
    assert torch.isneginf(got_lse[off]).all(), "lse of a head gated off exactly must be -inf"
    ref_lse = ref_lse.clone()
    ref_lse[off] = float("-inf")
    assert_close(got_lse, ref_lse, atol, 1e-6, what="lse")


def tiny_llama_twins(device):
    """(a tiny Llama on the CPU, the same model on `device`): the CPU side of device tests."""
    from headops.testing import tiny_llama

    cpu_model = tiny_llama()[0]
    dev_model = tiny_llama()[0].to(device)
    dev_model.load_state_dict(cpu_model.state_dict())
    return cpu_model, dev_model


def use_row_blocks(monkeypatch, rows: int = 3):
    """Probe statistics by the path a CUDA call takes (the forward's lse, by blocks of query rows:
    headops._probe_rows), here on the CPU, `rows` query rows a block."""
    from headops import _probe_rows, probes

    monkeypatch.setattr(probes, "kernel_probes", lambda device: False)
    monkeypatch.setattr(_probe_rows, "rows_per_block", lambda *shape: rows)


@pytest.fixture(params=["kernel", "row blocks"])
def probe_path(request, monkeypatch):
    """Probe statistics from the fused CPU kernel, or by the row-block path with 3 rows a block
    (every call crosses blocks)."""
    if request.param == "row blocks":
        use_row_blocks(monkeypatch)
    return request.param


def drawn_heads(B, Hq, Hkv, Sq, Sk, window, sinks, alpha, seed):
    """(q, k, v, args, generator) of a drawn property case, float64, layout "bhsd", D = 8: per-head
    window and sinks, alpha where drawn (None: absent); the generator for what the case draws next."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Sk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    args = {"window": torch.tensor(window), "sinks": torch.tensor(sinks)}
    if alpha is not None:
        args["alpha"] = torch.tensor(alpha, dtype=torch.float64)
    return q, k, v, args, g


def assert_compiled_as_eager(f, leaves, extras):
    """f(*leaves, extra) compiled (fullgraph=True, aot_eager) against f run eagerly, for each
    extra: the output and the leaves' gradients, exactly."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for extra in extras:
        want = f(*leaves, extra)
        got = compiled(*leaves, extra)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        g = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def float_causal_lm_loss(model, batch):
    """The next-token cross entropy in the logits' own dtype (transformers' model loss is float32,
    which a float64 check of finite differences cannot use)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())


def assert_importance_is_the_finite_differences(model, batch, heads, loss_fn=float_causal_lm_loss, eps=1e-2):
    """|dL/dgate| of `heads` from headops.importance (one backward, the model as given, patched)
    against central differences of the loss with the model in float64 (steps of `eps`: RMSNorms
    round to float32 even there), within 1e-4 + 1e-3 of the difference. Leaves the model float64."""
    from headops import research

    got = research.importance(model, [batch], loss_fn=loss_fn, normalize=False)
    model.double()
    want = research.importance_finite_difference(model, batch, loss_fn=loss_fn, heads=heads, eps=eps)
    for layer, h in heads:
        assert abs(got[layer, h].item() - abs(want[layer, h].item())) <= 1e-4 + 1e-3 * abs(want[layer, h].item()), \
            (layer, h, got[layer, h].item(), want[layer, h].item())
    return got


GENERATE_LOGITS = dict(return_dict_in_generate=True, output_logits=True)


def assert_generated_alike(got, want, atol=2e-5, rtol=1e-5):
    """Two model.generate(..., **GENERATE_LOGITS) results: the same tokens, and each step's logits
    within atol/rtol (a tiny random model's greedy tokens forgive logit errors of 5e-3)."""
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=atol, rtol=rtol)


def training_step(model, **batch):
    """(loss, every parameter's gradient or None) of one step of model(**batch).loss; the
    gradients are cleared afterwards."""
    loss = model(**batch).loss
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss.detach(), grads


def assert_training_steps_alike(got, want, min_grads=10):
    """Two training_step results: the loss to 1e-6 and every gradient to 1e-5 (rtol 1e-4), the
    same parameters with none."""
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    assert sum(g is not None for g in want[1]) > min_grads
    for a, b in zip(got[1], want[1]):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# the floating per-head arguments that get gradients (head_params' names for them)
GRAD_PARAMS = ("softmax_scale", "alpha", "key_bias", "sink_logit", "out_scale", "out_bias", "gate")


def weighted_loss(out, lse, seed=0):
    """A float64 loss that weighs every output element (and lse, where given, its -inf left out)
    by a fixed random number, so every gradient is exercised."""
    g = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    if lse is not None:
        loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0) * 0.3).sum()
    return loss


def gradient_inputs(q, k, v, kw) -> tuple:
    """(names, tensors) of q, k, v and the floating per-head arguments in kw, set to require grad."""
    names = ["q", "k", "v"] + [n for n in GRAD_PARAMS if n in kw]
    inputs = [q, k, v] + [kw[n] for n in GRAD_PARAMS if n in kw]
    for t in inputs:
        t.requires_grad_(True)
    return names, inputs


def assert_reference_with_gradients(q, k, v, kw, *, unread_is_zero=False, **call):
    """headops.attention against the reference on the same float64 inputs (call: layout, causal,
    sequence_ids, key_lengths...): out to 1e-12, lse to 1e-12 (without alpha) and the gradients of
    q, k, v and every floating per-head argument of a weighted loss to 1e-10. unread_is_zero: a
    gradient the reference leaves None (inputs it never reads) must be 0. Returns headops' out."""
    names, inputs = gradient_inputs(q, k, v, kw)
    with_lse = "alpha" not in kw
    got = headops.attention(q, k, v, return_lse=with_lse, **call, **kw)
    want = reference.attention(q, k, v, return_lse=with_lse, **call, **kw)
    (got_out, got_lse), (want_out, want_lse) = (got, want) if with_lse else ((got, None), (want, None))
    assert_close(got_out, want_out, 1e-12)
    if with_lse:
        assert_close(got_lse, want_lse, 1e-12, what="lse")
    got_grads = torch.autograd.grad(weighted_loss(got_out, got_lse), inputs, allow_unused=True)
    want_grads = torch.autograd.grad(weighted_loss(want_out, want_lse), inputs, allow_unused=True)
    for name, a, b in zip(names, got_grads, want_grads):
        if unread_is_zero and b is None:
            b = torch.zeros_like(a)
        assert_close(a, b, 1e-10, what=f"d{name}")
    return got_out


def edit_heads_before(projection, edit, head_dim):
    """The oracle of a head-level intervention: edit(h, slice) replaces each head h's slice of an
    attention module's output where its output projection (`projection`: o_proj, out_proj)
    receives it. Returns the hook's handle."""
    def hook(_, args):
        (x,) = args  # (the heads' slices put together anew: the edit may be differentiated through)
        return (torch.cat([edit(h, x[..., h * head_dim:(h + 1) * head_dim])
                           for h in range(x.shape[-1] // head_dim)], dim=-1),)
    return projection.register_forward_pre_hook(hook)


def logits_with_reference_attention(model, ids, window, sinks):
    """The unpatched model's logits with each layer's attention computed by headops.reference (its
    own GQA, causal) under per-layer windows and sinks ([L, Hq]: window[layer_idx])."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from headops import reference

    def oracle(module, q, k, v, mask, scaling=None, dropout=0.0, **rest):
        layer = module.layer_idx
        out = reference.attention(q, k, v, layout="bhsd", causal=True, softmax_scale=scaling, window=window[layer],
                                  sinks=sinks[layer])
        return out.transpose(1, 2), None

    AttentionInterface.register("headops_test_reference_oracle", oracle)
    AttentionMaskInterface.register("headops_test_reference_oracle", sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation("headops_test_reference_oracle")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation(before)


def zero_heads_before(projection, heads, head_dim):
    """The oracle of masked heads: edit_heads_before with `heads`' slices zeroed."""
    return edit_heads_before(projection, lambda h, x: torch.zeros_like(x) if h in heads else x, head_dim)


def assert_dense_and_masked_heads_are_the_model(model, spec, masked, output_projection, atol=2e-5):
    """A dense `spec` patched into `model` is the model (a left-padded batch's logits, each generated
    step's), and `masked` heads ({spec layer: [query heads]}) are the model with those heads' slices
    zeroed where output_projection(spec layer) receives them. Leaves the model patched."""
    import headops

    ids, mask = left_padded_ids()
    gen = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
               **GENERATE_LOGITS)
    dims = spec.head_dim if isinstance(spec.head_dim, tuple) else (spec.head_dim,) * spec.num_layers
    hooks = [zero_heads_before(output_projection(layer), heads, dims[layer]) for layer, heads in masked.items()]
    with torch.no_grad():
        want_masked = model(ids, attention_mask=mask).logits
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_generated = model.generate(ids, **gen)
        headops.patch(model, spec)
        got = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, **gen)
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=atol, rtol=1e-5)
    assert_generated_alike(generated, want_generated)
    headops.set_spec(model, spec.mask_heads(masked))
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want_masked[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want_masked[1, 3:], atol=atol, rtol=1e-5)


def left_padded_ids():
    """(ids, attention_mask): two rows of 13 token ids in [3, 97) (the tiny models' vocabulary),
    the second left-padded by 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def assert_prefill_cache_decodes_as_the_model_filled_it(model, specs, prefill, ids, *, last_only=False):
    """For each spec, a HeadSparseCache built from `prefill` (capture_prefill of `ids`) and one whose
    prompt the patched model ran with prefill="full" give the same logits for a question of 3 tokens
    in one call (`last_only`: passed with logits_to_keep=1, as generate does: its last token's),
    then for one more token."""
    import headops

    g = torch.Generator().manual_seed(4)
    for spec in specs:
        built = headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=3)
        ran = headops.HeadSparseCache(model, spec, prefill="full", max_step=3)
        headops.patch(model, spec)
        with torch.no_grad():
            model(ids, cache=ran)
            question, step = torch.randint(3, 97, (2, 3), generator=g), torch.randint(3, 97, (2, 1), generator=g)
            got = model(question, cache=built, **({"logits_to_keep": 1} if last_only else {})).logits
            torch.testing.assert_close(got, model(question, cache=ran).logits[:, -got.shape[1]:], atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(model(step, cache=built).logits, model(step, cache=ran).logits,
                                       atol=1e-5, rtol=1e-5)
        assert (built.nbytes(), built.ideal_nbytes()) == (ran.nbytes(), ran.ideal_nbytes())


def evaluate_every_family(model, budget=48):
    """headops.evaluate over two passkey prompts and every method family of the standard grid (scores
    random); checks that the dense method answers as transformers' own generate. The rows."""
    from headops import evaluate as harness
    from headops import tasks
    from headops.testing import CharTokenizer

    import headops

    tok = CharTokenizer()
    samples = [tasks.make_sample(tok, "passkey", 300, depth, seed) for seed, depth in enumerate((0.2, 0.8))]
    methods = harness.standard_methods(["r"], budgets=(budget,), windows=(16,), fractions=(0.5,))
    spec = headops.HeadSpec.dense(model)
    rows = harness.evaluate(model, tok, samples, methods, scores={"r": torch.rand(spec.num_layers, spec.num_heads)},
                            batch_size=2, max_new_tokens=6, show_progress=False)
    assert len(rows) == len(samples) * len(methods)
    for s in samples:
        want = tok.decode(tasks.until_eos(model, tasks.generate(model, s.ids[None], 6)[0]), skip_special_tokens=True)
        assert next(r for r in rows if r["method"] == "dense" and int(r["seed"]) == s.seed)["answer"] == want
    assert all(int(r["ideal_bytes"]) <= int(r["dense_bytes"]) for r in rows)
    return rows
