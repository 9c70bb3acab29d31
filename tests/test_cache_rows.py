"""HeadSparseCache's batch-row operations (transformers' Cache API): reorder_cache (beam search),
batch_select_indices, batch_repeat_interleave and reset. The oracle: a cache given the chosen
rows' histories from the start holds the same tokens and computes the same outputs."""

import pytest
import torch

import headops

G, D = 2, 16
KINDS = ["full", "streaming", "budget", "budget"]
WINDOW = [-1, -1, 3, 4, -1, -1, -1, -1]
SINKS = [0, 0, 1, 2, 1, 1, 0, 1]
PROMPT = 11
LENGTHS = [11, 7, 9]  # rows of different lengths: the per-row state must follow its row


def make_cache(**options):
    return headops.HeadSparseCache(num_layers=2, num_heads=len(KINDS) * G, num_kv_heads=len(KINDS), head_dim=D,
                                   kinds=KINDS, window=WINDOW, sinks=SINKS, budget=6, budget_recent=2, max_step=2,
                                   compensation=[None, "weighted", None, None], allocation="adakv", **options)


def history(seed, rows, steps):
    """Per batch row in `rows` (indices into LENGTHS' row histories): the prompt's (q, k, v)
    and `steps` decode steps of 1 or 2 tokens, every row alike in its step sizes."""
    g = torch.Generator().manual_seed(seed)

    def draw(S, heads):
        return torch.randn(len(LENGTHS), S, heads, D, generator=g)[rows]

    prompt = [(draw(PROMPT, len(KINDS) * G), draw(PROMPT, len(KINDS)), draw(PROMPT, len(KINDS))) for _ in range(2)]
    sizes = [1 + int(torch.randint(0, 2, (), generator=g)) for _ in range(steps)]
    decode = [[(draw(n, len(KINDS) * G), draw(n, len(KINDS)), draw(n, len(KINDS))) for _ in range(2)] for n in sizes]
    return prompt, decode


def run(cache, prompt, decode, lengths):
    """Outputs of every call, layer by layer (the prompt's rows past their lengths left out)."""
    outs = []
    for layer, (q, k, v) in enumerate(prompt):
        out = cache.attention(layer, q, k, v, lengths=lengths, softmax_scale=0.3)
        outs.append([out[b, :n] for b, n in enumerate(lengths)])
    for step in decode:
        for layer, (q, k, v) in enumerate(step):
            outs.append(cache.attention(layer, q, k, v, softmax_scale=0.3))
    return outs


def held(cache):
    """What each layer, row and KV head holds: positions, keys, values (and compensation)."""
    state = []
    for layer in range(cache.num_layers):
        st = cache._layers[layer]
        for b in range(len(st.held)):
            for h in range(cache.num_kv_heads):
                state.append(st.kept_kv(b, h))
                if st.compensation[h] is not None:
                    state.append(cache.compensation(layer, b, h))
        state.append(cache.seq_lengths(layer))
    return state


def assert_same(got, want, exact=True):
    assert len(got) == len(want)
    for x, y in zip(got, want):
        if isinstance(x, (list, tuple)):
            assert_same(x, y, exact)
        elif isinstance(x, torch.Tensor):
            assert x.shape == y.shape
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        else:
            assert x == y


def storage_addresses(cache):
    st = cache._layers[0]
    return [t.data_ptr() for t in st.full_k + st.full_v + [st.ring_k, st.ring_v, st.slot_pos, st.slot_mass,
                                                            st.budget_table, st.comp_k, st.lengths]]


ROWS = [0, 1, 2]


@pytest.mark.parametrize("operation, rows", [
    ("reorder_cache", [2, 0, 0]),
    ("reorder_cache", [1, 2, 0]),
    ("batch_select_indices", [2, 0]),
    ("batch_select_indices", [1]),
    ("batch_repeat_interleave", [0, 0, 1, 1, 2, 2]),
])
def test_rows_taken_equal_a_cache_given_those_rows_from_the_start(operation, rows):
    """Before: 4 decode steps (the streaming heads evict and compensate, the budget heads evict by
    mass, AdaKV sizes the budget heads per row); the operation; 3 more steps. Every output, kept
    token and compensation equals that of a cache that held the chosen rows all along."""
    prompt, decode = history(0, ROWS, 7)
    cache = make_cache()
    run(cache, prompt, decode[:4], LENGTHS)
    addresses, nbytes = storage_addresses(cache), cache.nbytes()
    argument = {"reorder_cache": torch.tensor(rows), "batch_select_indices": rows,
                "batch_repeat_interleave": 2}[operation]
    getattr(cache, operation)(argument)
    assert cache.batch_size == len(rows)
    if operation == "reorder_cache":  # in place: the same storages
        assert storage_addresses(cache) == addresses and cache.nbytes() == nbytes

    given = make_cache()
    prompt_rows, decode_rows = history(0, rows, 7)
    run(given, prompt_rows, decode_rows[:4], [LENGTHS[b] for b in rows])
    assert_same(held(cache), held(given))
    # the steps after it: this cache's rows as `rows` of the original histories
    assert_same(run_steps(cache, decode_rows[4:]), run_steps(given, decode_rows[4:]))
    assert_same(held(cache), held(given))


def run_steps(cache, decode):
    return [cache.attention(layer, q, k, v, softmax_scale=0.3) for step in decode
            for layer, (q, k, v) in enumerate(step)]


def test_reset_empties_every_row_and_keeps_the_storages():
    prompt, decode = history(1, ROWS, 6)
    cache = make_cache()
    run(cache, prompt, decode, LENGTHS)
    addresses, nbytes = storage_addresses(cache), cache.nbytes()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.seq_lengths(1).tolist() == [0, 0, 0]
    assert storage_addresses(cache) == addresses and cache.nbytes() == nbytes
    for st in cache._layers:  # every row's tables as just allocated (AdaKV had resized the budget heads)
        assert torch.equal(st.budget_table, st.budget_layout.expand_as(st.budget_table))
        assert (st.slot_pos == -1).all() and (st.slot_mass == 0).all()
        assert not st.comp_k.any() and not st.comp_v.any() and not st.comp_n.any()
    # a new prompt and steps: as in a new cache (its rings smaller, so key runs and sums split
    # differently: close, not bitwise)
    prompt, decode = history(2, ROWS, 5)
    lengths = [5, 11, 8]
    got = run(cache, prompt, decode, lengths)
    fresh = make_cache()
    want = run(fresh, prompt, decode, lengths)
    assert_same(got, want, exact=False)
    assert_same(held(cache), held(fresh))
    cache.reset()
    with pytest.raises(ValueError, match="q must be .B, S, Hq, D. with B=3"):  # the storages keep their batch size
        cache.attention(0, *(t[:2] for t in prompt[0]))


def test_an_empty_cache_takes_rows_as_a_batch_size():
    cache = make_cache()
    cache.reorder_cache(torch.tensor([0, 0]))  # nothing held, batch size unknown: nothing to do
    assert cache.batch_size == -1
    cache = make_cache(batch_size=2)
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 6
    cache.batch_select_indices([5, 0])
    assert cache.batch_size == 2


@pytest.mark.parametrize("call, error, match", [
    (lambda c: c.reorder_cache(torch.tensor([0, 1])), ValueError, "beam_idx must be one entry per batch row"),
    (lambda c: c.reorder_cache(torch.tensor([0, 1, 3])), ValueError, r"beam_idx must be batch rows in \[0, 3\)"),
    (lambda c: c.reorder_cache(torch.tensor([0, -1, 2])), ValueError, "beam_idx must be batch rows"),
    (lambda c: c.reorder_cache(torch.tensor([0.0, 1.0, 2.0])), TypeError, "beam_idx must be a 1-D integer tensor"),
    (lambda c: c.reorder_cache(torch.tensor([[0, 1, 2]])), TypeError, "beam_idx must be a 1-D integer tensor"),
    (lambda c: c.reorder_cache(torch.tensor([True, False, True])), TypeError, "beam_idx"),
    (lambda c: c.batch_select_indices([]), ValueError, "indices must be batch rows"),
    (lambda c: c.batch_select_indices("01"), TypeError, "indices must be a 1-D integer tensor or a sequence"),
    (lambda c: c.batch_select_indices([0, 1.5]), TypeError, "indices"),
    (lambda c: c.batch_repeat_interleave(0), ValueError, "repeats must be an int >= 1"),
    (lambda c: c.batch_repeat_interleave(2.0), ValueError, "repeats"),
    (lambda c: c.crop(-1), NotImplementedError, "evicted"),
    (lambda c: c.layers[0].reset(), NotImplementedError, "the cache's reset"),
    (lambda c: c.layers[0].reorder_cache(torch.tensor([0, 1, 2])), NotImplementedError, "reorder_cache"),
])
def test_a_refused_row_operation_names_its_argument_and_changes_nothing(call, error, match):
    pytest.importorskip("transformers")
    prompt, decode = history(3, ROWS, 3)
    cache = make_cache()
    run(cache, prompt, decode, LENGTHS)
    before = held(cache)
    with pytest.raises(error, match=match):
        call(cache)
    assert_same(held(cache), before)
    assert cache.batch_size == 3


# ------------------------------------------------------------------------------------ crop


def crop_cache(kinds=("full", "streaming"), compensation=None, max_step=4):
    return headops.HeadSparseCache(num_layers=2, num_heads=2 * len(kinds), num_kv_heads=len(kinds), head_dim=D,
                                   kinds=list(kinds), window=[-1, -1, 3, 2, -1, -1][:2 * len(kinds)],
                                   sinks=[0, 0, 1, 2, 1, 1][:2 * len(kinds)], budget=[None, None, 6][:len(kinds)],
                                   budget_recent=2, max_step=max_step,
                                   compensation=compensation or [None] * len(kinds))


def feed(cache, q, k, v, sizes):
    outs = []
    for start, end in sizes:
        for layer in range(2):
            outs.append(cache.attention(layer, q[:, start:end], k[:, start:end], v[:, start:end], softmax_scale=0.3))
    return outs


@pytest.mark.parametrize("n", [3, 4])
def test_crop_drops_the_last_tokens_as_if_never_seen(n):
    """crop(-n), n <= max_step (what assisted generation undoes after a draft): the next steps are
    those of a cache that never saw the n tokens, over full and wrapped streaming rings."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 30, h, D, generator=g) for h in (4, 2, 2))
    cropped, fresh = crop_cache(), crop_cache()
    feed(cropped, q, k, v, [(0, 12), (12, 15), (15, 16), (16, 16 + n)])  # the last n to be undone
    feed(fresh, q, k, v, [(0, 12), (12, 15), (15, 16)])
    nbytes = cropped.nbytes()
    cropped.crop(-n)
    assert cropped.get_seq_length() == 16 and cropped.nbytes() == nbytes
    cropped.crop(0)
    # what each head reports holding: the fresh cache's, less the oldest ring slots the n tokens
    # overwrote (their keys are gone), with the same keys and values
    assert_kept_within(cropped, fresh, expect_fewer=True)
    steps = [(16, 18), (18, 19), (19, 23), (23, 24)]
    for got, want in zip(feed(cropped, q, k, v, steps), feed(fresh, q, k, v, steps)):
        assert torch.equal(got, want)
    assert_kept_within(cropped, fresh, expect_fewer=False)  # the ring refilled: the same again


def assert_kept_within(cache, reference, expect_fewer):
    fewer = False
    for a, b in zip(cache._layers, reference._layers):
        for row in range(len(a.held)):
            for h in range(a.Hkv):
                pos, k, v = a.kept_kv(row, h)
                want_pos, want_k, want_v = b.kept_kv(row, h)
                inside = torch.isin(want_pos, pos)
                assert torch.equal(want_pos[inside], pos), (row, h, pos, want_pos)
                assert torch.equal(k, want_k[inside]) and torch.equal(v, want_v[inside])
                fewer |= bool((~inside).any())
        assert a.kept_tokens() == sum(a.kept_positions(r, h).numel() for r in range(len(a.held)) for h in range(a.Hkv))
    assert fewer == expect_fewer


@pytest.mark.parametrize("case, error, match", [
    ("budget", NotImplementedError, "budget head"),
    ("compensated", NotImplementedError, "compensated: the tokens the last 3 evicted"),
    ("past_the_ring", NotImplementedError, r"ring no longer holds the window before the last 5 tokens"),
    ("positive", ValueError, "tokens_to_remove must be an int <= 0"),
    ("past_the_row", ValueError, "at most the 19 tokens a row holds"),
])
def test_a_crop_that_cannot_be_exact_is_refused_and_changes_nothing(case, error, match):
    kinds = ("full", "streaming", "budget") if case == "budget" else ("full", "streaming")
    cache = crop_cache(kinds, compensation=[None, "weighted"] if case == "compensated" else None)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 19, h, D, generator=g) for h in (2 * len(kinds), len(kinds), len(kinds)))
    feed(cache, q, k, v, [(0, 12), (12, 15), (15, 16), (16, 19)])
    before = held(cache)
    n = {"past_the_ring": 5, "positive": -2, "past_the_row": 20}.get(case, 3)
    with pytest.raises(error, match=match):
        cache.crop(-n)
    assert_same(held(cache), before)
    assert cache.get_seq_length() == 19


def test_the_ring_rule_of_crop_is_tight():
    """Dropping max_step + 1 tokens from a wrapped ring anyway (past the rule) changes the next steps:
    the ring overwrote a key of the window before them."""
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 30, h, D, generator=g) for h in (4, 2, 2))
    forced, fresh = crop_cache(), crop_cache()
    feed(forced, q, k, v, [(0, 12), (12, 15), (15, 16), (16, 20), (20, 21)])
    feed(fresh, q, k, v, [(0, 12), (12, 15), (15, 16)])
    for st in forced._layers:
        st.drop_last(5)
    steps = [(16, 17), (17, 18)]
    assert any(not torch.equal(a, b) for a, b in zip(feed(forced, q, k, v, steps), feed(fresh, q, k, v, steps)))
