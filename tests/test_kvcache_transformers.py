"""HeadSparseCache as a transformers.Cache: model.generate(..., cache=cache) with an
attention function that routes to the cache (the model integration registers one like it)."""

import pytest
import torch

import headops

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402

from headops.testing import tiny_llama  # noqa: E402

WINDOW, SINKS = [-1, -1, 3, 3], [0, 0, 2, 2]  # query heads 2, 3 (KV head 1) are streaming


def _cache_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cache = kwargs["headops_cache"]
    out = cache.attention(module.layer_idx, q, k, v, layout="bhsd", softmax_scale=scaling)
    return out.transpose(1, 2), None


def _recompute_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # the same per-head spec over the whole sequence, no cache
    out = headops.attention(q, k, v, layout="bhsd", softmax_scale=scaling, window=torch.tensor(WINDOW),
                            sinks=torch.tensor(SINKS))
    return out.transpose(1, 2), None


AttentionInterface.register("headops_cache_test", _cache_attention)
AttentionInterface.register("headops_recompute_test", _recompute_attention)


def use(model, implementation):
    model.config._attn_implementation = implementation
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = implementation


def test_cache_is_a_transformers_cache_and_generates_like_eager():
    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (1, 12))
    use(model, "eager")
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    cache = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, kinds="full", max_step=1)
    assert isinstance(cache, transformers.Cache)
    use(model, "headops_cache_test")
    got = model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 12 + 11  # the last generated token is never fed back


def test_streaming_heads_generate_like_recomputing_with_the_same_spec():
    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (1, 10))
    use(model, "headops_recompute_test")
    want = model.generate(ids, max_new_tokens=15, do_sample=False, use_cache=False)
    cache = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                    kinds=["full", "streaming"], window=WINDOW, sinks=SINKS, max_step=1)
    use(model, "headops_cache_test")
    got = model.generate(ids, max_new_tokens=15, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    assert cache.ideal_nbytes() < cache.dense_nbytes()  # (at 25 tokens the 64-token segment dominates nbytes)


@pytest.mark.parametrize("beams, returned", [(3, 1), (2, 2)])
def test_beam_search_generates_like_recomputing_with_the_same_spec(beams, returned):
    """generate(num_beams=...) reorders the cache's rows every step (HeadSparseCache.reorder_cache):
    two prompts of a batch, each beam's streaming head keeping its own row's tokens."""
    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (2, 10))
    options = dict(max_new_tokens=12, do_sample=False, num_beams=beams, num_return_sequences=returned,
                   attention_mask=torch.ones_like(ids), pad_token_id=0)
    use(model, "headops_recompute_test")
    want = model.generate(ids, use_cache=False, **options)
    cache = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                    kinds=["full", "streaming"], window=WINDOW, sinks=SINKS, max_step=1)
    use(model, "headops_cache_test")
    got = model.generate(ids, cache=cache, **options)
    assert torch.equal(got, want)
    assert cache.batch_size == 2 * beams


def test_a_second_turn_continues_the_same_cache():
    """generate, then generate again from the whole conversation with the same cache: the second
    prompt (more tokens than max_step) runs as steps of max_step, and the answer is what
    recomputing every step with the same spec gives."""
    model, _ = tiny_llama()
    first = torch.randint(0, 97, (1, 10))
    use(model, "headops_recompute_test")
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    answer = model.generate(first, use_cache=False, **kw)
    second = torch.cat([answer, torch.randint(0, 97, (1, 9))], 1)
    want = model.generate(second, use_cache=False, **kw)
    cache = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                    kinds=["full", "streaming"], window=WINDOW, sinks=SINKS, max_step=2)
    use(model, "headops_cache_test")
    assert torch.equal(model.generate(first, cache=cache, **kw), answer)
    assert torch.equal(model.generate(second, cache=cache, **kw), want)


def test_assisted_generation_crops_the_cache():
    """generate(assistant_model=...): the target model verifies each draft in one call and crops the
    rejected tokens from the cache (HeadSparseCache.crop); the tokens are those of recomputing every
    step with the same spec."""
    model, _ = tiny_llama()
    assistant, _ = tiny_llama()
    with torch.no_grad():  # a draft model close to the target, whose drafts are partly rejected
        for p in assistant.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    ids = torch.randint(0, 97, (1, 12))
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    use(model, "headops_recompute_test")
    want = model.generate(ids, use_cache=False, **kw)
    cache = headops.HeadSparseCache(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                    kinds=["full", "streaming"], window=WINDOW, sinks=SINKS, max_step=24)
    use(model, "headops_cache_test")
    crops = []
    crop = cache.crop
    cache.crop = lambda n: (crops.append(n), crop(n))[1]
    assert torch.equal(model.generate(ids, cache=cache, assistant_model=assistant, **kw), want)
    assert any(n < 0 for n in crops)  # (drafts were rejected and cropped)
