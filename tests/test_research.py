"""headops.research: importance, pruning curves, the prune command line (tiny random models)."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import headops

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from headops import research  # noqa: E402
from headops.testing import tiny_bert, tiny_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(dtype=torch.float32):
    return tiny_llama()[0].to(dtype)


def test_importance_from_the_gate_gradient_equals_finite_differences():
    model = tiny(torch.float64)
    ids = torch.randint(0, 97, (2, 16))
    grad = research.importance(model, [ids], normalize=False)
    # transformers' RMSNorm rounds through float32, so the loss is float32-accurate: eps 1e-2
    slow = research.importance_finite_difference(model, ids, eps=1e-2)
    torch.testing.assert_close(grad, slow.abs(), atol=2e-5, rtol=2e-3)
    assert not hasattr(model, "_headops_previous")  # importance() left the model unpatched
    normalised = research.importance(model, [ids, ids])
    torch.testing.assert_close(normalised.norm(dim=1), torch.ones(2, dtype=normalised.dtype))


def test_first_token_sensitivity_equals_finite_differences_of_its_scale():
    model = tiny(torch.float64)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    grad = research.first_token_sensitivity(model, [ids])
    assert grad.shape == (2, 4) and not hasattr(model, "_headops_previous")
    eps = 1e-2  # (transformers' RMSNorm rounds through float32: the loss is float32-accurate)
    dense = headops.HeadSpec.dense(model)
    for layer, h in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        losses = []
        for sign in (1, -1):
            scale = torch.ones(2, 4, dtype=torch.float64)
            scale[layer, h] = math.exp(sign * eps)
            with research.with_spec(model, dense.scale_first_token(scale)), torch.no_grad():
                losses.append(float(research.causal_lm_loss(model, ids)))
        torch.testing.assert_close(grad[layer, h].item(), (losses[0] - losses[1]) / (2 * eps), atol=2e-5, rtol=2e-3)
    twice = research.first_token_sensitivity(model, [ids, ids])
    torch.testing.assert_close(twice, 2 * grad)


def test_scaling_the_first_token_rescales_its_probability_in_every_row():
    """p -> s p / (s p + 1 - p) for the row's first real token, read by a probe; in a
    left-padded batch the first token is each row's own (HeadSpec.scale_first_token)."""
    model = tiny(torch.float64)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded by 3
    random = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3 + 0.2

    def first_token_mass(spec):  # [L, B, H, S]
        spans = [[[0, 1]], [[3, 4]]]  # each row's first real token
        with research.with_spec(model, spec), torch.no_grad(), headops.probe(model, spans=spans) as rec:
            model(ids, attention_mask=mask)
        return torch.stack([rec[layer][0].span_mass[..., 0] for layer in range(2)]).double()

    p = first_token_mass(headops.HeadSpec.dense(model))
    assert float(p[:, 1, :, 4:].min()) > 0  # (the padded row's first real token is the one probed)
    for layer in range(2):  # one layer scaled at a time: its queries and keys stay the dense model's
        scale = torch.ones(2, 4, dtype=torch.float64)
        scale[layer] = random
        scaled = first_token_mass(headops.HeadSpec.dense(model).scale_first_token(scale))
        s = random[None, :, None]
        want = s * p[layer] / (s * p[layer] + 1 - p[layer])
        torch.testing.assert_close(scaled[layer, 0], want[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(scaled[layer, 1, :, 3:], want[1, :, 3:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(scaled[:layer], p[:layer])  # the layers before it are untouched
    # a spec with key_bias already keeps it; 1 changes nothing; bad scales are named
    spec = headops.HeadSpec.dense(model).scale_first_token(2.0).scale_first_token(0.5)
    torch.testing.assert_close(spec.key_bias, torch.zeros(2, 4, 1))
    for bad in (0.0, -1.0, float("inf"), torch.ones(3, 4), True, "2"):
        with pytest.raises((ValueError, TypeError), match="scale"):
            headops.HeadSpec.dense(model).scale_first_token(bad)


def test_batched_coalitions_equal_each_mask_alone():
    model = tiny()
    ids = torch.randint(0, 97, (1, 20))
    order = [(layer, h) for layer in range(2) for h in range(4)][::-1]
    fractions = [0.0, 0.25, 0.5, 1.0]
    curve = research.pruning_curve(model, ids, order, fractions, repeats=1)
    headops.patch(model, headops.HeadSpec.dense(model))
    for row, gate in enumerate(curve["gates"]):
        spec = headops.HeadSpec.dense(model)
        spec.gate = gate
        headops.set_spec(model, spec)
        with torch.no_grad():
            alone = research.per_row_causal_lm_loss(model, ids)
        assert abs(alone.item() - curve["metric"][row]) < 1e-5
    assert curve["gates"][2].sum() == 4 and curve["gates"][3].sum() == 0


def test_pruning_every_head_of_a_layer_zeroes_its_attention_output():
    model = tiny()
    ids = torch.randint(0, 97, (1, 12))
    seen = {}
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0]))
    headops.patch(model, headops.HeadSpec.dense(model).mask_heads({1: [0, 1, 2, 3]}))
    with torch.no_grad(), headops.count_work() as w:
        model(ids)
    assert torch.equal(seen["x"], torch.zeros_like(seen["x"]))
    assert w.heads_skipped == 4


def test_prune_command_writes_csv_and_plot(tmp_path):
    out = tmp_path / "curve"
    proc = subprocess.run([sys.executable, "-m", "headops", "prune", "--model", "tiny", "--tokens", "24", "--steps",
                           "4", "--repeats", "1", "--quiet", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert [float(r["fraction_pruned"]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rows[0]["ppl_importance"] == rows[0]["ppl_random"] and rows[-1]["ppl_importance"] == rows[-1]["ppl_random"]
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert "attention's share" in proc.stdout


def test_shapley_over_every_permutation_is_the_exact_shapley_value():
    import itertools
    import math

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval().double()
    ids = torch.randint(0, 97, (1, 12))
    n = 4
    got = research.shapley(model, ids, permutations=list(itertools.permutations(range(n))), batch_size=7)
    # exact: phi_i = sum over coalitions S without i of |S|! (n-|S|-1)! / n! (v(S + i) - v(S))
    headops.patch(model, headops.HeadSpec.dense(model))

    def value(coalition):
        spec = headops.HeadSpec.dense(model)
        spec.gate = torch.zeros(n, dtype=torch.float64)
        spec.gate[list(coalition)] = 1.0
        spec.gate = spec.gate.view(2, 2)
        headops.set_spec(model, spec)
        with torch.no_grad():
            return -research.per_row_causal_lm_loss(model, ids).item()

    exact = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            for coalition in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                exact[i] += weight * (value(coalition + (i,)) - value(coalition))
    torch.testing.assert_close(got.flatten(), exact, atol=1e-9, rtol=1e-7)
    # efficiency: the values sum to v(all) - v(none)
    assert abs(got.sum().item() - (value(range(n)) - value(()))) < 1e-9


def _run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "headops", *args, "--quiet"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_encoder_pruning_curve_of_several_passages_equals_each_mask_alone():
    model, _ = tiny_bert()
    ids = torch.randint(3, 97, (3, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, 7:] = 0  # a padded passage
    with torch.no_grad():
        reference = research.sentence_embedding(model, batch)
    metric = research.embedding_similarity(reference)
    order = [(1, 3), (0, 0), (1, 1), (0, 2), (0, 1), (1, 0), (0, 3), (1, 2)]
    curve = research.pruning_curve(model, batch, order, [0.0, 0.5, 1.0], metric_fn=metric, repeats=1)
    assert abs(curve["metric"][0] - 1.0) < 1e-6  # nothing pruned: the unpruned embeddings
    headops.patch(model, headops.HeadSpec.dense(model))
    for row, gate in enumerate(curve["gates"]):
        spec = headops.HeadSpec.dense(model)
        spec.gate = gate
        headops.set_spec(model, spec)
        with torch.no_grad():
            alone = metric(model, batch)  # the 3 passages under this mask
        assert abs(alone.mean().item() - curve["metric"][row]) < 1e-5
    assert curve["metric"][2] < curve["metric"][0]
    chunked = research.pruning_curve(model, batch, order, [0.0, 0.5, 1.0], metric_fn=metric, repeats=1,
                                     max_batch_tokens=1)  # one mask per forward
    torch.testing.assert_close(chunked["metric"], curve["metric"], atol=1e-6, rtol=0)


def test_contrastive_importance_of_an_encoder_equals_finite_differences():
    model, _ = tiny_bert()
    model = model.double()
    ids = torch.randint(3, 97, (4, 8))
    half = lambda x: {"input_ids": x, "attention_mask": torch.ones_like(x)}  # noqa: E731
    pair = (half(ids[:, :4]), half(ids[:, 4:]))
    grad = research.importance(model, [pair], loss_fn=research.contrastive_embedding_loss, normalize=False)
    slow = research.importance_finite_difference(model, pair, loss_fn=research.contrastive_embedding_loss, eps=1e-4)
    torch.testing.assert_close(grad, slow.abs(), atol=1e-7, rtol=1e-4)
    assert grad.min() > 0  # every head moves the loss


def test_prune_command_on_an_encoder_writes_cosine_similarity(tmp_path):
    out = tmp_path / "enc"
    stdout = _run_cli("prune", "--model", "tiny-bert", "--tokens", "16", "--passages", "3", "--steps", "2",
                      "--repeats", "1", "--out", str(out))
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert [float(r["fraction_pruned"]) for r in rows] == [0.0, 0.5, 1.0]
    assert abs(float(rows[0]["cos_sim_importance"]) - 1.0) < 1e-5
    assert rows[-1]["cos_sim_importance"] == rows[-1]["cos_sim_random"]
    assert (tmp_path / "enc.png").stat().st_size > 1000 and "per mask: batched" in stdout


def test_shapley_command_writes_every_head(tmp_path):
    out = tmp_path / "sh"
    stdout = _run_cli("shapley", "--model", "tiny", "--tokens", "12", "--permutations", "2", "--out", str(out))
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(layer, h) for layer in range(2) for h in range(4)]
    assert all(math.isfinite(float(r["shapley"])) for r in rows)
    assert (tmp_path / "sh.png").stat().st_size > 1000 and "Spearman" in stdout
