"""Finding heads: the published ways of telling a model's retrieval, streaming, echo, induction and
sink heads apart, each writing one score per (layer, query head).

The attention statistics come from headops probes (docs/DESIGN.md section 5: top-1 keys, masses on
spans and at distances, a query row's pattern, from the fused kernel, never an S x S pattern)::

    samples = discover.retrieval_samples(tok, lengths=[512, 1024], depths=[0, .5, 1], needles=2)
    discover.retrieval_scores(model, samples).values        # [L, Hq] (Wu et al. 2024)
    discover.retrieval_reasoning_scores(model, samples).values   # HeadKV's R2 (Fu et al. 2024)
    echo, induction = discover.echo_induction_scores(model, discover.repeated_tokens(model, tok, period=64))
    discover.sink_scores(model, discover.text_rows(tok, rows=4, tokens=512)).values
    discover.duo_attention(model, training_samples, sinks=16, window=64, steps=100)   # headops.duo
    discover.duo_ablation(model, training_samples, sinks=16, window=64)

Pool per KV head (headops.head_scores.pool_kv_heads) and make a spec with
``HeadSpec.from_scores(model, scores.values, full_fraction=0.25, window=..., sinks=...)``.
Every method measures the model with full attention: a dense spec while it runs (a patched model
gets its own spec back afterwards).

Under torchrun (or given a process group) retrieval_scores splits its prompt batches and
duo_ablation its ablation batches over the processes (headops._distributed), bitwise the single
process's result; echo, induction and sink scores are one forward and duo_attention a sequence of
optimisation steps: every process computes them whole.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from . import tasks
from ._distributed import map_items, sweep_group
from ._model_attention import sliding_windows
from .cache import HeadSparseCache
from .probes import probe
from .research import model_device, with_spec
from .spec import HeadSpec

__all__ = ["METHODS", "Scores", "retrieval_samples", "retrieval_scores", "retrieval_reasoning_scores",
           "repeated_tokens", "echo_induction_scores", "text_rows", "sink_scores", "duo_attention", "duo_ablation",
           "write_full_attention_heads"]

METHODS = ("retrieval", "retrieval-reasoning", "echo", "induction", "sink", "duo", "duo-ablation")


@dataclasses.dataclass
class Scores:
    """One method's result: ``values`` [L, Hq] float64 on the CPU (higher: more of what the
    method finds), and what it counted on the way (``info``)."""
    method: str
    values: torch.Tensor
    info: dict = dataclasses.field(default_factory=dict)


def _shape(model):
    spec = HeadSpec.dense(model)
    return spec.num_layers, spec.num_heads, spec.num_kv_heads


def _check_positive_int(caller, name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"headops.discover.{caller}: {name} must be an int >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------ retrieval heads

def retrieval_samples(tokenizer, *, lengths, depths, needles: int, seed: int = 0, task: str = "niah_single") -> list:
    """Needle-in-a-haystack prompts over lengths x depths, with `needles` different needles (seeds
    seed .. seed + needles - 1)."""
    _check_positive_int("retrieval_samples", "needles", needles)
    return tasks.make_grid(tokenizer, task, list(lengths), list(depths), list(range(seed, seed + needles)))


def needle_recall(needle: torch.Tensor, answer: torch.Tensor) -> float:
    """The fraction of the needle's tokens (with repeats) that the answer's tokens recall (ROUGE-1
    recall over token ids, as Wu et al. count a test)."""
    found = collections.Counter(needle.tolist()) & collections.Counter(answer.tolist())
    return sum(found.values()) / max(needle.numel(), 1)


def copy_scores(top1: torch.Tensor, sequence: torch.Tensor, answer: torch.Tensor, spans) -> torch.Tensor:
    """Wu et al.'s score of one test: per head, 1/|needle| for each generated token that the head
    copied, i.e. whose top-1 key lies in the needle and holds that very token.

    top1 [L, Hq, n]: the key each head's query attends to most at each of the n decoding steps;
    sequence: the prompt and the generated tokens; answer [n]: the generated tokens; spans: the
    needle's token spans. Returns [L, Hq] float64."""
    in_needle = torch.zeros_like(top1, dtype=torch.bool)
    for start, end in spans:
        in_needle |= (top1 >= start) & (top1 < end)
    copied = sequence[top1.clamp(min=0)] == answer.view(1, 1, -1)
    size = sum(end - start for start, end in spans)
    return (in_needle & copied).sum(dim=-1).double() / size


def retrieval_scores(model, samples, *, max_new_tokens: int | None = None, min_recall: float = 0.5,
                     batch_size: int = 8, show_progress: bool = False, group=None) -> Scores:
    """Retrieval scores (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
    Factuality") over `samples` (headops.tasks samples; their answer spans are the needles).

    Each prompt is answered by greedy decoding (prompts of one length batched), with a top-1
    probe at every layer; a test counts when its answer recalls at least `min_recall` of the
    needle's tokens, and the score is the mean of copy_scores over the counted tests (0 where
    none counts). max_new_tokens defaults to the needle's tokens plus 4.

    ``group``: the processes the prompt batches are split over (a torch.distributed process
    group; None: torchrun's processes when launched by torchrun, else this one; False: this
    process alone); every rank gets the scores, bitwise those of one process."""
    caller = "headops.discover.retrieval_scores"
    if not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"{caller}: min_recall must be in [0, 1], got {min_recall!r}")

    def test(recording, row, sample, sequence, answer):
        """(needle recall, copy scores or None where the test does not count)."""
        recall = needle_recall(sample.answer_ids(), answer)
        if recall < min_recall or not answer.numel():
            return recall, None
        # [L, Hq, steps]: the key each step's last query row attends to most
        top1 = torch.stack([torch.stack([recording[layer][t][row] for t in range(answer.numel())], -1)
                            for layer in range(len(recording))])
        return recall, copy_scores(top1, sequence, answer, sample.answer_spans())

    def keep(batch):  # of each call, its last query row's top-1 key [B, Hq]
        return lambda layer, result: result.topk_index[:, :, -1, 0].cpu()

    values, counted, recalls = _needle_tests(
        model, samples, caller, test, dict(topk=1), keep, batch_size=batch_size, show_progress=show_progress,
        group=group, budget=lambda sample: max_new_tokens or sample.answer_tokens() + 4,
        inputs=(max_new_tokens, min_recall))
    return Scores("retrieval", values, {"tests": len(samples), "counted": counted,
                                        "mean_recall": sum(recalls) / len(recalls)})


def answer_f1(expected: torch.Tensor, answer: torch.Tensor) -> float:
    """The F1 of an answer's tokens against the expected answer's (bags of token ids, with
    repeats: SQuAD's F1 over ids instead of normalised words, as HeadKV counts a test)."""
    common = sum((collections.Counter(expected.tolist()) & collections.Counter(answer.tolist())).values())
    if common == 0:
        return 0.0
    precision, recall = common / answer.numel(), common / expected.numel()
    return 2 * precision * recall / (precision + recall)


def top_keys_mass(row: torch.Tensor, spans) -> torch.Tensor:
    """HeadKV's retrieval-reasoning count of one step: the probability a row ``[..., Sk]`` puts on
    its k most attended keys that lie in a needle, k the needles' size (``spans`` in tokens);
    float64 ``[...]``. Ties at the k-th key are broken as torch.topk breaks them."""
    size = sum(end - start for start, end in spans)
    values, index = row.double().topk(min(size, row.shape[-1]), dim=-1)
    in_needle = torch.zeros_like(index, dtype=torch.bool)
    for start, end in spans:
        in_needle |= (index >= start) & (index < end)
    return (values * in_needle).sum(dim=-1)


def _reasoning_scale(total: torch.Tensor, spans, answer_tokens: int) -> torch.Tensor:
    # (HeadKV's 10 / (needles' size x the expected answer's tokens))
    return 10 * total / (sum(end - start for start, end in spans) * answer_tokens)


def reasoning_scores(rows, spans, answer_tokens: int) -> torch.Tensor:
    """HeadKV's retrieval-reasoning score of one test (Fu et al. 2024, "Not All Heads Matter",
    its retrieval_head_detection_r2): at each decoding step, each head's k most attended keys,
    k the needles' size in tokens; those inside a needle add their probability; the sum over the
    steps is scaled by 10 / (needles' size x the expected answer's tokens), as HeadKV's code
    scales it (its budgets normalise the scores, so the 10 only keeps the published scale).
    Unlike Wu et al.'s score no key must hold the token being generated: a head that reads the
    needle's context, not only the token it copies, scores.

    rows: one [L, Hq, Sk] tensor per step, the step's query row's probabilities over its keys
    (ProbeResult.pattern); spans: the needles' token spans; answer_tokens: the expected
    answer's tokens (top_keys_mass per step). Returns [L, Hq] float64."""
    return _reasoning_scale(sum(top_keys_mass(row, spans) for row in rows), spans, answer_tokens)


def retrieval_reasoning_scores(model, samples, *, max_new_tokens: int | None = None, min_f1: float = 0.5,
                               batch_size: int = 8, show_progress: bool = False, group=None) -> Scores:
    """Retrieval-reasoning scores (HeadKV's R2, Fu et al. 2024, "Not All Heads Matter: A
    Head-Level KV Cache Compression Method with Integrated Retrieval and Reasoning"): the scores
    HeadKV allocates its budgets by (HeadSpec.headkv), over `samples` (headops.tasks samples;
    the asked needles' whole spans are what a head should read).

    Each prompt is answered by greedy decoding of as many tokens as its expected answer has, as
    HeadKV decodes (where several answers are asked, plus 4 a further answer for separators;
    max_new_tokens, if given, caps them; prompts of one length batched), each step's query row
    of the pattern probed at every layer (``pattern_rows=[-1]``: the row alone, never the S x S
    pattern); a test counts when its answer's F1 against the expected answer (answer_f1) is
    above `min_f1` (HeadKV: 0.5), and the score is the mean of reasoning_scores over the counted
    tests (0 where none counts). ``group`` as retrieval_scores'."""
    caller = "headops.discover.retrieval_reasoning_scores"
    if not 0.0 <= min_f1 < 1.0:
        raise ValueError(f"{caller}: min_f1 must be in [0, 1), got {min_f1!r}")
    if max_new_tokens is not None:
        _check_positive_int("retrieval_reasoning_scores", "max_new_tokens", max_new_tokens)

    def budget(sample):
        needed = sample.answer_tokens() + 4 * (len(sample.answers) - 1)
        return needed if max_new_tokens is None else min(needed, max_new_tokens)

    def needle_spans(sample):
        return [sample.needles[i].span for i in sample.asked]

    def test(recording, row, sample, sequence, answer):
        """(answer F1, reasoning scores or None where the test does not count)."""
        expected = sample.answer_ids()
        answer = answer[:budget(sample)]  # (the batch decodes its longest budget)
        f1 = answer_f1(expected, answer) if answer.numel() else 0.0
        if f1 <= min_f1:
            return f1, None
        masses = torch.stack([sum(recording[layer][t][row] for t in range(answer.numel()))
                              for layer in range(len(recording))])
        return f1, _reasoning_scale(masses, needle_spans(sample), expected.numel())

    def keep(batch):  # of each call, per row, its last query row's top-key mass in the row's needles [B, Hq]
        spans = [needle_spans(samples[i]) for i in batch]
        return lambda layer, result: torch.stack([top_keys_mass(result.pattern[b, :, -1].cpu(), spans[b])
                                                  for b in range(len(batch))])

    values, counted, f1s = _needle_tests(
        model, samples, caller, test, dict(pattern_rows=[-1]), keep, batch_size=batch_size,
        show_progress=show_progress, group=group, budget=budget, inputs=(max_new_tokens, min_f1))
    return Scores("retrieval-reasoning", values, {"tests": len(samples), "counted": counted,
                                                  "mean_f1": sum(f1s) / len(f1s)})


def _needle_tests(model, samples, caller, test, probe_options, keep, *, budget, batch_size, show_progress, group,
                  inputs):
    """The decoding both retrieval scores share: each batch of equal-length prompts answered
    greedily (budget(sample) new tokens at most, the batch's largest) under a dense spec with
    probe_options at every layer, each call's result reduced as soon as it is made by
    keep(batch)(layer, result) (what the test needs of it: no pattern row outlives its call),
    then test(recording, row, sample, prompt and answer, answer up to EOS) -> (a measure, [L, Hq]
    scores or None where the test does not count) per prompt;
    batches split over `group`'s processes. Returns (the mean of the counted tests' scores, 0
    where none counts; how many counted; every test's measure), in prompt order."""
    _check_positive_int(caller.rsplit(".", 1)[-1], "batch_size", batch_size)
    if not samples:
        raise ValueError(f"{caller}: samples must hold at least one prompt")
    L, Hq, _ = _shape(model)
    group = sweep_group(group, model, caller)
    sliding = any(window is not None for window in sliding_windows(model, L))

    def tests_of(batch):
        ids = torch.stack([samples[i].ids for i in batch])
        # (a model with sliding-window layers decodes through a dense HeadSparseCache: transformers'
        # cache drops the keys past the window there, whose positions the probe could not name)
        cache = HeadSparseCache(model, HeadSpec.dense(model)) if sliding else None
        with probe(model, reduce=keep(batch), **probe_options) as recording:
            # one attention call per generated token: the prefill, then each step
            new = tasks.generate(model, ids.to(model_device(model)), max(budget(samples[i]) for i in batch),
                                 cache=cache).cpu()
        tests = []
        for row, i in enumerate(batch):
            answer = tasks.until_eos(model, new[row])
            tests.append(test(recording, row, samples[i], torch.cat([ids[row], new[row]]), answer))
        return tests

    with with_spec(model, HeadSpec.dense(model)), torch.no_grad():
        per_batch = map_items(tests_of, tasks.batches_of_equal_length(samples, batch_size), group, caller=caller,
                              inputs=(samples, batch_size) + inputs, progress=show_progress,
                              desc=f"{caller.rsplit('.', 1)[-1]} (prompt batches)")
    total, counted, measures = torch.zeros(L, Hq, dtype=torch.float64), 0, []
    for measure, scores in (test for tests in per_batch for test in tests):  # in prompt order, as one process adds
        measures.append(measure)
        if scores is not None:
            counted += 1
            total += scores
    return total / max(counted, 1), counted, measures


# ------------------------------------------------------------------------------ echo and induction heads

def repeated_tokens(model, tokenizer, *, period: int, rows: int = 4, repeats: int = 4, seed: int = 0) -> torch.Tensor:
    """[rows, 1 + repeats * period]: a start token, then `period` random tokens (distinct, no
    special tokens) repeated `repeats` times (RazorAttention's probe of echo and induction heads).
    The start token is the one the tokenizer puts first (a BOS or [CLS]), else the model's BOS."""
    _check_positive_int("repeated_tokens", "period", period, 2)
    _check_positive_int("repeated_tokens", "rows", rows)
    _check_positive_int("repeated_tokens", "repeats", repeats, 2)
    start = tasks.start_tokens(tokenizer)[:1] or [model.config.bos_token_id]
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(start)
    allowed = torch.tensor([t for t in range(model.config.vocab_size) if t not in special])
    if allowed.numel() < period:
        raise ValueError(f"headops.discover.repeated_tokens: period must be at most {allowed.numel()} (the "
                         f"vocabulary's ordinary tokens), got {period}")
    generator = torch.Generator().manual_seed(seed)
    body = torch.stack([allowed[torch.randperm(allowed.numel(), generator=generator)[:period]] for _ in range(rows)])
    return torch.cat([torch.full((rows, 1), start[0]), body.repeat(1, repeats)], dim=1)


def echo_induction_scores(model, ids: torch.Tensor, period: int) -> tuple:
    """(echo, induction) Scores of RazorAttention from one forward of repeated_tokens' ids: a query's
    mean attention mass on the earlier occurrence of its own token (distance `period`: echo) and
    on the token after that occurrence (distance period - 1: induction), over the query rows of
    every repetition but the first (which has no earlier occurrence)."""
    _check_positive_int("echo_induction_scores", "period", period, 2)
    if ids.dim() != 2 or ids.shape[1] < 1 + 2 * period:
        raise ValueError(f"headops.discover.echo_induction_scores: ids must be [rows, 1 + repeats * period] with at "
                         f"least two repetitions of period {period}, got shape {tuple(ids.shape)}")
    L = _shape(model)[0]
    with with_spec(model, HeadSpec.dense(model)), torch.no_grad():
        with probe(model, distances=[[period, period + 1], [period - 1, period]]) as recording:
            model.base_model(ids.to(model_device(model)))
    later = 1 + period  # the first query row of the second repetition
    masses = torch.stack([recording[layer][0].distance_mass[:, :, later:, :].double().mean(dim=(0, 2))
                          for layer in range(L)]).cpu()  # [L, Hq, 2]
    info = {"rows": ids.shape[0], "period": period, "query_rows": ids.shape[1] - later}
    return Scores("echo", masses[..., 0], dict(info)), Scores("induction", masses[..., 1], dict(info))


# ------------------------------------------------------------------------------ sink heads

def text_rows(tokenizer, *, rows: int, tokens: int) -> torch.Tensor:
    """[rows, tokens] of consecutive real text (the stdlib docstrings), each row starting with the
    tokens the tokenizer puts first (a BOS, [CLS]; nothing for some chat models)."""
    _check_positive_int("text_rows", "rows", rows)
    start = tasks.start_tokens(tokenizer)
    _check_positive_int("text_rows", "tokens", tokens, len(start) + 2)
    body, need = tasks.corpus_ids(tokenizer), rows * (tokens - len(start))
    if len(body) < need:
        raise ValueError(f"headops.discover.text_rows: rows * tokens must fit the {len(body)} tokens of the text, "
                         f"got {rows} x {tokens}")
    text = torch.tensor(body[:need]).view(rows, tokens - len(start))
    return torch.cat([torch.tensor(start, dtype=torch.int64).expand(rows, -1), text], dim=1)


def sink_scores(model, ids: torch.Tensor) -> Scores:
    """Each head's mean attention mass on the first token over ids [rows, S] of real text, from
    query row 1 on (row 0 sees only the first token). The ids go to the model's device; the
    scores come back on the CPU."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"headops.discover.sink_scores: ids must be [rows, S] with S >= 2, got {tuple(ids.shape)}")
    L = _shape(model)[0]
    with with_spec(model, HeadSpec.dense(model)), torch.no_grad():
        with probe(model, spans=[[0, 1]]) as recording:
            model.base_model(ids.to(model_device(model)))
    values = torch.stack([recording[layer][0].span_mass[:, :, 1:, 0].double().mean(dim=(0, 2))
                          for layer in range(L)]).cpu()
    return Scores("sink", values, {"rows": ids.shape[0], "tokens": ids.shape[1]})


# the DuoAttention methods live in their own module; they are part of this API
from .duo import duo_ablation, duo_attention, write_full_attention_heads  # noqa: E402
