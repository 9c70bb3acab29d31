"""DuoAttention's retrieval heads (Xiao et al. 2024), found by optimisation and by ablation.

Both compare the model with full attention against the model in which KV heads mix full and
streaming attention (``out = alpha * full + (1 - alpha) * streaming``, streaming = `sinks` first
tokens + a `window` of recent ones; headops computes both in one pass) through the distillation
loss: the mean squared difference of the final hidden states (after the last norm) on the
positions that predict the answers of multi-passkey prompts (headops.tasks.multi_passkey).

- ``duo_attention``: DuoAttention's optimisation. One alpha per KV head, tied across its query
  heads, starts at 1; the model is frozen; loss = distillation + reg * mean(alpha); AdamW; alpha
  clamped to [0, 1] after every step. At alpha = 1 the distillation is 0 up to float rounding
  (the mixed heads and the dense targets may tile their products differently), so the L1 term
  makes the first moves; heads whose streaming view changes the answers climb back.
- ``duo_ablation``: ours, cheaper (no backward): the distillation loss with one KV head's alpha
  at 0 (that head streaming) and every other at 1, for all KV heads in batched forwards through a
  per-batch alpha ``[B, L, Hq]``.

``write_full_attention_heads`` writes DuoAttention's ``full_attention_heads.tsv`` (one row per
layer, one value per KV head), which ``HeadSpec.from_duo_attention`` loads.
"""

from __future__ import annotations

import time

import torch

from ._distributed import map_items, sweep_group
from ._progress import progress
from .patching import set_spec
from .research import model_device, with_spec
from .spec import HeadSpec

__all__ = ["duo_attention", "duo_ablation", "write_full_attention_heads", "distillation_targets"]


def _scores(method, values, info):
    from .discover import Scores  # (discover imports this module)

    return Scores(method, values, info)


def _check(caller, samples, sinks, window):
    if not samples or any(not s.supervised for s in samples):
        raise ValueError(f"headops.discover.{caller}: samples must be training prompts with supervised answers "
                         "(headops.tasks.multi_passkey), at least one")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"headops.discover.{caller}: sinks must be an int >= 0, got {sinks!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"headops.discover.{caller}: window must be an int >= 1, got {window!r}")


def _answer_positions(sample) -> torch.Tensor:
    """The positions whose hidden states predict the answers' tokens (one before each)."""
    return torch.cat([torch.arange(start - 1, end - 1) for start, end in sample.supervised])


def _final_states(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, n, hidden]: the last hidden states (after the final norm) at `positions` (ids go to
    the model's device)."""
    return model.base_model(ids.to(model_device(model))).last_hidden_state[:, positions]


def distillation_targets(model, samples, *, group=None) -> list:
    """[(ids [1, T], positions, hidden states of the full-attention model there)] per sample (the
    samples split over `group`'s processes, as duo_ablation's `group`)."""
    def target(s):
        positions = _answer_positions(s)
        return s.ids.unsqueeze(0), positions, _final_states(model, s.ids.unsqueeze(0), positions)

    group = sweep_group(group, model, "headops.discover.distillation_targets")
    with with_spec(model, HeadSpec.dense(model)), torch.no_grad():
        return map_items(target, samples, group, caller="headops.discover.distillation_targets", inputs=samples)


def _distillation_loss(states: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B]: per row, the mean squared difference over positions and hidden units."""
    return (states - reference).pow(2).flatten(1).mean(dim=1)


def _streaming_spec(model, sinks: int, window: int) -> HeadSpec:
    """Every head's streaming view: `sinks` first tokens and a `window` of recent ones (alpha then
    mixes it with full attention, which ignores both)."""
    spec = HeadSpec.dense(model)
    spec.window[:] = window
    spec.sinks[:] = sinks
    return spec


class _Frozen:
    """The model's parameters without gradients inside the block (only alpha trains)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)


def duo_attention(model, samples, *, sinks: int, window: int, steps: int, lr: float = 0.02, reg: float = 0.05,
                  show_progress: bool = False, group=None):
    """DuoAttention's optimisation (see the module docstring) over the training `samples`
    (multi_passkey prompts, one per step, in turn). Returns Scores whose values are each query
    head's alpha [L, Hq] (its KV head's), with info: kv_alpha [L, Hkv] (a list of each layer's
    [Hkv] where the layers differ in KV heads: Gemma 4), the loss, distillation
    and alpha mean of every step. ``group`` splits the distillation targets' forwards over
    processes (as duo_ablation's); the steps follow each other, so every process runs them all."""
    _check("duo_attention", samples, sinks, window)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"headops.discover.duo_attention: steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"headops.discover.duo_attention: lr must be > 0, got {lr!r}")
    if not reg >= 0:
        raise ValueError(f"headops.discover.duo_attention: reg must be >= 0, got {reg!r}")
    targets = distillation_targets(model, samples, group=group)
    spec = _streaming_spec(model, sinks, window)
    alpha = torch.ones(len(spec._kv_head_list()), requires_grad=True)  # one per KV head, layer by layer
    # weight_decay=0: the L1 term is the only pull towards streaming, as the loss says
    optimizer = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    history = {"loss": [], "distillation": [], "alpha_mean": []}
    started = time.perf_counter()
    with with_spec(model, spec), _Frozen(model):
        for step in progress(range(steps), desc="DuoAttention (steps)", enabled=show_progress):
            ids, positions, reference = targets[step % len(targets)]
            spec.alpha = spec._per_query_head(alpha)  # tied across each KV head's query heads
            set_spec(model, spec)
            distillation = _distillation_loss(_final_states(model, ids, positions), reference).mean()
            loss = distillation + reg * alpha.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
                history["loss"].append(loss.item())
                history["distillation"].append(distillation.item())
                history["alpha_mean"].append(alpha.mean().item())
    kv_alpha = alpha.detach().clone()
    return _scores("duo", spec._per_query_head(kv_alpha).double(),
                   {"kv_alpha": spec._kv_rows(kv_alpha), "seconds": time.perf_counter() - started, **history,
                    "sinks": sinks, "window": window, "lr": lr, "reg": reg, "steps": steps})


def duo_ablation(model, samples, *, sinks: int, window: int, max_batch_tokens: int = 8192,
                 show_progress: bool = False, group=None):
    """Each KV head's distillation loss when it alone streams (alpha 0) and the others stay full,
    averaged over `samples`; all KV heads of a sample in batched forwards of at most
    max_batch_tokens tokens (per-batch alpha [B, L, Hq]). Returns Scores [L, Hq] (each query
    head its KV head's loss), info: kv_loss [L, Hkv] (a list of each layer's [Hkv] where the layers
    differ in KV heads).

    ``group``: the processes the batches are split over (a torch.distributed process group; None:
    torchrun's processes when launched by torchrun, else this one; False: this process alone);
    every rank gets the scores, bitwise those of one process."""
    _check("duo_ablation", samples, sinks, window)
    processes = sweep_group(group, model, "headops.discover.duo_ablation")
    targets = distillation_targets(model, samples, group=False if processes is None else processes)
    spec = _streaming_spec(model, sinks, window)
    L, Hq = spec.num_layers, spec.num_heads
    heads = spec._kv_head_list()
    kv_loss = torch.zeros(len(heads), dtype=torch.float64)  # (in the order of heads)
    index = {head: i for i, head in enumerate(heads)}
    work = []
    for ids, positions, reference in targets:
        per_batch = max(1, max_batch_tokens // ids.shape[1])
        work += [(ids, positions, reference, heads[i:i + per_batch]) for i in range(0, len(heads), per_batch)]

    def losses_of(item):
        ids, positions, reference, chunk = item
        alpha = torch.ones(len(chunk), L, Hq)
        for row, (layer, h) in enumerate(chunk):
            group = spec.kv_group(layer)
            alpha[row, layer, h * group:(h + 1) * group] = 0.0
        spec.alpha = alpha
        set_spec(model, spec)
        return _distillation_loss(_final_states(model, ids.expand(len(chunk), -1), positions), reference).tolist()

    with with_spec(model, spec), torch.no_grad():
        losses = map_items(losses_of, work, processes, caller="headops.discover.duo_ablation",
                           inputs=(samples, sinks, window, max_batch_tokens), progress=show_progress,
                           desc="DuoAttention ablation (batches)")
    for (_, _, _, chunk), values in zip(work, losses):  # in batch order, as one process adds
        for head, value in zip(chunk, values):
            kv_loss[index[head]] += value / len(targets)
    return _scores("duo-ablation", spec._per_query_head(kv_loss),
                   {"kv_loss": spec._kv_rows(kv_loss), "sinks": sinks, "window": window})


def write_full_attention_heads(path, kv_alpha) -> None:
    """DuoAttention's full_attention_heads.tsv: one row per layer, one tab-separated value per KV
    head. kv_alpha: a [layers, KV heads] tensor, or a list of each layer's [KV heads] (duo_attention's
    info where the layers differ in KV heads; HeadSpec.from_duo_attention reads either back)."""
    rows = list(kv_alpha) if isinstance(kv_alpha, (list, tuple)) else None
    if not (isinstance(kv_alpha, torch.Tensor) and kv_alpha.dim() == 2) and not (
            rows and all(isinstance(r, torch.Tensor) and r.dim() == 1 for r in rows)):
        raise ValueError("headops.discover.write_full_attention_heads: kv_alpha must be a [layers, KV heads] tensor "
                         "or a list of each layer's [KV heads] tensor")
    with open(path, "w") as f:
        for row in (rows if rows is not None else kv_alpha):
            f.write("\t".join(f"{x:.18e}" for x in row.tolist()) + "\n")
