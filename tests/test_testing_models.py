"""headops.testing: the tiny random models are the same every time and leave the caller's RNG alone."""

import pytest
import torch

pytest.importorskip("transformers")
from headops.testing import tiny_bert, tiny_llama  # noqa: E402


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_tiny_model_is_deterministic_and_leaves_the_global_rng_alone(make):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first, _ = make()
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(7)  # a different global state must not change the weights
    second, _ = make()
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_char_tokenizer_round_trips_text_and_fits_the_tiny_vocabulary():
    from headops.testing import CharTokenizer

    tok = CharTokenizer()
    text = "VAR ABCDE = 12345.\nWhat is it? {x}"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert min(ids) >= 0 and max(ids) < tiny_llama()[0].config.vocab_size
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_token_id] + ids
    assert tok.decode([tok.bos_token_id] + ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
