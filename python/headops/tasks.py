"""Offline long-context tasks (docs/DESIGN.md section 7): prompts made deterministically from
(task, length in tokens, depth, seed) with a model's tokenizer, and exact-match scoring.

    sample = tasks.make_sample(tokenizer, "niah_single", length=1024, depth=0.5, seed=0)
    sample.ids              # [1024] prompt token ids, exactly `length` of them
    sample.needles[0].span  # (start, end): where the needle lies in sample.ids
    sample.answers          # ("4817290",): what the answer must contain
    tasks.exact_match(sample, generated_text)

Tasks (RULER's wording; the passkey test of Mohtashami & Jaggi):
  passkey            a 5-digit pass key in the repeated passkey filler;
  niah_single        one "special magic number" for a key, in real text (the stdlib docstrings);
  niah_multikey      the same among distractor needles with other keys;
  niah_multivalue    one key with several numbers, all to be given;
  niah_multiquery    several keys, all asked;
  variable_tracking  a chain of assignments VAR A = 12345, VAR B = VAR A, ...: name every
                     variable that holds the value.

A prompt is the tokenizer's chat frame (its chat template where it has one) around the task's
instructions, the haystack with the needles, the question, and the answer's first words. Every
piece is tokenized on its own and the ids are concatenated, so each needle's token span is
exact; the haystack is cut to the token so that the whole prompt is exactly `length` tokens.
The first needle (the one asked about) starts after round(depth * F) of the F haystack tokens;
the others lie at random depths drawn from the seed.
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from .corpus import PASSKEY_FILLER, WORDS, stdlib_text

__all__ = ["TASKS", "Needle", "Sample", "make_sample", "make_grid", "multi_passkey", "exact_match", "answer_recall",
           "generate", "generate_answers", "start_tokens", "corpus_ids"]

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
HAYSTACKS = ("essay", "repeat")  # the stdlib docstrings; PASSKEY_FILLER repeated
_DEFAULT_HAYSTACK = {"passkey": "repeat", "variable_tracking": "repeat"}  # RULER's noise for these; essays else

# how many needles each task hides, and how many of them are asked about (RULER's defaults, scaled
# to a small model: 4 needles for multi-key, 4 values, 2 queries; a chain of 4 hops)
_NEEDLES = {"passkey": 1, "niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4,
            "variable_tracking": 5}
_ASKED = {"niah_multikey": 1, "niah_multiquery": 2}


@dataclasses.dataclass(frozen=True)
class Needle:
    """One inserted piece of information. ``span``: its tokens in the prompt ``[start, end)``;
    ``answer_span``: the tokens an answer copies from it (a number, or a variable's name);
    ``filler_before``: how many haystack tokens precede it (its depth, in tokens)."""
    span: tuple
    answer_span: tuple
    filler_before: int
    key: str
    value: str


@dataclasses.dataclass(frozen=True)
class Sample:
    """A prompt and what answers it. ``needles`` in prompt order; ``answers``: the strings the
    answer must contain; ``asked``: for each answer, the index of the needle it is copied from
    (``asked[0]`` lies at ``depth``); ``question_start``: where the context ends and the question
    (then the chat frame's end and the answer's first words) begins, so that a harness can
    compress the context's cache before the question is read (docs/DESIGN.md section 7);
    ``supervised``: spans of ``ids`` that are answers inside the prompt (training prompts only)."""
    task: str
    length: int
    depth: float
    seed: int
    ids: torch.Tensor
    needles: tuple
    asked: tuple
    answers: tuple
    filler_tokens: int
    question_start: int
    supervised: tuple = ()

    def answer_spans(self) -> list:
        """The answer spans of the asked needles (the tokens a retrieval head should copy)."""
        return [self.needles[i].answer_span for i in self.asked]

    def answer_ids(self) -> torch.Tensor:
        """The prompt tokens the expected answers copy (the asked needles' answer spans, in order)."""
        return torch.cat([self.ids[start:end] for start, end in self.answer_spans()])

    def answer_budget(self) -> int:
        """New tokens to generate for an answer: the expected answers' tokens plus room for separators."""
        return self.answer_tokens() + 4 * len(self.answers) + 4

    def answer_tokens(self) -> int:
        """How many prompt tokens the expected answers copy (a generation budget's base)."""
        return sum(end - start for start, end in self.answer_spans())


# ------------------------------------------------------------------------------ tokens

_TOKENIZED_CORPUS = {}  # id(tokenizer) -> (tokenizer, ids of stdlib_text): tokenized once per tokenizer


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer.encode(text, add_special_tokens=False))


def start_tokens(tokenizer) -> list:
    """The special tokens a tokenizer puts before a text by itself (a BOS, BERT's [CLS]; none for
    some chat models), read off how it encodes one word."""
    plain = list(tokenizer.encode("word", add_special_tokens=False))
    marked = list(tokenizer.encode("word", add_special_tokens=True))
    for at in range(len(marked) - len(plain) + 1):
        if marked[at:at + len(plain)] == plain:
            return marked[:at]
    return []


def corpus_ids(tokenizer) -> list:
    """The token ids of the real offline text (headops.corpus.stdlib_text), tokenized once per tokenizer."""
    entry = _TOKENIZED_CORPUS.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        entry = _TOKENIZED_CORPUS[id(tokenizer)] = (tokenizer, _encode(tokenizer, stdlib_text()))
    return entry[1]


def _filler(tokenizer, haystack: str, count: int, rng: random.Random) -> list:
    """`count` haystack tokens: real text from a seeded offset, or the passkey filler, repeated as needed."""
    if haystack == "essay":
        source = corpus_ids(tokenizer)
        start = rng.randrange(len(source))
    else:
        source, start = _encode(tokenizer, PASSKEY_FILLER), 0
    return [source[(start + i) % len(source)] for i in range(count)]


def _frame(tokenizer, chat) -> tuple:
    """(prefix ids, suffix ids) around the user's message: the chat template where the tokenizer
    has one (chat=None) or chat=True asks for it; else what the tokenizer adds itself (a BOS)
    and a newline before the answer."""
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if not chat:
        return start_tokens(tokenizer), _encode(tokenizer, "\n")
    if not template:
        raise ValueError("headops.tasks: chat=True but the tokenizer has no chat template")
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return _encode(tokenizer, before), _encode(tokenizer, after)


# ------------------------------------------------------------------------------ prompts

@dataclasses.dataclass
class _NeedleText:
    before: str
    answer: str  # the piece an answer copies
    after: str
    depth: float
    key: str
    value: str


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _distinct(rng: random.Random, count: int, draw) -> list:
    seen = []
    while len(seen) < count:
        x = draw()
        if x not in seen:
            seen.append(x)
    return seen


def _task_text(task: str, depth: float, rng: random.Random):
    """(instructions, needles, question, answer prefix, answers, asked needle indices) of a task."""
    n = _NEEDLES[task]
    # the asked needle at the asked depth, the others anywhere (a chain reads in order after it)
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    if task == "passkey":
        key = _number(rng, 5)
        needles = [_NeedleText("\nThe pass key is ", key, f". Remember it. {key} is the pass key.\n", depth, "pass key",
                               key)]
        return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
                "quiz you about the important information there.\n", needles, "\nWhat is the pass key?",
                "The pass key is", (key,), (0,))
    if task == "variable_tracking":
        names = _distinct(rng, n, lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
        value = _number(rng, 5)
        depths = [depth] + sorted(depth + (1 - depth) * d for d in depths[1:])
        needles = [_NeedleText("\nVAR ", names[0], f" = {value}.\n", depths[0], names[0], value)]
        needles += [_NeedleText("\nVAR ", names[i], f" = VAR {names[i - 1]}.\n", depths[i], names[i], value)
                    for i in range(1, n)]
        return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n", needles,
                f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
                f"Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
                f"assigned the value {value}, they are:", tuple(names), tuple(range(n)))
    same_key = task == "niah_multivalue"
    keys = [f"{a}-{b}" for a, b in _distinct(rng, 1 if same_key else n, lambda: tuple(rng.sample(WORDS, 2)))]
    keys = keys * n if same_key else keys
    values = _distinct(rng, n, lambda: _number(rng, 7))
    needles = [_NeedleText(f"\nOne of the special magic numbers for {k} is: ", v, ".\n", d, k, v)
               for k, v, d in zip(keys, values, depths)]
    asked = tuple(range(n)) if same_key else tuple(range(_ASKED.get(task, 1)))
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. I will "
             "quiz you about the numbers afterwards.\n")
    if len(asked) == 1:
        what = f"special magic number for {keys[0]}"
        question, prefix = f"\nWhat is the {what} mentioned in the provided text?", f"The {what} mentioned in the " \
                                                                                    "provided text is"
    else:
        asked_keys = sorted({keys[i] for i in asked}, key=keys.index)
        what = "special magic numbers for " + (asked_keys[0] if len(asked_keys) == 1 else
                                               ", ".join(asked_keys[:-1]) + " and " + asked_keys[-1])
        question, prefix = (f"\nWhat are all the {what} mentioned in the provided text?",
                            f"The {what} mentioned in the provided text are")
    return intro, needles, question, prefix, tuple(values[i] for i in asked), asked


def _assemble(tokenizer, length: int, head: list, needles: list, tail: list, haystack: str, rng, task: str):
    """ids of exactly `length` tokens: head, the haystack with the needles at their depths, tail."""
    pieces = [[_encode(tokenizer, t) for t in (n.before, n.answer, n.after)] for n in needles]
    fixed = len(head) + len(tail) + sum(len(p) for parts in pieces for p in parts)
    F = length - fixed
    if F < 0:
        raise ValueError(f"headops.tasks: length must be at least {fixed} tokens for task {task!r} with this "
                         f"tokenizer (its frame, instructions, needles and question), got {length}")
    filler = _filler(tokenizer, haystack, F, rng)
    at = [round(n.depth * F) for n in needles]
    order = sorted(range(len(needles)), key=lambda i: (at[i], i))
    ids, placed, used = list(head), [None] * len(needles), 0
    for i in order:
        ids += filler[used:at[i]]
        used = at[i]
        start = len(ids)
        before, answer, after = pieces[i]
        ids += before + answer + after
        placed[i] = Needle(span=(start, len(ids)), answer_span=(start + len(before), start + len(before) + len(answer)),
                           filler_before=at[i], key=needles[i].key, value=needles[i].value)
    ids += filler[used:] + tail
    return torch.tensor(ids, dtype=torch.int64), placed, order, F


def _check(task, length, depth, seed, haystack):
    if task not in TASKS:
        raise ValueError(f"headops.tasks: task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"headops.tasks: length must be an int >= 1 (tokens), got {length!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"headops.tasks: depth must be a number in [0, 1], got {depth!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"headops.tasks: seed must be an int, got {seed!r}")
    if haystack is not None and haystack not in HAYSTACKS:
        raise ValueError(f"headops.tasks: haystack must be None or one of {', '.join(HAYSTACKS)}, got {haystack!r}")


def make_sample(tokenizer, task: str, length: int, depth: float, seed: int, *, haystack: str | None = None,
                chat: bool | None = None) -> Sample:
    """One prompt of `task`, exactly `length` tokens, its asked needle at `depth` (0: the start of
    the haystack, 1: its end); the same arguments give the same prompt, and the same seed the
    same needles and text at every length and depth. haystack: "essay" (real
    text: the stdlib docstrings) or "repeat" (the passkey filler); None: the task's usual one."""
    _check(task, length, depth, seed, haystack)
    # the seed alone picks the needles and the haystack's text: one needle moves through a grid of
    # lengths and depths (str seeds are hashed stably, by sha512)
    rng = random.Random(f"{task}/{seed}")
    intro, needles, question, answer_prefix, answers, asked = _task_text(task, float(depth), rng)
    prefix, suffix = _frame(tokenizer, chat)
    head = prefix + _encode(tokenizer, intro)
    tail = _encode(tokenizer, question) + suffix + _encode(tokenizer, answer_prefix)
    ids, placed, order, F = _assemble(tokenizer, length, head, needles, tail, haystack or _DEFAULT_HAYSTACK.get(
        task, "essay"), rng, task)
    in_order = [placed[i] for i in order]
    return Sample(task=task, length=length, depth=float(depth), seed=seed, ids=ids, needles=tuple(in_order),
                  asked=tuple(order.index(i) for i in asked), answers=answers, filler_tokens=F,
                  question_start=length - len(tail))


def make_grid(tokenizer, task: str, lengths, depths, seeds, **options) -> list:
    """Every (length, depth, seed) of the grid, in that order (lengths outermost)."""
    return [make_sample(tokenizer, task, length, depth, seed, **options)
            for length in lengths for depth in depths for seed in seeds]


def multi_passkey(tokenizer, length: int, *, passkeys: int = 4, words: int = 8, seed: int = 0,
                  chat: bool | None = None) -> Sample:
    """A training prompt in DuoAttention's style: `passkeys` pass keys of `words` random words
    each at random depths of real text, then for each a question and its answer, inside the
    prompt. ``Sample.supervised`` holds the answers' token spans (what a distillation loss reads)."""
    for name, value in (("length", length), ("passkeys", passkeys), ("words", words)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"headops.tasks.multi_passkey: {name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"headops.tasks.multi_passkey: seed must be an int, got {seed!r}")
    rng = random.Random(f"multi_passkey/{passkeys}/{words}/{seed}")
    keys = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(passkeys)]
    needles = [_NeedleText(f"\nThe pass key {i + 1} is: ", k, ". Remember it.\n", rng.random(), f"pass key {i + 1}", k)
               for i, k in enumerate(keys)]
    prefix, suffix = _frame(tokenizer, chat)
    head = prefix + _encode(tokenizer, "There are pass keys hidden inside a lot of irrelevant text. Find them and "
                                       "memorize them. I will quiz you about them.\n")
    # the questions and their answers, each piece tokenized alone: the answers' spans are exact
    blocks = [(_encode(tokenizer, f"\nWhat is the pass key {i + 1}? The pass key {i + 1} is: "), _encode(tokenizer, k),
               _encode(tokenizer, ".")) for i, k in enumerate(keys)]
    tail = suffix + [t for block in blocks for part in block for t in part]
    ids, placed, order, F = _assemble(tokenizer, length, head, needles, tail, "essay", rng, "multi_passkey")
    supervised, at = [], length - sum(len(p) for block in blocks for p in block)
    for question, answer, end in blocks:
        supervised.append((at + len(question), at + len(question) + len(answer)))
        at += len(question) + len(answer) + len(end)
    return Sample(task="multi_passkey", length=length, depth=float("nan"), seed=seed, ids=ids,
                  needles=tuple(placed[i] for i in order), asked=tuple(order.index(i) for i in range(passkeys)),
                  answers=tuple(keys), filler_tokens=F, question_start=length - len(tail),
                  supervised=tuple(supervised))


# ------------------------------------------------------------------------------ scoring

def _found(answer: str, text: str) -> bool:
    # the exact string, not inside a longer word or number ("1234" is not found in "12345")
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", text) is not None


def answer_recall(sample: Sample, text: str) -> float:
    """The fraction of the sample's expected answers that appear exactly in `text`."""
    return sum(_found(a, text) for a in sample.answers) / len(sample.answers)


def exact_match(sample: Sample, text: str) -> bool:
    """Whether every expected answer appears exactly in `text` (not inside a longer word or number)."""
    return all(_found(a, text) for a in sample.answers)


# ------------------------------------------------------------------------------ answering

def generate(model, ids: torch.Tensor, max_new_tokens: int, *, cache=None) -> torch.Tensor:
    """Greedy decoding of a batch of equal-length prompts ids [B, T] with the model's own cache (or
    `cache`, e.g. a headops.HeadSparseCache): the new tokens [B, n] (n <= max_new_tokens; rows that
    ended are padded with EOS)."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    given = {} if cache is None else {"cache": cache}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=eos, top_p=None, top_k=None, temperature=None, **given)
    return out[:, ids.shape[1]:]


def until_eos(model, new: torch.Tensor) -> torch.Tensor:
    """A row of generate()'s output up to (not including) its first EOS."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ends = [i for i, t in enumerate(new.tolist()) if t in eos]
    return new[:ends[0]] if ends else new


def batches_of_equal_length(samples, batch_size: int):
    """Lists of sample indices, at most batch_size each, whose prompts have one length (no padding)."""
    by_length = {}
    for i, s in enumerate(samples):
        by_length.setdefault(len(s.ids), []).append(i)
    return [group[i:i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]


def generate_answers(model, tokenizer, samples, *, max_new_tokens: int | None = None, batch_size: int = 8) -> list:
    """Each sample's greedy answer text (prompts of one length batched; max_new_tokens defaults to
    the answers' tokens plus room for separators)."""
    texts = [None] * len(samples)
    for batch in batches_of_equal_length(samples, batch_size):
        budget = max_new_tokens or max(samples[i].answer_budget() for i in batch)
        new = generate(model, torch.stack([samples[i].ids for i in batch]), budget)
        for row, i in enumerate(batch):
            texts[i] = tokenizer.decode(until_eos(model, new[row]), skip_special_tokens=True)
    return texts
