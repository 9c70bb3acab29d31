"""Models whose layers differ in attention shape (transformers' per-layer configs): Gemma 4's
full-attention layers have another head dim than its sliding ones (512 and 256), and its larger
models fewer KV heads there (num_global_key_value_heads, attention_k_eq_v: 26B-A4B's 2). A spec
then holds head_dim and num_kv_heads per layer; what is decided per KV head (cache kinds, budgets,
DuoAttention's alpha, pattern files) follows each layer's KV heads, and a HeadSparseCache keeps a
storage of each layer's shape."""

import pytest
import torch

import headops

from conftest import (GENERATE_LOGITS, assert_dense_and_masked_heads_are_the_model, assert_generated_alike,
                      assert_importance_is_the_finite_differences, edit_heads_before, left_padded_ids,
                      logits_with_reference_attention)

transformers = pytest.importorskip("transformers")

from headops.testing import tiny_per_layer_shapes  # noqa: E402

FULL_LAYER = 5  # (layer_types: five sliding layers, then a full-attention one)


def gemma4(other_kv_heads=True, **options):
    return tiny_per_layer_shapes(other_kv_heads, **options)[0]


def output_projection(model):
    return lambda layer: model.model.layers[layer].self_attn.o_proj


def test_layers_of_other_head_dims_gemma4():
    """Gemma 4's full-attention layers have another head dim than its sliding ones (before
    2026-12-06 reading config.head_dim raised transformers' AmbiguousGlobalPerLayer error): a
    spec's head_dim is then one per layer, and a dense spec is the model; a masked head of either
    kind is its module's head (its slice zeroed before o_proj); out_scale / out_bias of another
    last dim than the largest head dim are refused naming it. (The Gemma models whose last layers
    reuse earlier layers' keys, num_kv_shared_layers: test_shared_kv_layers.)"""
    model = gemma4(other_kv_heads=False)
    spec = headops.HeadSpec.dense(model)
    assert spec.head_dim == (16, 16, 16, 16, 16, 32) and spec.num_kv_heads == 2
    assert_dense_and_masked_heads_are_the_model(model, spec, {1: [2], 5: [0, 3]}, output_projection(model))
    with_scale = spec.copy()
    with_scale.out_scale = torch.ones(6, 4, 16)
    with pytest.raises(ValueError, match=r"out_scale must be \[L, Hq, D\] = \[6, 4, 32\] \(D = out_dim, the largest"):
        headops.set_spec(model, with_scale)


def test_layers_of_other_kv_heads_gemma4():
    """Gemma 4 26B/31B-like: one KV head (keys = values) in the full-attention layer, two in the
    sliding ones (before 2026-12-07 such models were refused): num_kv_heads per layer; a dense
    spec is the model, masked heads in a sliding layer and in the full one (a whole GQA group of
    4 there) are its zeroed slices; head importance equals central differences."""
    model = gemma4()
    spec = headops.HeadSpec.dense(model)
    assert spec.num_kv_heads == (2, 2, 2, 2, 2, 1) and spec.head_dim == (16, 16, 16, 16, 16, 32)
    assert [spec.kv_group(layer) for layer in range(6)] == [2, 2, 2, 2, 2, 4]
    assert [len(row) for row in spec.cache_kind] == [2, 2, 2, 2, 2, 1]
    assert_dense_and_masked_heads_are_the_model(model, spec, {1: [2], FULL_LAYER: [0, 1, 3]}, output_projection(model))
    ids, mask = left_padded_ids()
    headops.set_spec(model, spec)
    assert_importance_is_the_finite_differences(model, dict(input_ids=ids, attention_mask=mask, labels=ids),
                                                [(1, 0), (1, 3), (FULL_LAYER, 0), (FULL_LAYER, 2)])


def test_lofit_scales_read_each_layers_head_dim():
    """out_scale / out_bias [L, Hq, out_dim = 32] on Gemma 4: a sliding layer's heads read their
    first 16 entries, the full layer's all 32. Logits are the unpatched model's with those slices
    scaled and shifted before o_proj (a sliding and the full layer edited), and a LoFiT step's
    gradients are that model's gradients of the same edit (0 on the entries no layer reads), with
    the model's own cache in generation too (before 2026-12-07 refused)."""
    model = gemma4()
    ids, mask = left_padded_ids()
    spec = headops.HeadSpec.dense(model)
    assert spec.out_dim == 32
    g = torch.Generator().manual_seed(4)
    scale = (1 + 0.5 * torch.randn(6, 4, 32, generator=g)).requires_grad_(True)
    bias = (0.3 * torch.randn(6, 4, 32, generator=g)).requires_grad_(True)
    edited = (1, FULL_LAYER)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])

    def lofit(layer):  # (each head's first entries, as many as its slice has dims)
        return lambda h, x: x * scale[layer, h, :x.shape[-1]] + bias[layer, h, :x.shape[-1]]

    hooks = [edit_heads_before(model.model.layers[layer].self_attn.o_proj, lofit(layer), spec.head_dim[layer])
             for layer in edited]
    want = model(ids[:1]).logits
    loss_of(want).backward()
    want_grads = scale.grad.clone(), bias.grad.clone()
    for hook in hooks:
        hook.remove()
    scale.grad = bias.grad = None
    spec.out_scale, spec.out_bias = torch.ones(6, 4, 32), torch.zeros(6, 4, 32)
    with torch.no_grad():
        for layer in edited:
            spec.out_scale[layer], spec.out_bias[layer] = scale[layer], bias[layer]
    spec.out_scale.requires_grad_(True)
    spec.out_bias.requires_grad_(True)
    headops.patch(model, spec)
    got = model(ids[:1]).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    loss_of(got).backward()
    for grad, want_grad in zip((spec.out_scale.grad, spec.out_bias.grad), want_grads):
        torch.testing.assert_close(grad[list(edited)], want_grad[list(edited)], atol=1e-5, rtol=1e-4)
        assert float(grad[1, :, 16:].abs().max()) == 0.0 and float(grad[1, :, :16].abs().max()) > 0
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                    use_cache=False)
    assert torch.equal(generated, recomputed)


def test_streaming_heads_of_each_layers_kv_heads_are_the_reference():
    """HeadSpec.streaming by each layer's KV heads (KV head 1 of sliding layer 1: query heads 2, 3;
    the full layer's one KV head: all four query heads): the patched model's logits equal the
    unpatched model's with its attention computed by the reference (GQA per layer) over the same
    keys, every sliding layer's heads given windows within the model's 8."""
    model = gemma4()
    ids, _ = left_padded_ids()
    spec = headops.HeadSpec.streaming(model, {1: [1], FULL_LAYER: [0]}, window=3, sinks=1)
    assert spec.window[1].tolist() == [-1, -1, 3, 3] and spec.window[FULL_LAYER].tolist() == [3, 3, 3, 3]
    assert spec.cache_kind[1] == ["full", "streaming"] and spec.cache_kind[FULL_LAYER] == ["streaming"]
    spec.window[:FULL_LAYER][spec.window[:FULL_LAYER] < 0] = 6  # (the oracle need not know the model's window)
    want = logits_with_reference_attention(model, ids, spec.window, spec.sinks)
    headops.patch(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_spec_methods_follow_each_layers_kv_heads(tmp_path):
    """Every constructor that decides per KV head does so with each layer's: StreamingLLM, RazorAttention,
    budgets, HeadKV and PyramidKV (in the full layer: the sliding ones keep their window), scores
    (per query head, pooled by the layer's group; [L, Hkv] scores cannot be given), DuoAttention's
    pattern files (rows of each layer's length), save / load, slices of whole groups."""
    from headops import discover

    model = gemma4()
    counts = [2, 2, 2, 2, 2, 1]
    llm = headops.HeadSpec.streaming_llm(model, window=3, sinks=1)
    assert [row.count("streaming") for row in llm.cache_kind] == counts
    razor = headops.HeadSpec.razor(model, [(0, 1), (FULL_LAYER, 0)], window=3, sinks=1)
    assert razor.cache_kind[0] == ["streaming", "full"] and razor.cache_kind[FULL_LAYER] == ["full"]
    assert razor.cache_compensation[1] == ["weighted", "weighted"] and razor.cache_compensation[FULL_LAYER] == [None]
    budget = headops.HeadSpec.budget(model, {FULL_LAYER: [0]}, budget=5)
    assert budget.cache_budget[FULL_LAYER] == [5] and budget.cache_kind[0] == ["full", "full"]
    with pytest.raises(ValueError, match=r"KV head indices in \[0, 1\) in layer 5"):
        headops.HeadSpec.budget(model, {FULL_LAYER: [1]}, budget=5)

    scores = torch.arange(24, dtype=torch.float64).view(6, 4)
    scores[FULL_LAYER] = torch.tensor([0.0, 100.0, 0.0, 0.0])  # the full layer's group: max 100, mean 25
    top = headops.HeadSpec.from_scores(model, scores, full_fraction=2 / 11, window=3, sinks=1)
    # KV heads pooled by max: layer 4's (17, 19) and the full layer's 100 are the top 2 of 11
    assert [layer for layer, row in enumerate(top.cache_kind) for kind in row if kind == "full"] == [4, FULL_LAYER]
    assert top.cache_kind[4] == ["streaming", "full"]
    by_mean = headops.HeadSpec.from_scores(model, scores, threshold=15.0, window=3, sinks=1, pool="mean")
    assert by_mean.cache_kind[3:] == [["streaming", "streaming"], ["full", "full"], ["full"]]  # (means 14.5, 16.5, 25)
    with pytest.raises(ValueError, match=r"scores must be \[L, Hq\] = \[6, 4\] \(the layers differ in KV heads"):
        headops.HeadSpec.from_scores(model, torch.zeros(6, 2), full_fraction=0.5, window=3, sinks=1)
    headkv = headops.HeadSpec.headkv(model, scores + 1, budget=8, beta=2.0)  # (the sliding layers keep their window)
    assert headkv.cache_budget == [[None, None]] * 5 + [[8]] and headkv.cache_kind[FULL_LAYER] == ["budget"]
    pyramid = headops.HeadSpec.pyramid(model, budget=12)
    assert pyramid.cache_budget == [[None, None]] * 5 + [[12]]

    pattern = [torch.tensor([0.9, 0.1])] * 5 + [torch.tensor([0.7])]
    path = tmp_path / "full_attention_heads.tsv"
    discover.write_full_attention_heads(path, pattern)
    duo = headops.HeadSpec.from_duo_attention(model, path, sinks=1, window=3)
    assert duo.cache_kind == [["full", "streaming"]] * 5 + [["full"]]
    mixed = headops.HeadSpec.from_duo_attention(model, path, sinks=1, window=3, keep_alpha=True)
    torch.testing.assert_close(mixed.alpha, torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 5 + [[0.7] * 4]))
    (tmp_path / "short.tsv").write_text("0.5\t0.5\n" * 6)
    with pytest.raises(ValueError, match=r"6 rows of each layer's KV heads \(\[2, 2, 2, 2, 2, 1\]\)"):
        headops.HeadSpec.from_duo_attention(model, tmp_path / "short.tsv", sinks=1, window=3)

    duo.save(tmp_path / "spec.json")
    loaded = headops.HeadSpec.load(tmp_path / "spec.json")
    assert loaded.num_kv_heads == (2, 2, 2, 2, 2, 1) and loaded.cache_kind == duo.cache_kind
    assert torch.equal(loaded.window, duo.window)
    assert duo.slice_heads(range(0, 4)).cache_kind == duo.cache_kind
    with pytest.raises(ValueError, match=r"whole GQA groups \(4 query heads share each KV head"):
        duo.slice_heads(range(0, 2))  # (whole groups of the sliding layers, not of the full one)
    bad = duo.copy()
    bad.cache_kind[FULL_LAYER] = ["full", "full"]
    with pytest.raises(ValueError, match=r"cache_kind must be \[L\]\[Hkv\] with Hkv = \(2, 2, 2, 2, 2, 1\)"):
        bad.validate()


def test_head_scores_pool_by_each_layers_groups(tmp_path):
    """head_scores.pool_kv_heads with num_kv_heads per layer (spec.num_kv_heads) pools each layer's
    query heads by its own group (a list of each layer's [Hkv]); top_heads ranks such a list as it
    ranks a tensor; the discover command's CSV names each query head's KV head by its layer's group."""
    from headops.cli.discover import read_scores, write_scores
    from headops.head_scores import pool_kv_heads, top_heads

    model = gemma4()
    spec = headops.HeadSpec.dense(model)
    scores = torch.arange(24, dtype=torch.float64).view(6, 4)
    pooled = pool_kv_heads(scores, spec.num_kv_heads, "mean")
    assert [row.tolist() for row in pooled] == [[4 * l + 0.5, 4 * l + 2.5] for l in range(5)] + [[21.5]]
    assert pool_kv_heads(scores, 2, "max").tolist() == [[4 * l + 1, 4 * l + 3] for l in range(6)]  # (an int: as before)
    assert top_heads(pooled, 3) == [(5, 0), (4, 1), (4, 0)]
    assert top_heads([row for row in pool_kv_heads(scores, 2)], 3) == top_heads(pool_kv_heads(scores, 2), 3)
    with pytest.raises(ValueError, match="a tuple of one per layer, 6"):
        pool_kv_heads(scores, (2, 2, 1))
    write_scores(str(tmp_path / "s.csv"), scores, spec.num_kv_heads)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[1].startswith("0,0,0,") and lines[4].startswith("0,3,1,") and lines[-1].startswith("5,3,0,")
    assert torch.equal(read_scores(str(tmp_path / "s.csv")), scores)


def test_duo_attention_per_layer_kv_heads(tmp_path):
    """DuoAttention's optimisation and ablation with one alpha per KV head of each layer: info's
    kv_alpha / kv_loss a list of each layer's, each query head's value its KV head's; the
    ablation's batched forwards (per-row alpha) give what one head a batch gives; the learnt
    pattern file reads back."""
    from headops import discover, tasks
    from headops.testing import CharTokenizer

    model = gemma4()
    tok = CharTokenizer()
    prompts = [tasks.multi_passkey(tok, 360, passkeys=2, words=2, seed=seed) for seed in range(2)]
    learnt = discover.duo_attention(model, prompts, sinks=1, window=4, steps=2, lr=0.05)
    kv_alpha = learnt.info["kv_alpha"]
    assert [tuple(row.shape) for row in kv_alpha] == [(2,)] * 5 + [(1,)]
    assert learnt.info["distillation"][0] < 1e-10  # (alpha = 1: the model)
    assert float(kv_alpha[FULL_LAYER][0]) < 1.0  # (the L1 term pulled it)
    spec = headops.HeadSpec.dense(model)
    want = torch.stack([row.repeat_interleave(spec.kv_group(layer)) for layer, row in enumerate(kv_alpha)])
    torch.testing.assert_close(learnt.values, want.double())
    discover.write_full_attention_heads(tmp_path / "learnt.tsv", kv_alpha)
    keep = headops.HeadSpec.from_duo_attention(model, tmp_path / "learnt.tsv", sinks=1, window=4, keep_alpha=True)
    torch.testing.assert_close(keep.alpha, want.clamp(0, 1))

    whole = discover.duo_ablation(model, prompts, sinks=1, window=4)
    one_by_one = discover.duo_ablation(model, prompts, sinks=1, window=4, max_batch_tokens=1)
    kv_loss = whole.info["kv_loss"]
    assert [tuple(row.shape) for row in kv_loss] == [(2,)] * 5 + [(1,)]
    assert all(bool((row > 0).all()) for row in kv_loss)
    torch.testing.assert_close(whole.values, one_by_one.values, atol=1e-10, rtol=1e-8)
    assert whole.values[FULL_LAYER].tolist() == [float(kv_loss[FULL_LAYER][0])] * 4
    assert whole.values[2].tolist() == [float(kv_loss[2][0])] * 2 + [float(kv_loss[2][1])] * 2


# ---------------------------------------------------------------------------------------------
# HeadSparseCache: a storage per layer of that layer's KV heads and head dim


def cache_bytes(cache, tokens, B, itemsize=4):
    """K and V bytes of `tokens` tokens for each of B rows in every KV head of every layer."""
    def of(value, layer):
        return value[layer] if isinstance(value, tuple) else value

    return sum(tokens * B * of(cache.num_kv_heads, layer) * 2 * of(cache.head_dim, layer) * itemsize
               for layer in range(cache.num_layers))


@pytest.mark.parametrize("kv_heads", ["same", "other"])
def test_head_sparse_cache_on_layers_of_other_shapes(kv_heads):
    """Gemma 4 (head dims 16 / 32, and KV heads 2 / 1 in "other"): a dense spec through
    HeadSparseCache(model, spec) generates the model's own logits (left-padded batch; its sliding
    layers keep their windows), beams too; StreamingLLM and a streaming full layer generate what
    recomputing without a cache does; SnapKV budgets and RazorAttention run; bytes count each
    layer's own shape (before 2026-12-07 such a cache was refused)."""
    model = gemma4(other_kv_heads=kv_heads == "other")
    ids, mask = left_padded_ids()
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
               pad_token_id=0)
    with torch.no_grad():
        want = model.generate(**gen, **GENERATE_LOGITS)
        beams = model.generate(**gen, num_beams=3)
    dense = headops.HeadSpec.dense(model)
    headops.patch(model, dense)
    cache = headops.HeadSparseCache(model, dense)
    assert cache.num_kv_heads == dense.num_kv_heads and cache.head_dim == (16, 16, 16, 16, 16, 32)
    with torch.no_grad():
        assert_generated_alike(model.generate(**gen, **GENERATE_LOGITS, cache=cache), want)
        # 13 prompt tokens and 11 generated held per row (the last generated one is not stored)
        assert cache.dense_nbytes() == cache_bytes(cache, 24, 2)
        assert torch.equal(model.generate(**gen, num_beams=3, cache=headops.HeadSparseCache(model, dense)), beams)
        for spec in (headops.HeadSpec.streaming_llm(model, window=4, sinks=1),
                     headops.HeadSpec.streaming(model, {FULL_LAYER: [0]}, window=3, sinks=1)):
            headops.set_spec(model, spec)
            cache = headops.HeadSparseCache(model, spec)
            assert_generated_alike(model.generate(**gen, **GENERATE_LOGITS, cache=cache),
                                   model.generate(**gen, **GENERATE_LOGITS, use_cache=False))
            assert cache.nbytes() < cache.dense_nbytes()
        for spec in (headops.HeadSpec.budget(model, {FULL_LAYER: list(range(dense.kv_heads(FULL_LAYER)))}, budget=12),
                     headops.HeadSpec.razor(model, {0: [1]}, window=4, sinks=1)):
            headops.set_spec(model, spec)
            cache = headops.HeadSparseCache(model, spec)
            assert model.generate(**gen, cache=cache).shape == (2, 25)
            assert cache.ideal_nbytes() < cache.dense_nbytes()


def test_a_cache_from_a_dense_prefill_of_layers_of_other_shapes():
    """capture_prefill of Gemma 4 (KV heads and head dims per layer) and HeadSparseCache.from_prefill:
    the question, then greedy decoding through it, as through a cache the patched model filled
    itself (prefill="full"), for a dense spec and a streaming full layer."""
    model = gemma4()
    g = torch.Generator().manual_seed(5)
    context, question = torch.randint(3, 97, (1, 20), generator=g), torch.randint(3, 97, (1, 4), generator=g)
    prefill = headops.capture_prefill(model, context, observation_window=4)
    ids = torch.cat([context, question], dim=1)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **GENERATE_LOGITS)
    for spec in (headops.HeadSpec.dense(model), headops.HeadSpec.streaming(model, {FULL_LAYER: [0]}, window=4,
                                                                             sinks=1)):
        headops.patch(model, spec)
        with torch.no_grad():
            got = model.generate(ids, cache=headops.HeadSparseCache.from_prefill(model, spec, prefill, max_step=4),
                                 **gen)
            row = headops.HeadSparseCache(model, spec, prefill="full", max_step=4)
            model(context, cache=row, use_cache=True)
            want = model.generate(ids, cache=row, **gen)
        assert_generated_alike(got, want)
        headops.unpatch(model)
