"""headops.tasks: deterministic prompts of exact length, needles at the asked depth (token-exact),
exact-match scoring, clear errors."""

import pytest
import torch

from headops import tasks
from headops.testing import CharTokenizer

TOK = CharTokenizer()  # one character per token: a needle's text is its tokens


@pytest.mark.parametrize("task", tasks.TASKS)
def test_prompts_are_deterministic_and_exactly_as_long_as_asked(task):
    a = tasks.make_sample(TOK, task, 900, 0.4, seed=3)
    b = tasks.make_sample(TOK, task, 900, 0.4, seed=3)
    c = tasks.make_sample(TOK, task, 900, 0.4, seed=4)
    assert torch.equal(a.ids, b.ids) and a.needles == b.needles and a.answers == b.answers
    assert not torch.equal(a.ids, c.ids)
    question = TOK.decode(a.ids[a.question_start:])  # the context ends where the question begins
    assert question.startswith("\nWhat " if task != "variable_tracking" else "\nQuestion: ")
    assert a.needles[-1].span[1] <= a.question_start
    for length in (700, 901, 1500):
        assert len(tasks.make_sample(TOK, task, length, 0.4, seed=3).ids) == length


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
def test_the_needle_starts_after_depth_times_the_haystack_tokens(task):
    # start and end of the prompt from the extreme depths; the haystack is what lies outside them
    top, bottom = (tasks.make_sample(TOK, task, 800, d, seed=0) for d in (0.0, 1.0))
    head = top.needles[0].span[0]
    tail = 800 - bottom.needles[0].span[1]
    for depth in (0.0, 0.1, 0.25, 0.5, 0.77, 1.0):
        s = tasks.make_sample(TOK, task, 800, depth, seed=0)
        (needle,) = s.needles
        start, end = needle.span
        haystack = 800 - head - tail - (end - start)
        assert s.filler_tokens == haystack
        assert start - head == round(depth * haystack)
        text = TOK.decode(s.ids[start:end])
        answer = TOK.decode(s.ids[needle.answer_span[0]:needle.answer_span[1]])
        assert answer == s.answers[0] and answer in text
        assert text.startswith("\nThe pass key is " if task == "passkey" else "\nOne of the special magic numbers")


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking"])
def test_several_needles_lie_whole_and_apart_with_the_asked_one_at_the_depth(task):
    depth = 0.3
    s = tasks.make_sample(TOK, task, 1200, depth, seed=1)
    spans = [n.span for n in s.needles]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # in prompt order, not overlapping
    # the haystack between needles: the gaps add up to filler_tokens and each needle's depth counts them
    head = spans[0][0] - s.needles[0].filler_before
    gaps = [spans[0][0] - head] + [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    assert [n.filler_before for n in s.needles] == [sum(gaps[:i + 1]) for i in range(len(gaps))]
    assert s.needles[s.asked[0]].filler_before == round(depth * s.filler_tokens)
    assert [TOK.decode(s.ids[a:b]) for a, b in s.answer_spans()] == list(s.answers)
    if task == "niah_multikey":  # one asked, three distractors with other keys
        assert len(s.asked) == 1 and len({n.key for n in s.needles}) == 4
    if task == "niah_multivalue":
        assert len({n.key for n in s.needles}) == 1 and len(s.answers) == 4
    if task == "variable_tracking":  # the chain in order, its first link at the depth
        assert s.needles[0].filler_before == round(depth * s.filler_tokens)
        texts = [TOK.decode(s.ids[a:b]) for a, b in spans]
        assert texts[0] == f"\nVAR {s.answers[0]} = {s.needles[0].value}.\n"
        assert all(t == f"\nVAR {s.answers[i + 1]} = VAR {s.answers[i]}.\n" for i, t in enumerate(texts[1:]))


def test_multi_passkey_training_prompt_supervises_its_answers():
    s = tasks.multi_passkey(TOK, 900, passkeys=3, words=4, seed=2)
    assert len(s.ids) == 900 and len(s.supervised) == 3
    assert [TOK.decode(s.ids[a:b]) for a, b in s.supervised] == list(s.answers)
    assert all(len(a.split()) == 4 for a in s.answers)
    assert s.supervised[-1][1] == 900 - 1  # the last answer's "." ends the prompt
    assert [TOK.decode(s.ids[a:b]) for a, b in s.answer_spans()] == list(s.answers)


def test_scoring_is_exact_match():
    s = tasks.make_sample(TOK, "niah_multivalue", 900, 0.5, seed=0)
    a, b, c, d = s.answers
    assert tasks.exact_match(s, f"{a}, {b}, {c} and {d}.")
    assert not tasks.exact_match(s, f"{a}, {b}, {c}")
    assert tasks.answer_recall(s, f"{a}, {b}, {c}") == 0.75
    one = tasks.make_sample(TOK, "passkey", 900, 0.5, seed=0)
    key = one.answers[0]
    assert tasks.exact_match(one, f" {key}.") and tasks.exact_match(one, key)
    assert not tasks.exact_match(one, key + "1") and not tasks.exact_match(one, "9" + key)  # inside a longer number
    assert not tasks.exact_match(one, key[:-1]) and tasks.answer_recall(one, "") == 0.0


@pytest.mark.parametrize("kw, match", [
    (dict(task="summarise"), "task must be one of"),
    (dict(depth=1.5), "depth must be a number in"),
    (dict(depth=-0.1), "depth must be a number in"),
    (dict(length=0), "length must be an int >= 1"),
    (dict(length=50), "length must be at least"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(haystack="poems"), "haystack must be"),
])
def test_bad_arguments_are_named(kw, match):
    args = dict(task="passkey", length=900, depth=0.5, seed=0) | kw
    with pytest.raises(ValueError, match=match):
        tasks.make_sample(TOK, **args)


def test_grid_order_and_multi_passkey_errors():
    grid = tasks.make_grid(TOK, "passkey", [600, 700], [0.0, 1.0], [0, 1])
    assert [(s.length, s.depth, s.seed) for s in grid] == [(n, d, k) for n in (600, 700) for d in (0.0, 1.0)
                                                          for k in (0, 1)]
    with pytest.raises(ValueError, match="passkeys must be an int >= 1"):
        tasks.multi_passkey(TOK, 900, passkeys=0)
    with pytest.raises(ValueError, match="length must be at least"):
        tasks.multi_passkey(TOK, 100, passkeys=3)
