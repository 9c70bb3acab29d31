"""Property-based tests (hypothesis) of argument validation: wrong forms of every argument.

For headops.attention (every per-head argument, q/k/v, layout, causal, return_lse), the
HeadSparseCache constructor, cache.attention / cache.append (at prefill and at decode) and the
headops.HeadSpec constructors, validate, layer_args and from_dict, random shapes and a random wrong
form of a random argument: wrong length or ndim, wrong dtype (float window, bool, integer gate,
complex), strings, lists, dicts, numpy arrays, None where not allowed, NaN/inf where not allowed,
negative sinks, window 0, alpha outside [0, 1], ints past int64, tensors on the 'meta' device,
sparse and nested tensors. Each must raise ValueError or TypeError (never RuntimeError, never a
crash) whose message is headops' own and names the argument. A rejected cache call leaves the cache
as it was (lengths and bytes held).

Odd forms that are accepted (python ints and numpy scalars for floats, Fractions, 0-dim, float16 or
[1, Hq] tensors, int32/uint8 windows, strided views, huge windows, broadcast key_bias shapes, a
non-contiguous last dim of q/k/v, NaN/inf gates and epilogues, ...) must give the reference's
answer (NaN exactly where the reference has NaN).

Besides the random draws (1,800 examples in all by default; HEADOPS_HYPOTHESIS_EXAMPLES, 2000 by
default, scales them), a sweep runs every form of each catalogue once on a few fixed shapes (about
2,600 forms), so that no form depends on the draw. Derandomized; failures print the draws.
"""

import fractions
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch

import headops
from headops import reference

from conftest import OUT_ATOL, OUT_RTOL

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BASE = int(os.environ.get("HEADOPS_HYPOTHESIS_EXAMPLES", "2000"))
F64 = torch.float64
NAN, INF = math.nan, math.inf


def examples(fraction):
    return max(10, int(BASE * fraction))


def prop(fraction):
    return settings(max_examples=examples(fraction), deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny calls: one thread keeps them fast on a small shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def names(message, words):
    """The message names one of the words as a word of its own (not "k" inside "keys")."""
    return any(re.search(rf"(?<![\w.]){re.escape(w)}(?!\w)", message) for w in words)


def assert_rejected(call, words, what):
    """call() raises ValueError/TypeError (not a RuntimeError, not anything else) naming a word."""
    words = [words] if isinstance(words, str) else list(words)
    try:
        call()
    except (ValueError, TypeError) as e:
        assert not isinstance(e, RuntimeError), f"{what}: {type(e).__name__} is a RuntimeError: {e}"
        message = str(e)
        assert message.startswith("headops"), f"{what}: not headops' own message: {type(e).__name__}: {message}"
        assert names(message, words), f"{what}: the message does not name {words}: {message}"
        return e
    except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
        pytest.fail(f"{what}: raised {type(e).__name__} instead of ValueError/TypeError: {e}")
    pytest.fail(f"{what}: accepted")


# ------------------------------------------------------------------------------ shapes


@st.composite
def shapes(draw):
    Hkv = draw(st.integers(1, 2))
    return dict(B=draw(st.integers(1, 2)), Sq=draw(st.integers(1, 5)), Sk=draw(st.integers(1, 6)), Hkv=Hkv,
                Hq=Hkv * draw(st.integers(1, 3)), D=draw(st.sampled_from([1, 4, 8])),
                dtype=draw(st.sampled_from([F64, torch.float32])), layout=draw(st.sampled_from(["bshd", "bhsd"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_qkv(s, gen=None):
    gen = gen or torch.Generator().manual_seed(s["seed"])

    def t(S, H):
        shape = (s["B"], S, H, s["D"]) if s["layout"] == "bshd" else (s["B"], H, S, s["D"])
        return torch.randn(shape, generator=gen, dtype=F64).to(s["dtype"])

    return t(s["Sq"], s["Hq"]), t(s["Sk"], s["Hkv"]), t(s["Sk"], s["Hkv"])


def nested(tensors, layout=torch.strided):
    with warnings.catch_warnings():  # (the strided layout of nested tensors is a prototype: it warns)
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor(tensors, layout=layout)


PER_HEAD_FLOAT = ("softmax_scale", "gate", "alpha", "sink_logit")
PER_HEAD_INT = ("window", "sinks")
VECTORS = ("out_scale", "out_bias")
ALL_ARGS = PER_HEAD_FLOAT + PER_HEAD_INT + VECTORS + ("key_bias",)


def good_value(name, s, batch=False):
    """A valid tensor of the argument (the base of the wrong forms)."""
    B, Hq, D, Sk = s["B"], s["Hq"], s["D"], s["Sk"]
    if name in PER_HEAD_INT:
        return torch.full((B, Hq) if batch else (Hq,), 2, dtype=torch.int64)
    if name in PER_HEAD_FLOAT:
        return torch.full((B, Hq) if batch else (Hq,), 0.5, dtype=F64)
    if name in VECTORS:
        return torch.ones((B, Hq, D) if batch else (Hq, D), dtype=F64)
    return torch.zeros((B, Hq, Sk) if batch else (Sk,), dtype=F64)


def wrong_forms(name, s):
    """Wrong forms of per-head argument `name` for shapes s: {form: value}."""
    B, Hq, D, Sk = s["B"], s["Hq"], s["D"], s["Sk"]
    good = good_value(name, s)
    integer = name in PER_HEAD_INT
    dt = torch.int64 if integer else F64
    forms = {
        "string": "1", "bytes": b"1", "list": good.tolist(), "tuple": tuple(good.tolist()), "dict": {0: 1},
        "object": object(), "bool": True, "bool_false": False, "complex": 1 + 1j, "numpy": good.numpy(),
        "meta": good.to("meta"), "sparse": good.to_sparse(), "bool_tensor": torch.ones(good.shape, dtype=torch.bool),
        "complex_tensor": torch.ones(good.shape, dtype=torch.complex64), "batch_meta": good_value(name, s, True).to(
            "meta"), "nested": nested([good.double(), good.double()]),
        "nested_jagged": nested([good.double(), good.double()], torch.jagged),
    }
    if integer:
        forms.update({"float": 2.5, "whole_float": 2.0, "float_tensor": torch.full(good.shape, 2.0),
                      "half_tensor": torch.full(good.shape, 2.0, dtype=torch.float16), "huge": 2**70,
                      "huge_negative": -2**70, "fraction": fractions.Fraction(1, 2), "numpy_float": np.float64(2.0)})
    elif name not in VECTORS + ("key_bias",):
        forms.update({"int_tensor": torch.ones(good.shape, dtype=torch.int64),
                      "uint8_tensor": torch.ones(good.shape, dtype=torch.uint8)})
    if name in PER_HEAD_FLOAT + PER_HEAD_INT:
        forms.update({
            "length_plus_1": torch.ones(Hq + 1, dtype=dt), "empty": torch.ones(0, dtype=dt),
            "batch_plus_1": torch.ones(B + 1, Hq, dtype=dt), "heads_plus_1": torch.ones(B, Hq + 1, dtype=dt),
            "rank3": torch.ones(1, 1, Hq, dtype=dt), "rank3_trailing": torch.ones(B, Hq, 1, dtype=dt),
            "rank4": torch.ones(1, 1, 1, Hq, dtype=dt), "zero_batch": torch.ones(0, Hq, dtype=dt),
        })
        if Hq > 1:
            forms["length_minus_1"] = torch.ones(Hq - 1, dtype=dt)
    if name in VECTORS:
        forms.update({
            "float": 2.0, "int": 1, "scalar_tensor": torch.tensor(1.0, dtype=F64), "heads_only": torch.ones(Hq),
            "d_plus_1": torch.ones(Hq, D + 1), "heads_plus_1": torch.ones(Hq + 1, D),
            "batch_plus_1": torch.ones(B + 1, Hq, D), "rank4": torch.ones(1, 1, Hq, D), "transposed":
            torch.ones(D + 1, Hq), "int_tensor": torch.ones(Hq, D, dtype=torch.int64),
        })
    if name == "key_bias":
        forms.update({
            "float": 0.5, "int": 0, "keys_plus_1": torch.zeros(Sk + 1), "heads_plus_1": torch.zeros(Hq + 1, Sk),
            "batch_plus_1": torch.zeros(B + 1, Hq, Sk), "rank4": torch.zeros(1, B, Hq, Sk),
            "int_tensor": torch.zeros(Sk, dtype=torch.int64), "nan": torch.tensor([NAN] * Sk, dtype=F64),
            "one_nan": torch.zeros(B, Hq, Sk, dtype=F64).index_put_((torch.tensor(B - 1), torch.tensor(0),
                                                                       torch.tensor(Sk - 1)), torch.tensor(NAN, dtype=F64)),
        })
    # values that have no meaning
    if name == "window":
        forms.update({"zero": 0, "zero_tensor": torch.tensor([2] * (Hq - 1) + [0]),
                      "zero_batch_row": torch.tensor([[2] * Hq] * (B - 1) + [[0] + [2] * (Hq - 1)])})
    if name == "sinks":
        forms.update({"negative": -1, "negative_tensor": torch.tensor([0] * (Hq - 1) + [-3]),
                      "negative_batch_row": torch.tensor([[0] * Hq] * (B - 1) + [[-1] + [0] * (Hq - 1)])})
    if name == "alpha":
        forms.update({"above_one": 1.5, "negative": -0.1, "nan": NAN, "inf": INF, "nan_tensor":
                      torch.tensor([0.5] * (Hq - 1) + [NAN], dtype=F64), "above_one_row":
                      torch.tensor([[0.5] * Hq] * (B - 1) + [[1.0 + 1e-9] + [0.5] * (Hq - 1)], dtype=F64)})
    if name == "softmax_scale":
        forms.update({"nan": NAN, "inf": INF, "minus_inf": -INF, "nan_tensor": torch.tensor([NAN] * Hq, dtype=F64),
                      "inf_tensor": torch.tensor([1.0] * (Hq - 1) + [INF], dtype=F64), "nan_scalar_tensor":
                      torch.tensor(NAN, dtype=F64)})
    if name == "sink_logit":
        forms.update({"nan": NAN, "nan_tensor": torch.tensor([0.0] * (Hq - 1) + [NAN], dtype=F64)})
    return forms


# ------------------------------------------------------------------------------ headops.attention


@prop(0.25)
@given(st.data())
def test_attention_rejects_wrong_per_head_arguments(data):
    s = data.draw(shapes(), label="shapes")
    name = data.draw(st.sampled_from(ALL_ARGS), label="argument")
    forms = wrong_forms(name, s)
    form = data.draw(st.sampled_from(sorted(forms)), label="form")
    q, k, v = make_qkv(s)
    assert_rejected(lambda: headops.attention(q, k, v, layout=s["layout"], **{name: forms[form]}), name,
                    f"{name} as {form} ({s})")


def qkv_wrong_forms(s):
    """{form: (q, k, v, extra kwargs, words the message may name)}."""
    q, k, v = make_qkv(s)
    B, Sq, Sk, Hq, Hkv, D, layout = s["B"], s["Sq"], s["Sk"], s["Hq"], s["Hkv"], s["D"], s["layout"]
    dt = s["dtype"]

    def shaped(B_, S, H, D_, dtype=dt):
        shape = (B_, S, H, D_) if layout == "bshd" else (B_, H, S, D_)
        return torch.randn(shape, dtype=F64).to(dtype)

    other = torch.float32 if dt == F64 else F64
    forms = {
        "q_list": (q.tolist(), k, v, {}, "q"), "k_none": (q, None, v, {}, "k"), "v_float": (q, k, 1.0, {}, "v"),
        "q_numpy": (q.numpy(), k, v, {}, "q"), "k_string": (q, "k", v, {}, "k"),
        "q_rank3": (q[0], k, v, {}, "q"), "k_rank5": (q, k[None], v, {}, "k"), "v_rank2": (q, k, v[0, 0], {}, "v"),
        "q_rank0": (torch.tensor(1.0, dtype=dt), k, v, {}, "q"),
        "k_head_dim": (q, shaped(B, Sk, Hkv, D + 1), shaped(B, Sk, Hkv, D + 1), {}, "k"),
        "heads_not_divisible": (q, shaped(B, Sk, Hq + 1, D), shaped(B, Sk, Hq + 1, D), {}, "k"),
        "no_kv_heads": (q, shaped(B, Sk, 0, D), shaped(B, Sk, 0, D), {}, "k"),
        "k_batch": (q, shaped(B + 1, Sk, Hkv, D), shaped(B + 1, Sk, Hkv, D), {}, "k"),
        "v_keys": (q, k, shaped(B, Sk + 1, Hkv, D), {}, "v"),
        "v_heads": (q, k, shaped(B, Sk, 2 * Hq, D), {}, "v"),
        "head_dim_zero": (shaped(B, Sq, Hq, 0), shaped(B, Sk, Hkv, 0), shaped(B, Sk, Hkv, 0), {}, "q"),
        "int_dtype": (q.long(), k.long(), v.long(), {}, "q"), "bool_dtype": (q > 0, k > 0, v > 0, {}, "q"),
        "int32_q": (q.int(), k, v, {}, "q"), "complex_dtype": (q.to(torch.complex64), k.to(torch.complex64),
                                                               v.to(torch.complex64), {}, "q"),
        "k_other_dtype": (q, k.to(other), v, {}, "k"), "v_other_dtype": (q, k, v.to(other), {}, "v"),
        "half_vs_bfloat16": (q.half(), k.bfloat16(), v.bfloat16(), {}, "k"),
        "k_meta": (q, k.to("meta"), v, {}, "k"), "v_meta": (q, k, v.to("meta"), {}, "v"),
        "all_meta": (q.to("meta"), k.to("meta"), v.to("meta"), {}, "q"),
        "q_sparse": (q.to_sparse(), k, v, {}, "q"), "v_sparse": (q, k, v.to_sparse(), {}, "v"),
        "q_nested": (nested(list(q)), k, v, {}, "q"),
        "k_nested_jagged": (q, nested(list(k), torch.jagged), v, {}, "k"),
    }
    for bad in ("BSHD", "bsh", "sbhd", "", None, 1, ["bshd"], b"bshd"):
        forms[f"layout_{bad!r}"] = (q, k, v, {"layout": bad}, "layout")
    for bad in (1, 0, None, "True", np.bool_(True), torch.tensor(True)):
        forms[f"causal_{bad!r}"] = (q, k, v, {"causal": bad}, "causal")
    for bad in (1, "yes", None, np.bool_(False)):
        forms[f"return_lse_{bad!r}"] = (q, k, v, {"return_lse": bad}, "return_lse")
    forms["return_lse_with_alpha"] = (q, k, v, {"return_lse": True, "alpha": 0.5}, "alpha")
    return forms


@prop(0.1)
@given(st.data())
def test_attention_rejects_wrong_qkv(data):
    s = data.draw(shapes(), label="shapes")
    forms = qkv_wrong_forms(s)
    form = data.draw(st.sampled_from(sorted(forms)), label="form")
    q, k, v, extra, word = forms[form]
    kw = {"layout": s["layout"], **extra}
    assert_rejected(lambda: headops.attention(q, k, v, **kw), word, f"{form} ({s})")


def accepted_forms(name, s):
    """Odd but accepted forms of per-head argument `name`: {form: value}."""
    B, Hq, D, Sk = s["B"], s["Hq"], s["D"], s["Sk"]
    gen = torch.Generator().manual_seed(s["seed"] + 1)

    def rand(*shape, low=0.0, high=1.0):
        return torch.rand(shape, generator=gen, dtype=F64) * (high - low) + low

    forms = {}
    if name in PER_HEAD_FLOAT:
        lo, hi = {"softmax_scale": (-1.0, 2.0), "gate": (-2.0, 2.0), "alpha": (0.0, 1.0),
                  "sink_logit": (-3.0, 3.0)}[name]
        forms.update({
            "python_int": 1 if name != "sink_logit" else -2, "python_zero": 0, "numpy_float": np.float64(0.75),
            "numpy_float32": np.float32(0.25), "fraction": fractions.Fraction(1, 2), "scalar_tensor":
            torch.tensor(0.5, dtype=F64), "half_tensor": rand(Hq, low=lo, high=hi).half(), "float32_tensor":
            rand(Hq, low=lo, high=hi).float(), "batch_1": rand(1, Hq, low=lo, high=hi), "batch": rand(B, Hq, low=lo,
                                                                                                          high=hi),
            "strided": rand(2 * Hq, low=lo, high=hi)[::2], "batch_transposed": rand(Hq, B, low=lo, high=hi).t(),
            "expanded": rand(1, low=lo, high=hi).expand(Hq), "requires_grad": rand(Hq, low=lo, high=hi)
            .requires_grad_(True), "bounds": torch.tensor([lo, hi] * Hq, dtype=F64)[:Hq],
        })
    if name == "gate":
        forms.update({"inf": INF, "nan": NAN, "huge": 1e30, "nan_tensor": torch.tensor([NAN] + [1.0] * (Hq - 1)),
                      "zeros": torch.zeros(B, Hq)})
    if name == "softmax_scale":
        forms.update({"negative": -0.5, "zero": 0.0, "large": 50.0})
    if name == "sink_logit":
        forms.update({"inf": INF, "minus_inf": -INF, "mixed_inf": torch.tensor([INF, -INF] * Hq, dtype=F64)[:Hq]})
    if name == "alpha":
        forms.update({"one": 1, "ones": torch.ones(Hq), "zeros": torch.zeros(B, Hq)})
    if name in PER_HEAD_INT:
        lo = 0 if name == "sinks" else 1
        forms.update({
            "numpy_int": np.int64(2), "numpy_int32": np.int32(3), "int32_tensor": torch.tensor([lo + 1] * Hq,
                                                                                             dtype=torch.int32),
            "int16_tensor": torch.tensor([lo + 2] * Hq, dtype=torch.int16), "uint8_tensor":
            torch.arange(lo, lo + Hq, dtype=torch.uint8), "huge": 2**40, "max_int64": 2**63 - 1,
            "batch_1": torch.full((1, Hq), lo + 1), "batch": torch.randint(lo, 5, (B, Hq), generator=gen),
            "strided": torch.arange(lo, lo + 2 * Hq)[::2], "scalar_tensor": torch.tensor(lo + 1),
        })
    if name == "window":
        forms.update({"unlimited": -1, "very_negative": -2**63, "mixed": torch.tensor([-5, 1, 3, -1, 2, 7] * Hq)[:Hq]})
    if name in VECTORS:
        forms.update({
            "batch_1": rand(1, Hq, D, low=-2, high=2), "batch": rand(B, Hq, D, low=-2, high=2), "half":
            rand(Hq, D, low=-2, high=2).half(), "transposed": rand(D, Hq, low=-2, high=2).t(), "expanded":
            rand(1, 1, D).expand(B, Hq, D), "nan": torch.full((Hq, D), NAN), "inf": torch.full((Hq, D), INF),
            "strided_last": rand(Hq, 2 * D)[:, ::2],
        })
    if name == "key_bias":
        forms.update({
            "scalar_tensor": torch.tensor(0.7, dtype=F64), "one": rand(1), "keys": rand(Sk, low=-2, high=2),
            "heads_1": rand(Hq, 1, low=-2, high=2), "batch_1_1": rand(B, 1, 1, low=-2, high=2), "one_one_keys":
            rand(1, 1, Sk, low=-2, high=2), "full": rand(B, Hq, Sk, low=-2, high=2), "half": rand(Sk).half(),
            "minus_inf": torch.full((Sk,), -INF), "one_masked": torch.tensor([-INF] + [0.0] * (Sk - 1)),
            "plus_inf": torch.tensor([INF] + [0.0] * (Sk - 1)), "transposed": rand(Sk, Hq).t(), "expanded":
            rand(Sk).expand(B, Hq, Sk), "strided": rand(2 * Sk)[::2],
        })
    return forms


def compare_with_reference(out, want, dtype, what):
    """out (in dtype) against the float64 reference rounded to dtype (an output past the dtype's range is inf)."""
    out, want = out.to(F64), want.to(dtype).to(F64)
    assert out.shape == want.shape, what
    assert torch.equal(torch.isnan(out), torch.isnan(want)), f"{what}: NaN where the reference has none, or not " \
                                                             "where it has"
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: inf where the reference has none, or not where it has"
    atol = (1e-9 if dtype == F64 else OUT_ATOL[dtype]) * max(1.0, want[fin].abs().max().item() if fin.any() else 1.0)
    rtol = 1e-9 if dtype == F64 else OUT_RTOL[dtype]
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


@prop(0.2)
@given(st.data())
def test_attention_accepted_odd_forms_match_the_reference(data):
    s = data.draw(shapes(), label="shapes")
    name = data.draw(st.sampled_from(ALL_ARGS), label="argument")
    forms = accepted_forms(name, s)
    form = data.draw(st.sampled_from(sorted(forms)), label="form")
    q, k, v = make_qkv(s)
    strides = data.draw(st.sampled_from(["contiguous", "last_dim_strided", "transposed"]), label="q/k/v strides")
    if strides == "last_dim_strided":  # the last dim not contiguous: accepted (copied)
        q, k, v = (torch.stack([t, t], dim=-1)[..., 0] for t in (q, k, v))
        assert q.stride(-1) == 2 or q.shape[-1] == 1
    elif strides == "transposed":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    kw = {"layout": s["layout"], name: forms[form], "causal": data.draw(st.booleans(), label="causal")}
    if name not in ("window", "sinks") and data.draw(st.booleans(), label="with a window"):
        kw["window"] = torch.tensor([2, -1, 1] * s["Hq"])[:s["Hq"]]  # (alpha's branches differ)
    what = f"{name} as {form}, q/k/v {strides} ({s})"
    out = headops.attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape, what
    ref_kw = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    want = reference.attention(q.double(), k.double(), v.double(), **ref_kw)
    compare_with_reference(out, want, q.dtype, what)


# ------------------------------------------------------------------------------ HeadSparseCache


@st.composite
def cache_specs(draw):
    L, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * group
    recent = draw(st.integers(0, 2))
    kinds = [draw(st.sampled_from(["full", "streaming", "budget"])) for _ in range(Hkv)]
    window, sinks, budget = [], [], []
    for h in range(Hkv):
        for _ in range(group):
            window.append({"full": draw(st.sampled_from([-1, 2])), "streaming": draw(st.integers(1, 4)),
                           "budget": -1}[kinds[h]])
            sinks.append(draw(st.integers(0, 2)))
        budget.append(max(sinks[h * group:(h + 1) * group]) + recent + 1 + draw(st.integers(0, 3))
                      if kinds[h] == "budget" else None)
    return dict(num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=draw(st.sampled_from([1, 4, 8])), kinds=kinds,
                window=window, sinks=sinks, budget=budget, budget_recent=recent, max_step=draw(st.integers(1, 3)),
                dtype=draw(st.sampled_from([F64, torch.float32])), batch_size=draw(st.integers(1, 2)))


def constructor_wrong_forms(c):
    """{form: (overrides, words the message may name)}."""
    L, Hq, Hkv = c["num_layers"], c["num_heads"], c["num_kv_heads"]
    forms = {}
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "batch_size", "max_step", "split_keys"):
        for bad in (0, -1, 1.5, 2.0, "2", None, True, [2], torch.tensor(2)):
            if name in ("num_heads", "split_keys") and bad is None:  # (None: from the model / chosen per step)
                continue
            forms[f"{name}_{bad!r}"] = ({name: bad}, name)
    forms["num_heads_not_multiple"] = ({"num_heads": Hkv * 2 + 1, "num_kv_heads": Hkv * 2}, "num_heads")
    for bad in ("stream", "", None, 5, ["full"] * (Hkv + 1), [["full"] * Hkv] * (L + 1), [1] * Hkv,
                torch.zeros(Hkv), {"full": 1}, [["full"] * (Hkv + 1)] * L):
        forms[f"kinds_{bad!r}"] = ({"kinds": bad}, "kinds")
    forms["kinds_budget_without_budget"] = ({"kinds": "budget", "window": -1, "budget": None}, "budget")
    for name in ("window", "sinks"):
        for bad in (2.5, "3", True, [1] * (Hq + 1), [[1] * Hq] * (L + 1), [[1] * (Hq + 1)] * L, [1.5] * Hq, [None] * Hq,
                    {0: 1}, 2**70, -2**70, torch.full((Hq,), 1.0), object(), [[1] * Hq, 2] if L == 2 else [[1], 2]):
            forms[f"{name}_{bad!r}"] = ({name: bad}, name)
    forms["window_0"] = ({"window": [-1] * (Hq - 1) + [0]}, "window")
    forms["sinks_negative"] = ({"sinks": [0] * (Hq - 1) + [-2]}, "sinks")
    if "streaming" in c["kinds"]:
        forms["streaming_unlimited_window"] = ({"window": -1}, "window")
        # rings grow with what they receive, so a window of 2**40 is accepted (test_kvcache); refused is
        # one whose ring alone could not be sized in int64 elements for this batch and head dim, and
        # likewise max_step (each ring holds up to window + max_step - 1 tokens)
        ring_past_int64 = -(-2**62 // (c["batch_size"] * c["head_dim"]))
        forms["streaming_window_past_int64_storage"] = ({"window": ring_past_int64}, ["window", "max_step"])
        forms["max_step_past_int64_storage"] = ({"max_step": ring_past_int64}, "max_step")
    if "budget" in c["kinds"]:
        forms["budget_head_with_window"] = ({"window": 3}, "window")
        for bad in (None, 0, -1, c["budget_recent"]):
            forms[f"budget_small_{bad!r}"] = ({"budget": bad}, "budget")
        forms["budget_too_big"] = ({"budget": 2**62}, "budget")
    forms["budgets_past_int64"] = ({"kinds": "budget", "window": -1, "budget": [2**62] * Hkv}, "budget")
    forms["rings_past_int64"] = ({"kinds": "streaming", "window": 2**62}, ["window", "max_step"])
    for bad in (2.5, True, "8", [8] * (Hkv + 1), [[8] * Hkv] * (L + 1), [8.0] * Hkv, {0: 8}, object()):
        forms[f"budget_{bad!r}"] = ({"budget": bad}, "budget")
    for bad in (-1, 1.5, True, None, "2"):
        forms[f"budget_recent_{bad!r}"] = ({"budget_recent": bad}, "budget_recent")
    for bad in (torch.int64, torch.int32, torch.bool, torch.complex64, "float32", float, np.float32, 1):
        forms[f"dtype_{bad!r}"] = ({"dtype": bad}, "dtype")
    for bad in ("bogus", "meta", "cuda:0", 3, torch.device("meta")):
        forms[f"device_{bad!r}"] = ({"device": bad}, "device")
    forms["spec_not_a_spec"] = ({"spec": "spec"}, "spec")
    return forms


@prop(0.1)
@given(st.data())
def test_cache_constructor_rejects_wrong_forms(data):
    c = data.draw(cache_specs(), label="spec")
    headops.HeadSparseCache(**c)  # the base is valid
    forms = constructor_wrong_forms(c)
    form = data.draw(st.sampled_from(sorted(forms)), label="form")
    over, words = forms[form]
    assert_rejected(lambda: headops.HeadSparseCache(**{**c, **over}), words, f"{form} ({c})")


def cache_call_wrong_forms(c, cache, S, phase, gen):
    """{form: (callable(cache), words)} for a cache after a prompt of S tokens (phase "decode") or
    before anything ("prefill")."""
    B, Hq, Hkv, D, dtype = c["batch_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"], c["dtype"]
    n = 1 if phase == "decode" else S

    def t(S_, H, D_=D, B_=B, dt=dtype):
        return torch.randn(B_, S_, H, D_, generator=gen, dtype=F64).to(dt)

    q, k, v = t(n, Hq), t(n, Hkv), t(n, Hkv)
    other = torch.float32 if dtype == F64 else F64
    L = c["num_layers"]
    forms = {
        "layer_too_big": (lambda x: x.attention(L, q, k, v), "layer"),
        "layer_negative": (lambda x: x.attention(-1, q, k, v), "layer"),
        "layer_float": (lambda x: x.attention(0.0, q, k, v), "layer"),
        "layer_bool": (lambda x: x.attention(True, q, k, v), "layer"),
        "layer_none": (lambda x: x.attention(None, q, k, v), "layer"),
        "layer_string": (lambda x: x.attention("0", q, k, v), "layer"),
        "q_list": (lambda x: x.attention(0, q.tolist(), k, v), "q"),
        "k_none": (lambda x: x.attention(0, q, None, v), "k"),
        "v_numpy": (lambda x: x.attention(0, q, k, v.numpy()), "v"),
        "q_rank3": (lambda x: x.attention(0, q[0], k, v), "q"),
        "k_rank5": (lambda x: x.attention(0, q, k[None], v), "k"),
        "q_heads": (lambda x: x.attention(0, t(n, Hq + 1), k, v), "q"),
        "q_batch": (lambda x: x.attention(0, t(n, Hq, B_=B + 1), t(n, Hkv, B_=B + 1), t(n, Hkv, B_=B + 1)), "q"),
        "q_head_dim": (lambda x: x.attention(0, t(n, Hq, D + 1), t(n, Hkv, D + 1), t(n, Hkv, D + 1)), "q"),
        "k_heads": (lambda x: x.attention(0, q, t(n, Hkv + 1), t(n, Hkv + 1)), "k"),
        "k_head_dim": (lambda x: x.attention(0, q, t(n, Hkv, D + 1), t(n, Hkv, D + 1)), "k"),
        "v_tokens": (lambda x: x.attention(0, q, k, t(n + 1, Hkv)), ["k", "v"]),
        "q_dtype": (lambda x: x.attention(0, q.to(other), k.to(other), v.to(other)), "q"),
        "k_dtype": (lambda x: x.attention(0, q, k.to(other), v), "k"),
        "v_int": (lambda x: x.attention(0, q, k, v.long()), "v"),
        "q_meta": (lambda x: x.attention(0, q.to("meta"), k.to("meta"), v.to("meta")), "q"),
        "k_meta": (lambda x: x.attention(0, q, k.to("meta"), v.to("meta")), "k"),
        "q_sparse": (lambda x: x.attention(0, q.to_sparse(), k, v), "q"),
        "v_sparse": (lambda x: x.attention(0, q, k, v.to_sparse()), "v"),
        "layout": (lambda x: x.attention(0, q, k, v, layout="BSHD"), "layout"),
        "layout_none": (lambda x: x.attention(0, q, k, v, layout=None), "layout"),
        "causal_int": (lambda x: x.attention(0, q, k, v, causal=1), "causal"),
        "causal_none": (lambda x: x.attention(0, q, k, v, causal=None), "causal"),
        "window_given": (lambda x: x.attention(0, q, k, v, window=2), "window"),
        "sinks_given": (lambda x: x.attention(0, q, k, v, sinks=torch.zeros(Hq, dtype=torch.int64)), "sinks"),
        "unknown_argument": (lambda x: x.attention(0, q, k, v, scale=0.5), "scale"),
        "return_lse": (lambda x: x.attention(0, q, k, v, return_lse=True), "return_lse"),
        "append_layer": (lambda x: x.append(L, k, v), "layer"),
        "append_layer_bool": (lambda x: x.append(False, k, v), "layer"),
        "append_k_list": (lambda x: x.append(0, k.tolist(), v), "k"),
        "append_v_list_bhsd": (lambda x: x.append(0, k, v.tolist(), layout="bhsd"), "v"),
        "append_k_dtype": (lambda x: x.append(0, k.to(other), v), "k"),
        "append_k_heads": (lambda x: x.append(0, t(n, Hkv + 1), t(n, Hkv + 1)), "k"),
        "append_v_shape": (lambda x: x.append(0, k, t(n + 1, Hkv)), ["k", "v"]),
        "append_meta": (lambda x: x.append(0, k.to("meta"), v.to("meta")), "k"),
        "append_sparse": (lambda x: x.append(0, k, v.to_sparse()), "v"),
        "append_layout": (lambda x: x.append(0, k, v, layout="bsdh"), "layout"),
    }
    # every wrong form of every per-head argument (window and sinks are the cache's: any is refused)
    s = dict(B=B, Sq=n, Sk=S + (n if phase == "decode" else 0), Hq=Hq, Hkv=Hkv, D=D)
    for name in PER_HEAD_FLOAT + VECTORS + ("key_bias",):
        for form, value in wrong_forms(name, s).items():
            forms[f"{name}_{form}"] = ((lambda value, name: lambda x: x.attention(0, q, k, v, **{name: value}))(
                value, name), name)
    if any(kind != "full" for kind in c["kinds"]):
        group = Hq // Hkv
        h = next(i for i, kind in enumerate(c["kinds"]) if kind != "full") * group
        alpha = torch.zeros(Hq, dtype=F64)
        alpha[h] = 0.5
        forms["alpha_on_a_streaming_or_budget_head"] = (lambda x: x.attention(0, q, k, v, alpha=alpha), "alpha")
        forms["alpha_scalar_with_a_streaming_or_budget_head"] = (lambda x: x.attention(0, q, k, v, alpha=0.3),
                                                                 "alpha")
    if phase == "prefill":
        for bad in ([1.5] * B, [S + 1] * B, [0] * B, [S] * (B + 1), "ab", [True] * B, [None] * B, [[S] * B, [S] * B],
                    [2**70] * B, torch.full((B,), 1.0), {0: S}, object()):
            forms[f"lengths_{bad!r}"] = ((lambda bad: lambda x: x.attention(0, q, k, v, lengths=bad))(bad), "lengths")
    else:
        forms["lengths_at_decode"] = (lambda x: x.attention(0, q, k, v, lengths=[1] * B), "lengths")
        forms["q_k_tokens_differ"] = (lambda x: x.attention(0, t(n + 1, Hq), k, v), "q")
        if any(kind != "full" for kind in c["kinds"]):
            m = c["max_step"] + 1
            forms["probed_step_past_max_step"] = (
                lambda x: x.attention(0, t(m, Hq), t(m, Hkv), t(m, Hkv), probe=headops.Probe(entropy=True)),
                ["max_step", "k"])
    return forms


@prop(0.15)
@given(st.data())
def test_cache_calls_reject_wrong_forms_and_leave_the_cache_unchanged(data):
    c = data.draw(cache_specs(), label="spec")
    phase = data.draw(st.sampled_from(["prefill", "decode"]), label="phase")
    S = data.draw(st.integers(1, 6), label="prompt")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    cache = headops.HeadSparseCache(**c)
    B, Hq, Hkv, D = c["batch_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"]

    def t(S_, H):
        return torch.randn(B, S_, H, D, generator=gen, dtype=F64).to(c["dtype"])

    if phase == "decode":
        cache.attention(0, t(S, Hq), t(S, Hkv), t(S, Hkv))
    forms = cache_call_wrong_forms(c, cache, S, phase, gen)
    form = data.draw(st.sampled_from(sorted(forms)), label="form")
    call, words = forms[form]
    lengths = [cache.seq_lengths(i).tolist() for i in range(c["num_layers"])]
    held = cache.nbytes()
    kept = [cache._layers[0].kept_positions(b, h).tolist() for b in range(B) for h in range(Hkv)]
    assert_rejected(lambda: call(cache), words, f"{form} at {phase} ({c})")
    assert [cache.seq_lengths(i).tolist() for i in range(c["num_layers"])] == lengths, f"{form}: lengths changed"
    assert cache.nbytes() == held, f"{form}: the storage changed"
    assert [cache._layers[0].kept_positions(b, h).tolist() for b in range(B) for h in range(Hkv)] == kept
    # and the cache still works
    n = 1 if phase == "decode" else S
    out = cache.attention(0, t(n, Hq), t(n, Hkv), t(n, Hkv))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------ HeadSpec


class Config:
    """The attention shape of a transformers config."""

    def __init__(self, L, Hq, Hkv, D):
        self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads, self.head_dim = L, Hq, Hkv, D
        self.hidden_size = Hq * D


def spec_wrong_forms(L, Hq, Hkv, D, tmp_dir):
    """{form: (callable, words)}."""
    cfg = Config(L, Hq, Hkv, D)
    HS = headops.HeadSpec
    forms = {}
    for i, name in enumerate(("num_layers", "num_heads", "num_kv_heads", "head_dim")):
        for bad in (0, -1, 1.5, "2", None, True, [2]):
            args = [L, Hq, Hkv, D]
            args[i] = bad
            forms[f"{name}_{bad!r}"] = ((lambda args: lambda: HS(*args))(args), name)
    forms["num_heads_not_multiple"] = (lambda: HS(L, 2 * Hkv + 1, 2 * Hkv, D), "num_heads")
    for bad in (object(), None, 3, "config", type("Partial", (), {"num_hidden_layers": 2})()):
        forms[f"dense_{type(bad).__name__}"] = ((lambda bad: lambda: HS.dense(bad))(bad), "model_or_config")
    spec = HS.dense(cfg)
    # heads: {layer: [indices]}
    for method, limit in (("mask_heads", Hq), ("streaming", Hkv), ("budget", Hkv)):
        def call(heads, method=method, **kw):
            if method == "mask_heads":
                return lambda: spec.mask_heads(heads)
            if method == "streaming":
                return lambda: HS.streaming(cfg, heads, window=kw.get("window", 4), sinks=kw.get("sinks", 1))
            return lambda: HS.budget(cfg, heads, budget=kw.get("budget", 8))

        for bad in ([0], None, 0, "0", {0, 1}):
            if method == "budget" and bad is None:
                continue  # HeadSpec.budget(model, None, ...): every KV head a budget head
            forms[f"{method}_heads_{bad!r}"] = (call(bad), "heads")
        for bad in (L, -1, "0", 0.0, True, None):
            forms[f"{method}_layer_{bad!r}"] = (call({bad: [0]}), "layer")
        for bad in (limit, -1, 0.5, True, "0", None):
            forms[f"{method}_head_{bad!r}"] = (call({0: [bad]}), "heads")
        for bad in (0, None, "01", {0: 1}, 1.5):
            forms[f"{method}_head_list_{bad!r}"] = (call({0: bad}), "heads")
        if method == "streaming":
            for bad in (0, -1, 1.5, True, None, "4", 2**70):
                forms[f"streaming_window_{bad!r}"] = (call({0: [0]}, window=bad), "window")
            for bad in (-1, 1.5, True, None, "4", 2**70):
                forms[f"streaming_sinks_{bad!r}"] = (call({0: [0]}, sinks=bad), "sinks")
        if method == "budget":
            for bad in (0, -1, 1.5, True, None, "8"):
                forms[f"budget_budget_{bad!r}"] = (call({0: [0]}, budget=bad), "budget")
    # DuoAttention patterns
    rows = [" ".join(["1"] * Hkv)] * L
    for form, text in (("non_numeric", "\n".join(rows[:-1] + [" ".join(["x"] * Hkv)])),
                       ("too_few_rows", "\n".join(rows[:-1])), ("too_many_columns", "\n".join(r + " 1" for r in rows)),
                       ("empty", "\n")):
        path = os.path.join(tmp_dir, f"duo_{form}.tsv")
        with open(path, "w") as f:
            f.write(text)
        forms[f"duo_{form}"] = ((lambda path: lambda: HS.from_duo_attention(cfg, path, sinks=4, window=8))(path),
                                "pattern")
    good = os.path.join(tmp_dir, "duo_good.tsv")
    with open(good, "w") as f:
        f.write("\n".join(rows))
    for keep_alpha in (False, True):
        forms[f"duo_window_0_{keep_alpha}"] = (lambda keep_alpha=keep_alpha: HS.from_duo_attention(
            cfg, good, sinks=4, window=0, keep_alpha=keep_alpha), "window")
        forms[f"duo_sinks_negative_{keep_alpha}"] = (lambda keep_alpha=keep_alpha: HS.from_duo_attention(
            cfg, good, sinks=-1, window=8, keep_alpha=keep_alpha), "sinks")

    # validate after a field was set wrong
    def validated(**fields):
        def call():
            s = spec.copy()
            for n, value in fields.items():
                setattr(s, n, value)
            s.validate()
        return call

    for name in ("gate", "softmax_scale", "alpha", "sink_logit"):
        for form, bad in (("list", [[1.0] * Hq] * L), ("int", torch.ones(L, Hq, dtype=torch.int64)),
                          ("complex", torch.ones(L, Hq, dtype=torch.complex64)), ("heads", torch.ones(L, Hq + 1)),
                          ("layers", torch.ones(L + 1, Hq)), ("flat", torch.ones(L * Hq)), ("number", 1.0)):
            forms[f"validate_{name}_{form}"] = (validated(**{name: bad}), name)
    for name in ("out_scale", "out_bias"):
        for form, bad in (("list", [1.0]), ("int", torch.ones(L, Hq, D, dtype=torch.int64)),
                          ("no_D", torch.ones(L, Hq)), ("D_plus_1", torch.ones(L, Hq, D + 1))):
            forms[f"validate_{name}_{form}"] = (validated(**{name: bad}), name)
    for form, bad in (("list", [1.0]), ("2d", torch.ones(L, Hq)), ("heads", torch.ones(L, Hq + 1, 3)),
                      ("int", torch.ones(L, Hq, 3, dtype=torch.int64))):
        forms[f"validate_key_bias_{form}"] = (validated(key_bias=bad), "key_bias")
    for name in ("window", "sinks"):
        for form, bad in (("float", torch.ones(L, Hq)), ("list", [[1] * Hq] * L), ("int32", torch.ones(
                L, Hq, dtype=torch.int32)), ("shape", torch.ones(L, Hq + 1, dtype=torch.int64)), ("none", None)):
            forms[f"validate_{name}_{form}"] = (validated(**{name: bad}), name)
    forms["validate_window_0"] = (validated(window=torch.zeros(L, Hq, dtype=torch.int64)), "window")
    forms["validate_sinks_negative"] = (validated(sinks=torch.full((L, Hq), -1, dtype=torch.int64)), "sinks")
    for form, bad in (("unknown", [["full"] * (Hkv - 1) + ["stream"]] * L), ("str", "full"),
                      ("layers", [["full"] * Hkv] * (L + 1)), ("heads", [["full"] * (Hkv + 1)] * L), ("none", None)):
        forms[f"validate_cache_kind_{form}"] = (validated(cache_kind=bad), "cache_kind")
    for form, bad in (("layers", [[None] * Hkv] * (L + 1)), ("float", [[8.0] * Hkv] * L), ("none", None),
                      ("flat", [None] * Hkv if L > 1 else 8)):
        forms[f"validate_cache_budget_{form}"] = (validated(cache_budget=bad), "cache_budget")
    forms["validate_another_model"] = (lambda: spec.validate(Config(L + 1, Hq, Hkv, D)), "the spec")
    forms["validate_not_a_model"] = (lambda: spec.validate(object()), "model_or_config")
    # layer_args
    for bad in (L, -1, 0.0, True, None, "0"):
        forms[f"layer_args_layer_{bad!r}"] = ((lambda bad: lambda: spec.layer_args(bad))(bad), "layer")
    for bad in (-1, 1.5, "3", True):
        forms[f"layer_args_keys_{bad!r}"] = ((lambda bad: lambda: spec.layer_args(0, bad))(bad), "keys")
    for bad in (0, None, "no"):
        forms[f"layer_args_visibility_{bad!r}"] = ((lambda bad: lambda: spec.layer_args(0, 3, visibility=bad))(bad),
                                                   "visibility")
    biased = spec.copy()
    biased.key_bias = torch.zeros(L, Hq, 2)
    forms["layer_args_key_bias_without_keys"] = (lambda: biased.layer_args(0), "key_bias")
    # from_dict
    d = spec.to_dict()
    forms["from_dict_list"] = (lambda: HS.from_dict(list(d.items())), "d")
    for key in ("num_layers", "num_heads", "window", "cache_kind", "cache_budget"):
        forms[f"from_dict_without_{key}"] = ((lambda key: lambda: HS.from_dict({n: x for n, x in d.items()
                                                                                 if n != key}))(key), key)
    for key, bad in (("window", [[1.5] * Hq] * L), ("sinks", "x"), ("gate", "x"), ("gate", [[1.0] * (Hq + 1)] * L),
                     ("cache_kind", "full"), ("softmax_scale", [[1.0], [1.0, 2.0]]), ("num_layers", 0)):
        forms[f"from_dict_{key}_{bad!r}"[:60]] = ((lambda key, bad: lambda: HS.from_dict({**d, key: bad}))(key, bad),
                                                  key)
    return forms


@prop(0.1)
@given(data=st.data())
def test_head_spec_rejects_wrong_forms(data, tmp_path_factory):
    Hkv = data.draw(st.integers(1, 3), label="Hkv")
    L, Hq, D = data.draw(st.integers(1, 3), label="L"), Hkv * data.draw(st.integers(1, 2), label="group"), 8
    forms = spec_wrong_forms(L, Hq, Hkv, D, str(tmp_path_factory.mktemp("duo")))
    form = data.draw(st.sampled_from(sorted(forms)), label="form")
    call, words = forms[form]
    assert_rejected(call, words, f"{form} (L={L}, Hq={Hq}, Hkv={Hkv})")


# ------------------------------------------------------------------------------ every form once
# The random draws above vary the shapes; these sweeps make sure that every form of each catalogue
# runs at least once (on a few fixed shapes), whatever the number of examples.

SWEEP_SHAPES = [dict(B=2, Sq=3, Sk=4, Hq=4, Hkv=2, D=8, dtype=F64, layout="bshd", seed=0),
                dict(B=1, Sq=1, Sk=1, Hq=1, Hkv=1, D=1, dtype=torch.float32, layout="bhsd", seed=1)]
SWEEP_CACHES = [dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, kinds=["streaming", "budget"],
                     window=[2, 3, -1, -1], sinks=[1, 0, 0, 1], budget=[None, 9], budget_recent=2, max_step=2,
                     dtype=F64, batch_size=2),
                dict(num_layers=1, num_heads=3, num_kv_heads=1, head_dim=1, kinds=["full"], window=[-1, 2, 1],
                     sinks=[0, 1, 2], budget=None, budget_recent=0, max_step=1, dtype=torch.float32, batch_size=1),
                # streaming without budget heads: a window given to every head is refused for the
                # streaming head's sake, not because a budget head may not have one
                dict(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, kinds=["full", "streaming"],
                     window=[-1, 2, 5, 3], sinks=[0, 0, 1, 2], budget=None, budget_recent=0, max_step=3,
                     dtype=F64, batch_size=2)]


def run_all(cases):
    """Runs every (what, check) and reports all failures at once."""
    failures = []
    for what, check in cases:
        try:
            check()
        except BaseException as e:  # noqa: BLE001 - collected, reported below
            failures.append(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    assert not failures, f"{len(failures)} of {len(cases)} forms failed:\n" + "\n".join(failures[:40])
    return len(cases)


def test_every_wrong_form_of_headops_attention_once():
    cases = []
    for s in SWEEP_SHAPES:
        q, k, v = make_qkv(s)
        for name in ALL_ARGS:
            for form, value in wrong_forms(name, s).items():
                cases.append((f"{name} as {form} ({s['Hq']} heads)", lambda name=name, value=value, q=q, k=k, v=v,
                              s=s: assert_rejected(lambda: headops.attention(q, k, v, layout=s["layout"],
                                                                             **{name: value}), name, "")))
        for form, (q_, k_, v_, extra, word) in qkv_wrong_forms(s).items():
            cases.append((form, lambda q_=q_, k_=k_, v_=v_, extra=extra, word=word, s=s: assert_rejected(
                lambda: headops.attention(q_, k_, v_, **{"layout": s["layout"], **extra}), word, "")))
    assert run_all(cases) > 500


def test_every_accepted_form_once():
    cases = []
    for s in SWEEP_SHAPES:
        q, k, v = make_qkv(s)
        for name in ALL_ARGS:
            for form, value in accepted_forms(name, s).items():
                def check(name=name, value=value, s=s, q=q, k=k, v=v):
                    kw = {"layout": s["layout"], name: value}
                    out = headops.attention(q, k, v, **kw)
                    ref_kw = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
                    want = reference.attention(q.double(), k.double(), v.double(), **ref_kw)
                    compare_with_reference(out, want, q.dtype, "")
                cases.append((f"{name} as {form} ({s['Hq']} heads)", check))
    assert run_all(cases) > 200


def test_every_wrong_form_of_the_cache_once():
    cases = []
    for c in SWEEP_CACHES:
        for form, (over, words) in constructor_wrong_forms(c).items():
            cases.append((f"constructor {form}", lambda over=over, words=words, c=c: assert_rejected(
                lambda: headops.HeadSparseCache(**{**c, **over}), words, "")))
        for phase in ("prefill", "decode"):
            gen = torch.Generator().manual_seed(0)
            S, B, Hq, Hkv, D = 3, c["batch_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"]
            prompt = [torch.randn(B, S, H, D, generator=gen, dtype=F64).to(c["dtype"]) for H in (Hq, Hkv, Hkv)]
            for form, (call, words) in cache_call_wrong_forms(c, None, S, phase, gen).items():
                def check(call=call, words=words, phase=phase, prompt=prompt, c=c):
                    cache = headops.HeadSparseCache(**c)
                    if phase == "decode":
                        cache.attention(0, *prompt)
                    before = (cache.seq_lengths(0).tolist(), cache.nbytes())
                    assert_rejected(lambda: call(cache), words, "")
                    assert (cache.seq_lengths(0).tolist(), cache.nbytes()) == before, "the cache changed"
                cases.append((f"{form} at {phase} (kinds {c['kinds']})", check))
    assert run_all(cases) > 500


def test_every_wrong_form_of_head_spec_once(tmp_path):
    cases = []
    for L, Hq, Hkv in ((2, 4, 2), (1, 1, 1)):
        for form, (call, words) in spec_wrong_forms(L, Hq, Hkv, 8, str(tmp_path)).items():
            cases.append((f"{form} (L={L}, Hq={Hq}, Hkv={Hkv})", (lambda call, words: lambda: assert_rejected(
                call, words, ""))(call, words)))
    assert run_all(cases) > 200
