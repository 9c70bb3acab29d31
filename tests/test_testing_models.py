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
