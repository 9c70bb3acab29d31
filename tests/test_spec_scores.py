"""HeadSpec.from_scores and the pooling of per-head scores (headops.head_scores); per-batch alpha
([B, L, Hq]) in a spec and through a patched model."""

import types

import pytest
import torch

import headops
from headops.head_scores import jaccard, overlaps, pool_kv_heads, rank_correlation, top_heads

CONFIG = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, head_dim=4)


def test_pooling_takes_the_max_or_mean_of_each_kv_group():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.2, 0.0, 0.4],
                           [1.0, 0.0, 0.3, 0.5, 0.6, 0.6]])
    torch.testing.assert_close(pool_kv_heads(scores, 3, "max"), torch.tensor([[0.9, 0.2, 0.4], [1.0, 0.5, 0.6]]))
    torch.testing.assert_close(pool_kv_heads(scores, 3, "mean"), torch.tensor([[0.5, 0.2, 0.2], [0.5, 0.4, 0.6]]))
    assert torch.equal(pool_kv_heads(scores, 6, "max"), scores)  # MHA: one query head per group
    with pytest.raises(ValueError, match="num_kv_heads must be an int >= 1 dividing the 6"):
        pool_kv_heads(scores, 4)
    with pytest.raises(ValueError, match="how must be one of max, mean"):
        pool_kv_heads(scores, 3, "median")


def test_top_heads_breaks_ties_in_layer_head_order_and_jaccard():
    kv = torch.tensor([[0.5, 0.9, 0.5], [0.1, 0.9, 0.0]])
    assert top_heads(kv, 4) == [(0, 1), (1, 1), (0, 0), (0, 2)]
    assert top_heads(kv, 0) == []
    with pytest.raises(ValueError, match=r"count must be an int in \[0, 6\]"):
        top_heads(kv, 7)
    assert jaccard([(0, 1), (1, 1)], [(1, 1), (0, 2)]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0


def test_overlaps_compare_top_kv_and_query_heads_pair_by_pair():
    a = torch.tensor([[0.9, 0.0, 0.1, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0, 0.8, 0.0]])
    b = torch.tensor([[0.0, 0.7, 0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 0.9]])
    pairs, tops = overlaps({"a": a, "b": b}, 3, 0.5)
    # KV heads (max of each pair of query heads): a [[.9, .2, 0], [0, .3, .8]] top 3 = 0.0, 1.2, 1.1;
    # b [[.7, 0, .1], [0, 0, .9]] top 3 = 1.2, 0.0, 0.2: two of four heads shared
    assert tops["KV heads"] == {"a": [(0, 0), (1, 2), (1, 1)], "b": [(1, 2), (0, 0), (0, 2)]}
    assert pairs["KV heads"][("a", "b")] == pytest.approx(2 / 4)
    assert pairs["query heads"][("a", "b")] == jaccard(top_heads(a, 6), top_heads(b, 6))
    with pytest.raises(ValueError, match="differ in shape"):
        overlaps({"a": a, "b": b[:1]}, 3, 0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        overlaps({"a": a, "b": b}, 3, 0.0)


def spearman(x, y):
    """Spearman's rho by its definition: Pearson's correlation of the average ranks."""
    def ranks(v):
        v = v.flatten().tolist()
        return torch.tensor([sum(w < u for w in v) + (sum(w == u for w in v) - 1) / 2 for u in v],
                            dtype=torch.float64)
    rx, ry = ranks(x), ranks(y)
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def test_rank_correlation_is_spearmans_rho_with_average_ranks_for_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, a.exp()) == pytest.approx(1.0)  # ranks, not values
    b = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert rank_correlation(a, b) == pytest.approx(spearman(a, b))
    tied = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 2.0]])  # ties: average ranks
    other = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0, 0.0]])
    assert rank_correlation(tied, other) == pytest.approx(spearman(tied, other))
    assert rank_correlation(torch.zeros(2, 3), a[:2, :3]) != rank_correlation(torch.zeros(2, 3), a[:2, :3])  # NaN
    with pytest.raises(ValueError, match="tensors of one shape"):
        rank_correlation(a, b[:2])


def test_from_scores_keeps_the_top_kv_heads_full_and_streams_the_rest():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.2, 0.0, 0.4],
                           [1.0, 0.0, 0.3, 0.5, 0.6, 0.6]])  # max-pooled: [[.9, .2, .4], [1., .5, .6]]
    spec = headops.HeadSpec.from_scores(CONFIG, scores, full_fraction=0.5, window=8, sinks=2)
    assert spec.cache_kind == [["full", "streaming", "streaming"], ["full", "streaming", "full"]]
    assert spec.window.tolist() == [[-1, -1, 8, 8, 8, 8], [-1, -1, 8, 8, -1, -1]]
    assert spec.sinks.tolist() == [[0, 0, 2, 2, 2, 2], [0, 0, 2, 2, 0, 0]]
    mean = headops.HeadSpec.from_scores(CONFIG, scores, full_fraction=0.5, window=8, sinks=2, pool="mean")
    assert mean.cache_kind == [["full", "streaming", "streaming"], ["full", "streaming", "full"]]
    by_threshold = headops.HeadSpec.from_scores(CONFIG, scores, threshold=0.45, window=8, sinks=2)
    assert by_threshold.cache_kind == [["full", "streaming", "streaming"], ["full", "full", "full"]]
    kv = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # per KV head already
    assert headops.HeadSpec.from_scores(CONFIG, kv, full_fraction=1 / 6, window=8, sinks=2).cache_kind == \
        [["streaming", "full", "streaming"], ["streaming"] * 3]
    assert headops.HeadSpec.from_scores(CONFIG, kv, full_fraction=0.0, window=8, sinks=2).cache_kind == \
        [["streaming"] * 3] * 2


@pytest.mark.parametrize("kw, error, match", [
    (dict(scores=torch.zeros(2, 4)), ValueError, r"scores must be \[L, Hkv\] = \[2, 3\] or \[L, Hq\] = \[2, 6\]"),
    (dict(scores=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "scores must be a floating-point tensor"),
    (dict(scores=torch.full((2, 3), float("nan"))), ValueError, "scores must be free of NaN"),
    (dict(full_fraction=1.5), ValueError, r"full_fraction must be a number in \[0, 1\]"),
    (dict(full_fraction=None), ValueError, "give one of full_fraction and threshold"),
    (dict(threshold=0.5), ValueError, "give one of full_fraction and threshold"),
    (dict(window=0), ValueError, "window must be an int >= 1"),
    (dict(sinks=-1), ValueError, "sinks must be an int >= 0"),
    (dict(pool="min"), ValueError, "pool must be one of max, mean"),
])
def test_from_scores_names_bad_arguments(kw, error, match):
    args = dict(scores=torch.zeros(2, 3), full_fraction=0.5, window=8, sinks=2) | kw
    with pytest.raises(error, match=match):
        headops.HeadSpec.from_scores(CONFIG, args.pop("scores"), **args)


def test_from_duo_attention_and_from_scores_agree(tmp_path):
    gates = torch.tensor([[0.2, 0.7, 0.5], [0.9, 0.1, 0.6]])
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("\n".join("\t".join(str(float(x)) for x in row) for row in gates) + "\n")
    duo = headops.HeadSpec.from_duo_attention(CONFIG, path, sinks=2, window=8, threshold=0.5)
    assert duo.to_dict() == headops.HeadSpec.from_scores(CONFIG, gates, threshold=0.5, window=8, sinks=2).to_dict()
    assert duo.cache_kind == [["streaming", "full", "streaming"], ["full", "streaming", "full"]]


def test_alpha_may_be_given_per_batch_row():
    spec = headops.HeadSpec(2, 6, 3, 4, alpha=torch.rand(5, 2, 6))
    assert spec.layer_args(1)["alpha"].shape == (5, 6)
    assert torch.equal(spec.slice_heads(range(2, 4)).alpha, spec.alpha[..., 2:4])
    with pytest.raises(ValueError, match=r"alpha must be \[L, Hq\] = \[2, 6\] or \[B, L, Hq\]"):
        headops.HeadSpec(2, 6, 3, 4, alpha=torch.rand(5, 2, 3))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        headops.HeadSpec(2, 6, 3, 4, alpha=torch.full((5, 2, 6), 2.0))


def test_per_batch_alpha_through_a_patched_model_equals_each_row_alone():
    from headops.testing import tiny_llama

    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (3, 24))
    spec = headops.HeadSpec.dense(model)
    spec.window[:] = 4
    spec.sinks[:] = 1
    spec.alpha = torch.rand(3, spec.num_layers, spec.num_heads)
    spec.alpha[0] = 1.0
    spec.alpha[1, 0, :2] = 0.0
    headops.patch(model, spec)
    try:
        with torch.no_grad():
            batched = model(ids).logits
            for row in range(3):
                alone = spec.copy()
                alone.alpha = spec.alpha[row]
                headops.set_spec(model, alone)
                torch.testing.assert_close(batched[row], model(ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
            headops.set_spec(model, headops.HeadSpec.dense(model))
            torch.testing.assert_close(batched[0], model(ids[:1]).logits[0], atol=1e-5, rtol=1e-5)  # alpha 1: full
    finally:
        headops.unpatch(model)
