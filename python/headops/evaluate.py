"""Accuracy against bytes held: every head-level method on the same prompts (docs/evaluate.md).

Each batch of contexts is prefilled once with full attention (``headops.capture_prefill``); every
method then builds its compressed cache from that prefill (``HeadSparseCache.from_prefill``),
the question is appended and the answer decoded greedily from the compressed cache (query-agnostic
compression, docs/DESIGN.md section 7). A grid of many methods costs little more than its prefills.
Budget methods can also run question-aware (``question=1``): their cache is built after the
question is prefilled too, as SnapKV's paper runs it (the same prefill serves both).

A method is one string, ``family`` or ``family:key=value,...``::

    dense                                   every KV head keeps every token
    streaming_llm:window=256,sinks=4        every KV head streaming (StreamingLLM)
    duo:scores=retrieval,full=0.5           DuoAttention's split: the top 50 % KV heads by the named
                                            scores full, the others streaming (sinks=64, window=256)
    random:full=0.5,seed=0                  the same split from random scores (the control)
    razor:scores=retrieval,full=0.25        RazorAttention: the top KV heads full, the rest streaming
                                            with a compensation token (weighted=1; weighted=0: no log n)
    snapkv:budget=256                       every KV head keeps 256 tokens chosen by SnapKV scores
    adakv:budget=256,alpha=0.2              the same, shared per layer as AdaKV allocates it
    headkv:scores=retrieval,budget=256      HeadKV: static per-head budgets from the named scores (beta=1.2)
    pyramidkv:budget=256                    PyramidKV: per-layer budgets falling from the first layer to the
                                            last (beta=20), 256 on average (the latest 8 kept in every layer)
    snapkv:budget=256,question=1            (and adakv, headkv, pyramidkv) question-aware, as SnapKV's paper runs it:
                                            the question is prefilled with the context and the
                                            observation window (the prompt's last queries) reads it
    snapkv:budget=256,keep_window=1         (and adakv, headkv, pyramidkv) the observation window's tokens kept
                                            whole, as SnapKV and kvpress keep them (0: the sinks and
                                            latest 8 only); pooling=avg: kvpress's average pooling
                                            of the scores (max: SnapKV's default)

``scores=`` names one of the per-head score tables given to ``evaluate`` (e.g. the CSVs that
``python -m headops discover`` writes). Every row of the result records the bytes the method's
cache really held after the answer (``cache.nbytes()``), not a nominal ratio.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time

import torch

from . import _distributed
from . import tasks as tasks_module
from ._args import POOLINGS
from ._progress import progress
from .cache import BUDGET_RECENT, HeadSparseCache
from .patching import patch, set_spec, unpatch
from .prefill import capture_prefill
from .spec import HeadSpec

__all__ = ["Method", "parse_method", "standard_methods", "evaluate", "prompt_prefill", "method_cache",
           "answer_from_cache", "read_rows", "summarize", "wilson_interval", "paired_comparison", "CSV_HEADER"]

CALLER = "headops.evaluate"

# how every budget family scores and chooses its tokens (SnapKV's scores), with the defaults
_BUDGET_SCORING = {"observation_window": 32, "pool_kernel": 7, "pooling": "max", "keep_window": 0, "question": 0}
# family -> its parameters and their defaults (None: required)
FAMILIES = {
    "dense": {},
    "streaming_llm": {"window": 256, "sinks": 4},
    "duo": {"scores": None, "full": None, "window": 256, "sinks": 64},
    "random": {"full": None, "seed": 0, "window": 256, "sinks": 64},
    "razor": {"scores": None, "full": None, "window": 256, "sinks": 64, "weighted": 1},
    "snapkv": {"budget": None, **_BUDGET_SCORING},
    "adakv": {"budget": None, "alpha": 0.2, **_BUDGET_SCORING},
    "headkv": {"scores": None, "budget": None, "beta": 1.2, **_BUDGET_SCORING},
    "pyramidkv": {"budget": None, "beta": 20.0, **_BUDGET_SCORING},
}
_TEXT_PARAMS = {"scores", "pooling"}
_FLOAT_PARAMS = {"full", "alpha", "beta"}

CSV_HEADER = ["task", "length", "depth", "seed", "method", "family", "correct", "recall", "bytes", "dense_bytes",
              "ideal_bytes", "answer", "seconds"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One compression method: its family and parameters (defaults filled in). ``name`` is the
    string it was parsed from, normalised (the key of its rows in a result CSV)."""
    family: str
    params: tuple  # sorted (key, value) pairs

    @property
    def name(self) -> str:
        given = [f"{k}={_show(v)}" for k, v in self.params if FAMILIES[self.family][k] != v or
                 FAMILIES[self.family][k] is None]
        return self.family + (":" + ",".join(given) if given else "")

    def param(self, key):
        return dict(self.params)[key]

    @property
    def question_aware(self) -> bool:
        """Whether the cache is built after the question is prefilled (its budget heads choose
        with the question in their observation window), not before it (query-agnostic)."""
        return bool(dict(self.params).get("question", 0))

    def spec(self, model, scores: dict | None = None) -> HeadSpec:
        """This method's HeadSpec for `model`. scores: {name: [L, Hq] or [L, Hkv] tensor}."""
        p = dict(self.params)
        f = self.family
        if f == "dense":
            return HeadSpec.dense(model)
        if f == "streaming_llm":
            return HeadSpec.streaming_llm(model, window=p["window"], sinks=p["sinks"])
        if f == "snapkv":
            return HeadSpec.budget(model, budget=p["budget"], **_scoring_options(p))
        if f == "adakv":
            return HeadSpec.budget(model, budget=p["budget"], allocation="adakv", alpha=p["alpha"],
                                   **_scoring_options(p))
        if f == "pyramidkv":
            return HeadSpec.pyramid(model, budget=p["budget"], beta=p["beta"], **_scoring_options(p))
        if f == "random":
            dense = HeadSpec.dense(model)
            generator = torch.Generator().manual_seed(p["seed"])
            per_kv_head = torch.rand(len(dense._kv_head_list()), generator=generator, dtype=torch.float64)
            table = dense._per_query_head(per_kv_head)  # (each query head its KV head's: pooled back by max)
            return HeadSpec.from_scores(model, table, full_fraction=p["full"], window=p["window"], sinks=p["sinks"])
        table = _named_scores(scores, p["scores"], self.name)
        if f == "duo":
            return HeadSpec.from_scores(model, table, full_fraction=p["full"], window=p["window"], sinks=p["sinks"])
        if f == "razor":  # (retrieval heads: the top fraction, chosen as from_scores chooses its full heads)
            from ._model_attention import kv_sources

            dense, sources = HeadSpec.dense(model), kv_sources(model)
            keep = dense._top_stored_kv_heads(dense._kv_head_scores(CALLER, table, "max", sources), sources, p["full"])
            return HeadSpec.razor(model, sorted(keep), window=p["window"], sinks=p["sinks"],
                                  weighted=bool(p["weighted"]))
        if f == "headkv":
            # (no head below what its cache's budget heads need: budget_recent + 1)
            return HeadSpec.headkv(model, table.to(torch.float64), budget=p["budget"], beta=p["beta"],
                                   window=BUDGET_RECENT, **_scoring_options(p))
        raise AssertionError(f)


def _scoring_options(p) -> dict:
    """A budget family's _BUDGET_SCORING parameters as HeadSpec.budget / headkv keywords (question
    is the harness's, not the spec's)."""
    return {"observation_window": p["observation_window"], "pool_kernel": p["pool_kernel"], "pooling": p["pooling"],
            "keep_observation_window": bool(p["keep_window"])}


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _named_scores(scores, name, method):
    if not scores or name not in scores:
        have = ", ".join(sorted(scores)) if scores else "none"
        raise ValueError(f"{CALLER}: method {method!r} reads the scores {name!r}, but the scores given are: {have} "
                         f"(pass scores={{{name!r}: tensor}}, or --scores {name}=path.csv on the command line)")
    return scores[name]


def parse_method(text: str) -> Method:
    """A Method from its string (see the module's docstring); a clear ValueError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{CALLER}: a method is a non-empty string like 'duo:scores=retrieval,full=0.5', got {text!r}")
    family, _, rest = text.strip().partition(":")
    if family not in FAMILIES:
        raise ValueError(f"{CALLER}: method {text!r}: the family must be one of {', '.join(FAMILIES)}, got {family!r}")
    params = dict(FAMILIES[family])
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in params:
            known = ", ".join(params) or "none"
            raise ValueError(f"{CALLER}: method {text!r}: {item!r} is not key=value with a key of {family} "
                             f"(its keys: {known})")
        params[key] = _parse_value(text, key, value)
    missing = [k for k, v in params.items() if v is None]
    if missing:
        raise ValueError(f"{CALLER}: method {text!r} needs {', '.join(missing)} (e.g. "
                         f"{family}:{','.join(f'{k}=...' for k in missing)})")
    if "question" in params and params["question"] not in (0, 1):
        raise ValueError(f"{CALLER}: method {text!r}: question must be 0 (the cache built from the context "
                         f"alone) or 1 (after the question), got {params['question']}")
    if "keep_window" in params and params["keep_window"] not in (0, 1):
        raise ValueError(f"{CALLER}: method {text!r}: keep_window must be 0 (a budget head always keeps its sinks "
                         f"and latest 8 tokens) or 1 (also the whole observation window), got {params['keep_window']}")
    if "pooling" in params and params["pooling"] not in POOLINGS:
        raise ValueError(f"{CALLER}: method {text!r}: pooling must be {' or '.join(POOLINGS)}, "
                         f"got {params['pooling']!r}")
    if "full" in params and not 0.0 <= params["full"] <= 1.0:
        raise ValueError(f"{CALLER}: method {text!r}: full must be a fraction of the KV heads in [0, 1], "
                         f"got {params['full']}")
    return Method(family, tuple(sorted(params.items())))


def _parse_value(text, key, value):
    if key in _TEXT_PARAMS:
        if not value:
            raise ValueError(f"{CALLER}: method {text!r}: {key} must "
                             f"{'name a score table' if key == 'scores' else 'not be empty'}")
        return value
    try:
        return float(value) if key in _FLOAT_PARAMS else int(value)
    except ValueError:
        kind = "a number" if key in _FLOAT_PARAMS else "an int"
        raise ValueError(f"{CALLER}: method {text!r}: {key} must be {kind}, got {value!r}") from None


def standard_methods(score_names=(), *, fractions=(0.25, 0.5, 0.75), budgets=(128, 256, 512),
                     windows=(256, 512, 1024), question_aware: bool = True) -> list:
    """The comparison grid: dense; StreamingLLM at each window; DuoAttention splits from each named
    score table and from random scores at each fraction of full KV heads; RazorAttention (weighted
    and unweighted) from the first score table at the smallest fraction; uniform SnapKV, AdaKV,
    PyramidKV and HeadKV from each named score table at each budget, each also question-aware
    (question=1) unless question_aware is False."""
    names = ["dense"] + [f"streaming_llm:window={w}" for w in windows]
    for name in score_names:
        names += [f"duo:scores={name},full={f:g}" for f in fractions]
    names += [f"random:full={f:g}" for f in fractions]
    if score_names:
        names += [f"razor:scores={score_names[0]},full={fractions[0]:g},weighted={w}" for w in (1, 0)]
    budgeted = [f"{family}:budget={b}" for family in ("snapkv", "adakv", "pyramidkv") for b in budgets]
    for name in score_names:  # (which scores suit HeadKV depends on the model and the lengths: docs/evaluate.md)
        budgeted += [f"headkv:scores={name},budget={b}" for b in budgets]
    names += budgeted + ([f"{n},question=1" for n in budgeted] if question_aware else [])
    return [parse_method(n) for n in names]


# ------------------------------------------------------------------------------ results


def _key(task, length, depth, seed, method) -> tuple:
    return (str(task), int(length), f"{float(depth):.6g}", int(seed), str(method))


def read_rows(path: str) -> list:
    """The rows of a result CSV (dicts of strings), [] when it does not exist. A run killed while
    writing a row leaves at most that row incomplete: it is dropped (and done again on resume)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and reader.fieldnames != CSV_HEADER:
            raise ValueError(f"{path}: not a headops evaluate CSV (header {', '.join(CSV_HEADER)}); "
                             "give another --out or remove it")
        return [r for r in reader if r.get("seconds") not in (None, "")]


class _ResultFile:
    """Rows appended and flushed as they finish; what a killed run wrote is kept."""

    def __init__(self, path: str | None):
        self.path = path
        self.rows = read_rows(path) if path else []
        self.done = {_key(r["task"], r["length"], r["depth"], r["seed"], r["method"]) for r in self.rows}
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            fresh = not os.path.exists(path) or os.path.getsize(path) == 0
            if not fresh:
                _drop_partial_line(path)
            self._f = open(path, "a", newline="")
            self._w = csv.writer(self._f)
            if fresh:
                self._w.writerow(CSV_HEADER)
                self._f.flush()

    def add(self, row: dict):
        self.rows.append({k: str(v) for k, v in row.items()})
        self.done.add(_key(row["task"], row["length"], row["depth"], row["seed"], row["method"]))
        if self.path:
            self._w.writerow([row[k] for k in CSV_HEADER])
            self._f.flush()

    def close(self):
        if self.path:
            self._f.close()


def _drop_partial_line(path):
    """A file whose last line was cut off by a kill: cut it back to its last whole line."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ------------------------------------------------------------------------------ the harness


def _batches(samples, batch_size):
    """Lists of sample indices, at most batch_size each, with one prompt length and one question
    start (a batch shares its prefill and its question's decode call); the longest prompts first,
    so that a round of one batch per process (under torchrun) holds batches of one length, not a
    short batch waiting on a long one."""
    groups = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s.ids), s.question_start), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: -len(samples[g[0]].ids))  # (stable: ties keep their order)
    return [g[i:i + batch_size] for g in ordered for i in range(0, len(g), batch_size)]


def evaluate(model, tokenizer, samples, methods, *, scores: dict | None = None, batch_size: int = 8,
             max_new_tokens: int | None = None, observation_window: int | None = None, out: str | None = None,
             show_progress: bool = True, group=None) -> list:
    """Every method on every sample; returns the rows (dicts) and, with `out`, appends them to that
    CSV as they finish. Rows already in `out` (same task, length, depth, seed and method) are not
    done again: a killed run resumes where it stopped.

    samples: headops.tasks Samples; methods: Method objects or their strings; scores: {name:
    per-head score tensor} for the methods that read scores. The model is patched for the run and
    unpatched after. Generation is greedy; max_new_tokens defaults to the answers' tokens plus
    room for separators. observation_window: how many last queries (of the context, or of the
    prompt for question-aware methods) the prefill keeps for SnapKV scores (default: the largest
    any method asks for).

    group: the processes the batches of prompts are split over (a torch.distributed process group;
    None: torchrun's processes when launched by torchrun, else this one; False: this one). Every
    rank gets every row; only rank 0 reads and writes `out`, after each round of one batch per rank."""
    methods = [m if isinstance(m, Method) else parse_method(m) for m in methods]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"{CALLER}: methods must be distinct, got {names}")
    if not samples:
        raise ValueError(f"{CALLER}: samples must not be empty")
    specs = {m.name: m.spec(model, scores) for m in methods}  # every method checked before any work
    group = _distributed.sweep_group(group, model, CALLER)
    lead = not _distributed.is_initialized() or _distributed.rank() == 0
    results = _ResultFile(out if lead else None)
    if _distributed.is_initialized():  # rank 0's file says what is done: every rank runs the same batches
        results.rows, results.done = _distributed.from_rank0((results.rows, results.done))
    window = observation_window or max([dict(m.params).get("observation_window", 1) for m in methods])
    run = _BatchRunner(model, tokenizer, samples, methods, specs, window, max_new_tokens)
    batches = [b for b in _batches(samples, batch_size) if run.todo(b, results.done)]
    ranks = _distributed.size(group)
    rounds = [batches[i:i + ranks] for i in range(0, len(batches), ranks)]
    inputs = _distributed.fingerprint((samples, names, scores, batch_size, max_new_tokens, window))
    patch(model, HeadSpec.dense(model))
    try:
        for batch_round in progress(rounds, desc="evaluate", total=len(rounds), enabled=show_progress and lead):
            if group is None:  # each method's rows written as soon as they are done
                for rows in run.rows(batch_round[0], results.done):
                    for row in rows:
                        results.add(row)
                continue
            per_batch = _distributed.map_items(lambda b: list(run.rows(b, results.done)), batch_round, group,
                                               caller=CALLER, inputs=inputs)
            for per_method in per_batch:
                for rows in per_method:
                    for row in rows:
                        results.add(row)
    finally:
        unpatch(model)
        results.close()
    return results.rows


def eos_token_id(model) -> int:
    """The model's end-of-sequence token (the first, where its generation config lists several)."""
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def cache_from_prefill(model, spec, prefill, ids, question_start: int, answer_tokens: int = 0):
    """`spec`'s cache built from `prefill` (the context ``ids[:, :question_start]``, captured by
    ``capture_prefill`` on `model` patched by headops), the model switched to `spec`; room for the
    question and answer to be appended as one decode call each. Budget heads keep the prefill's
    selection and hold room for the rest of the prompt and `answer_tokens` more (append_room):
    the context is compressed once and what follows it is appended whole, as SnapKV, AdaKV and
    HeadKV run and kvpress measures (without the room, the question's own tokens would compete
    with the context's for a budget head's slots, and most of them would be evicted as they
    arrive)."""
    set_spec(model, spec)
    follows = ids.shape[1] - question_start
    return HeadSparseCache.from_prefill(model, spec, prefill, max_step=follows, append_room=follows + answer_tokens)


def answer_from_cache(model, ids, cache, max_new_tokens: int) -> torch.Tensor:
    """The question (``ids`` past the cached context) appended, the answer decoded greedily from
    `cache`: the new tokens ``[B, n]``."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=eos_token_id(model), top_p=None, top_k=None,
                              temperature=None)[:, ids.shape[1]:]


def prompt_prefill(model, ids, context_end: int, observation_window: int) -> dict:
    """The one dense prefill every method builds its cache from, for prompts ``ids`` ``[B, S]``
    whose context is ``ids[:, :context_end]``: {False: the context's part (query-agnostic
    methods), True: the whole prompt but its last token (question-aware ones)}, each with its last
    `observation_window` queries (fewer where the part is shorter). One capture over the prompt
    serves both (``DensePrefill.prefix``), so a method's cache does not depend on which other
    methods share the prefill; a hybrid model's recurrent states after the prompt hold no
    context's, so its context is captured again, alone."""
    prompt_end = ids.shape[1] - 1
    with torch.no_grad():
        whole = capture_prefill(model, ids[:, :prompt_end],
                                observation_window=min(prompt_end, observation_window + prompt_end - context_end))
        if whole.states:
            return {False: capture_prefill(model, ids[:, :context_end],
                                           observation_window=min(observation_window, context_end)), True: whole}
    return {False: whole.prefix(context_end, min(observation_window, context_end)), True: whole}


def method_cache(model, method, spec, prefills: dict, ids, context_end: int, answer_tokens: int):
    """`method`'s cache (its HeadSpec `spec`) from ``prompt_prefill``'s prefills, the model
    switched to `spec`, with room for `answer_tokens` new tokens; ``answer_from_cache(model, ids,
    cache, answer_tokens)`` then decodes what follows."""
    aware = method.question_aware
    return cache_from_prefill(model, spec, prefills[aware], ids, ids.shape[1] - 1 if aware else context_end,
                              answer_tokens)


class _BatchRunner:
    """One batch of prompts: one dense prefill of their context, then each method still to do
    builds its cache from it, decodes the question and the answer; its rows."""

    def __init__(self, model, tokenizer, samples, methods, specs, window, max_new_tokens):
        self.model, self.tokenizer, self.samples, self.methods = model, tokenizer, samples, methods
        self.specs, self.window, self.max_new_tokens = specs, window, max_new_tokens

    def _key(self, i, method):
        s = self.samples[i]
        return _key(s.task, s.length, s.depth, s.seed, method.name)

    def todo(self, batch, done) -> list:
        return [m for m in self.methods if any(self._key(i, m) not in done for i in batch)]

    def rows(self, batch, done):
        """The batch's rows, one list per method still to do, each yielded as soon as it is done.

        One dense prefill of the prompt but its last token serves every method: a query-agnostic
        one builds its cache from the context's part of it (the question then appended as one
        decode call), a question-aware one from all of it (the last token then decoded), its
        observation window the prompt's last queries. The prefill is the same whichever methods
        are still to do, so a method's rows do not depend on the company it runs in."""
        model, samples = self.model, self.samples
        ids = torch.stack([samples[i].ids for i in batch])
        context_end = samples[batch[0]].question_start
        budget = self.max_new_tokens or max(samples[i].answer_budget() for i in batch)
        prefills = prompt_prefill(model, ids, context_end, self.window)
        for m in self.todo(batch, done):
            rows = []
            started = time.perf_counter()
            cache = method_cache(model, m, self.specs[m.name], prefills, ids, context_end, budget)
            new = answer_from_cache(model, ids, cache, budget)
            seconds = (time.perf_counter() - started) / len(batch)
            held, dense, ideal = (cache.nbytes() / len(batch), cache.dense_nbytes() / len(batch),
                                  cache.ideal_nbytes() / len(batch))
            for row, i in enumerate(batch):
                if self._key(i, m) in done:
                    continue
                s = samples[i]
                text = self.tokenizer.decode(tasks_module.until_eos(model, new[row]), skip_special_tokens=True)
                rows.append(dict(task=s.task, length=s.length, depth=f"{s.depth:.6g}", seed=s.seed, method=m.name,
                                 family=m.family, correct=int(tasks_module.exact_match(s, text)),
                                 recall=f"{tasks_module.answer_recall(s, text):.4g}", bytes=round(held),
                                 dense_bytes=round(dense), ideal_bytes=round(ideal), answer=text,
                                 seconds=f"{seconds:.4g}"))
            yield rows


# ------------------------------------------------------------------------------ summaries


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple:
    """The Wilson score interval (95 % by default) of a proportion correct / total."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_comparison(rows, first: str, second: str, *, task: str | None = None, length: int | None = None) -> dict:
    """Two methods on the same prompts: how many prompts only `first` answered right, only
    `second` did, how many both had, and the exact two-sided McNemar p-value (the binomial test
    of the discordant prompts; 1 when there are none). Rows are matched by (task, length,
    depth, seed); `task` / `length` restrict them. Paired, so it sees differences that two
    overlapping Wilson intervals hide."""
    def by_prompt(method):
        out = {}
        for r in rows:
            if r["method"] != method or (task is not None and r["task"] != task) or \
                    (length is not None and int(r["length"]) != int(length)):
                continue
            out[_key(r["task"], r["length"], r["depth"], r["seed"], "")] = int(r["correct"])
        return out

    a, b = by_prompt(first), by_prompt(second)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"{CALLER}: no prompt has rows of both {first!r} and {second!r}")
    only_first = sum(1 for k in common if a[k] and not b[k])
    only_second = sum(1 for k in common if b[k] and not a[k])
    n, low = only_first + only_second, min(only_first, only_second)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n) if n else 1.0
    return dict(prompts=len(common), only_first=only_first, only_second=only_second,
                both=sum(1 for k in common if a[k] and b[k]), p_value=p)


def summarize(rows) -> list:
    """One dict per (task, length, method): samples, accuracy with its 95 % Wilson interval, mean
    recall, and mean bytes held per sample (absolute and as a fraction of dense)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], int(r["length"]), r["method"]), []).append(r)
    out = []
    for (task, length, method), rs in sorted(groups.items()):
        n, correct = len(rs), sum(int(r["correct"]) for r in rs)
        low, high = wilson_interval(correct, n)
        held = sum(float(r["bytes"]) for r in rs) / n
        dense = sum(float(r["dense_bytes"]) for r in rs) / n
        out.append(dict(task=task, length=length, method=method, family=rs[0]["family"], samples=n,
                        accuracy=correct / n, low=low, high=high,
                        recall=sum(float(r["recall"]) for r in rs) / n, bytes=held,
                        bytes_fraction=held / dense if dense else float("nan")))
    return out
