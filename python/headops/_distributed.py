"""Past one machine (docs/DESIGN.md section 8): the one home of headops' torch.distributed code.

Tensor parallelism. transformers shards a model itself
(``from_pretrained(path, distributed_config=DistributedConfig(tp_size=N))`` under torchrun): the
q, k and v projections column-wise by heads, o_proj row-wise. ``head_shard(model)`` reads from the
model's own weights which contiguous block of query heads and KV heads this rank holds (None for a
model that is not sharded); ``patch``, ``set_spec``, ``HeadSparseCache`` and the probes slice the
whole-model spec to that block (``HeadShard.local_spec``) and gather what must be seen whole.

Sweeps. ``sweep_group(group, model)`` decides which processes a sweep (Shapley coalitions, pruning
masks, discovery prompts, evaluation samples) splits its independent work items over, and
``map_items(fn, items, group)`` runs them: rank r takes items r, r + n, r + 2n, ..., and every rank
gets all results back in item order. Each item is computed exactly as one process computes it (the
same batches, the same order of every sum afterwards), so the result is bitwise the one of a
single process with the same threads per process. A rank whose work raises makes every rank raise
that rank's error (the results' gather carries it), so a failure never leaves the others waiting.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import os
import pickle
import sys
import traceback

import torch

from ._model_attention import _per_layer_error, config_of, head_dims, kv_head_counts, latent_attention
from ._progress import progress as progress_over

# torchrun's environment: the variables it sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "HEADOPS_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 1800  # torch's own default for gloo; a rank that fails does not wait for it


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or an equivalent launcher) started."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def timeout() -> datetime.timedelta:
    """How long a collective waits for a rank that neither answers nor fails: $HEADOPS_DISTRIBUTED_TIMEOUT
    seconds (default 1800). A sweep's ranks meet before and after their work: the lead of the first
    rank done over the last must fit."""
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"headops: ${TIMEOUT_VARIABLE} must be a number of seconds > 0, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_torchrun() -> bool:
    """Joins torchrun's processes (gloo: every collective here moves CPU objects) unless torch.distributed
    is initialized already or this process was not started by torchrun; a group joined here is destroyed
    at the process's exit. Returns whether it is initialized."""
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    _dist().init_process_group("gloo", timeout=timeout())
    # the group stays for the rest of the process (later commands, sweeps) and goes at its exit:
    # destroyed and joined again, each new rendezvous on the same port could meet rank 0's old
    # store as it closed ("Connection reset by peer")
    atexit.register(_destroy_at_exit)
    return True


def _destroy_at_exit() -> None:
    if is_initialized():  # (unless the caller destroyed it already)
        _dist().destroy_process_group()


# ------------------------------------------------------------------------------ tensor parallelism

@dataclasses.dataclass(frozen=True)
class HeadShard:
    """The heads of one tensor-parallel rank: the contiguous block ``q_heads`` of the whole model's
    ``num_heads`` query heads, and the KV heads they read (whole GQA groups: head_shard checks)."""
    rank: int
    size: int
    group: object  # the torch.distributed process group of the tensor-parallel ranks
    num_heads: int
    num_kv_heads: int | tuple  # (one per layer where the layers differ: Gemma 4)

    @property
    def q_heads(self) -> range:
        per_rank = self.num_heads // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def local_spec(self, spec):
        """The rank's part of a whole-model HeadSpec: every per-head field sliced to its heads. A
        field that requires grad (a gate for head importance, DuoAttention's alpha) gets every rank's
        gradient: each rank's slice is a part of it, summed over the ranks in the backward pass."""
        trained = {name: _SumGradOverRanks.apply(t, self.group) for name, t in spec.tensors().items()
                   if t.requires_grad}
        return (dataclasses.replace(spec, **trained) if trained else spec).slice_heads(self.q_heads)

    def gather_heads(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole model's tensor from every rank's block along the head axis `dim` (a collective)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        _dist().all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


class _SumGradOverRanks(torch.autograd.Function):
    """The identity forward; backward, the gradient summed over the tensor-parallel ranks (each
    holds the gradient of its own heads' slice, zeros elsewhere)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _dist().all_reduce(grad, group=ctx.group)
        return grad, None


def _dtensor_types():
    """(DTensor, Shard), or None when no distributed tensor can exist in this process: their module
    was never imported (importing it only to find none would cost every patch() a second or more)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else (module.DTensor, module.Shard)


def head_shard(model_or_config, caller: str) -> HeadShard | None:
    """This rank's heads when `model_or_config` is a model sharded by transformers' tensor
    parallelism (read from its attention weights: DTensors sharded by rows), else None.

    A sharding that cannot give each rank whole heads and whole GQA groups is a ValueError naming
    the heads; one headops cannot read (fused projections, several mesh dimensions) a
    NotImplementedError."""
    if not isinstance(model_or_config, torch.nn.Module):
        return None
    types = _dtensor_types()
    if types is None:
        return None
    DTensor, Shard = types
    from .patching import _attention_modules  # (patching imports this module)
    from .spec import _shape_of

    modules = _attention_modules(model_or_config)
    if not any(isinstance(p, DTensor) for m in modules for p in m.parameters()):
        return None
    name = type(model_or_config).__name__
    _, Hq, Hkv, _ = _shape_of(model_or_config)
    projections = [_head_projections(model_or_config, m, Hq) for m in modules]
    weights = [(m, proj, getattr(getattr(m, proj, None), "weight", None), heads, rows)
               for m, layer in zip(modules, projections) for proj, heads, rows in layer]
    if not all(isinstance(w, DTensor) for _, _, w, _, _ in weights):
        raise NotImplementedError(
            f"{caller}: {name} is sharded by tensor parallelism, but not through separate q_proj, k_proj and v_proj "
            "weights (or multi-head latent attention's q_b_proj and kv_b_proj, GPT-NeoX's query_key_value) sharded "
            "by heads; headops slices specs for those (Llama, Mistral, Qwen, DeepSeek, GPT-NeoX families)")
    mesh = weights[0][2].device_mesh
    placements = {w.placements for _, _, w, _, _ in weights}
    if mesh.ndim != 1 or placements != {(Shard(0),)}:
        raise NotImplementedError(f"{caller}: {name}'s attention projections are sharded as "
                                  f"{sorted(map(str, placements))} on a {mesh.ndim}-D mesh; headops reads one "
                                  "tensor-parallel dimension sharded by output rows (transformers' 'colwise' plan)")
    size, rank = mesh.size(), mesh.get_local_rank()
    for kv_heads in sorted(set(Hkv if isinstance(Hkv, tuple) else (Hkv,))):
        _check_heads_divide(caller, name, size, Hq, kv_heads)
    for m, layer in zip(modules, projections):
        got = [getattr(m, proj).weight.to_local().shape[0] for proj, _, _ in layer]
        if got != [heads // size * rows for _, heads, rows in layer]:
            held = ", ".join(f"{n} {proj} rows" for n, (proj, _, _) in zip(got, layer))
            want = ", ".join(f"{heads // size} heads of {rows} {proj} rows" for proj, heads, rows in layer)
            raise NotImplementedError(
                f"{caller}: {name}'s layer {m.layer_idx} holds {held} on rank {rank} of {size}; headops expects each "
                f"rank's block of heads: {want}")
    return HeadShard(rank, size, mesh.get_group(), Hq, Hkv)


def _head_projections(model_or_config, module, Hq) -> list:
    """[(projection, heads, output rows per head)] of the weights that hold an attention module's
    heads, as tensor parallelism shards them: q_proj, k_proj, v_proj; for multi-head latent
    attention the query projection (q_b_proj, or q_proj without a query latent) and kv_b_proj,
    which expands the shared latent into every head's keys (no rotary part) and values; GPT-NeoX's
    query_key_value, which holds each head's q, k and v rows together."""
    cfg = config_of(model_or_config)
    if getattr(module, "query_key_value", None) is not None and getattr(module, "q_proj", None) is None:
        return [("query_key_value", Hq, 3 * cfg.hidden_size // Hq)]
    if latent_attention(cfg):
        query = "q_b_proj" if getattr(module, "q_b_proj", None) is not None else "q_proj"
        nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        return [(query, Hq, nope + rope), ("kv_b_proj", Hq, nope + v)]
    # (the module's layer's: Gemma 4's layers differ in head dims and KV heads)
    values, Hkv = head_dims(cfg, [module.layer_idx]), kv_head_counts(cfg, [module.layer_idx])
    try:
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq  # (q's and k's)
    except _per_layer_error():
        D = values  # (per-layer configs: the layer's q, k and v have its head dim)
    projections = [("q_proj", Hq, D), ("k_proj", Hkv, D), ("v_proj", Hkv, values)]
    if getattr(module, "is_kv_shared_layer", False) and getattr(module, "k_proj", None) is None:
        return projections[:1]  # (Gemma's layers reading another's keys and values have no k/v projections)
    # (Gemma 4's full-attention layers whose keys are their values, attention_k_eq_v, have no v_proj)
    keys_as_values = getattr(module, "v_proj", False) is None and getattr(config_of(cfg), "attention_k_eq_v", False)
    return projections[:2] if keys_as_values else projections


def _check_heads_divide(caller, name, size, Hq, Hkv) -> None:
    """Each of `size` ranks must hold whole query heads and the whole GQA groups of its KV heads."""
    if Hq % size:
        raise ValueError(f"{caller}: {name} is sharded over {size} tensor-parallel ranks, which do not divide its "
                         f"{Hq} query heads ({Hkv} KV heads): each rank must hold whole heads (use a tp_size that "
                         f"divides {Hq} and {Hkv})")
    if Hkv % size:
        per_rank, group = Hq // size, Hq // Hkv
        cut = next(b for b in range(per_rank, Hq, per_rank) if b % group)
        raise ValueError(f"{caller}: {name} is sharded over {size} tensor-parallel ranks, which cut a GQA group: "
                         f"query heads {cut - 1} and {cut} share KV head {cut // group} but would be on ranks "
                         f"{cut // per_rank - 1} and {cut // per_rank} ({Hq} query heads, {Hkv} KV heads; use a "
                         f"tp_size that divides {Hkv})")


def local_spec(model_or_config, spec, caller: str):
    """`spec` (a whole-model HeadSpec) as this rank sees it: sliced to its heads when the model is
    tensor-parallel, else `spec` itself."""
    shard = head_shard(model_or_config, caller)
    return spec if shard is None else shard.local_spec(spec)


def gather_probe(result, shard: HeadShard | None):
    """A ProbeResult of the whole model's heads from every rank's (a collective; `result` itself
    without a shard). Every statistic has the query heads on dim 1."""
    if shard is None:
        return result
    return dataclasses.replace(result, **{f.name: shard.gather_heads(getattr(result, f.name))
                                          for f in dataclasses.fields(result) if getattr(result, f.name) is not None})


@dataclasses.dataclass
class CacheView:
    """A HeadSparseCache seen whole (``HeadSparseCache.whole_model_view``): bytes summed over the
    tensor-parallel ranks (``rank_nbytes`` each), and per layer, batch row and KV head of the whole
    model (in head order) the original positions it keeps."""
    nbytes: int
    ideal_nbytes: int
    dense_nbytes: int
    rank_nbytes: list
    kept_positions: list  # [layer][batch row][KV head] -> list of ints (a layer reading another's: its source's)
    reading_layers: tuple = ()  # the layers that read another layer's keys (Gemma's num_kv_shared_layers)

    def kept_tokens(self) -> int:
        """Tokens kept over every KV head of every layer that stores its own (each stored once)."""
        return sum(len(p) for i, layer in enumerate(self.kept_positions) if i not in self.reading_layers
                   for row in layer for p in row)


def cache_view(cache, shard: HeadShard | None, dst: int = 0):
    """`cache`'s CacheView on rank `dst` of the tensor-parallel group (None on the other ranks;
    every rank must call it). Without a shard: the view of this process's cache."""
    kept = [[[layer.kept_positions(b, h).tolist() for h in range(layer.Hkv)] for b in range(len(layer.held))]
            for layer in cache._layers]
    mine = (cache.nbytes(), cache.ideal_nbytes(), cache.dense_nbytes(), kept)
    reading = tuple(sorted(cache._kv_source))
    if shard is None:
        return CacheView(mine[0], mine[1], mine[2], [mine[0]], kept, reading)
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < shard.size:
        raise ValueError(f"headops.HeadSparseCache.whole_model_view: dst must be a rank in [0, {shard.size}) of "
                         f"the tensor-parallel group, got {dst!r}")
    dist = _dist()
    parts = [None] * shard.size if shard.rank == dst else None
    dist.gather_object(mine, parts, dst=dist.get_global_rank(shard.group, dst), group=shard.group)
    if shard.rank != dst:
        return None
    whole = [[sum((part[3][layer][b] for part in parts), []) for b in range(len(kept[layer]))]
             for layer in range(len(kept))]
    return CacheView(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                     [p[0] for p in parts], whole, reading)


# ------------------------------------------------------------------------------ sweeps

def sweep_group(group, model, caller: str):
    """The process group a sweep splits its work items over, or None (this process does them all).

    group: a torch.distributed ProcessGroup; None (the default): torch.distributed's default group
    when it is initialized or this process was started by torchrun (joined here, gloo), else this
    process alone; False: this process alone. A tensor-parallel model's ranks compute every forward
    together, so its sweeps are not split (every rank runs every item)."""
    if group is False:
        return None
    dist = _dist()
    if group is not None:
        if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{caller}: group must be a torch.distributed ProcessGroup, None (torchrun's processes "
                            f"when launched by torchrun) or False (this process alone), got {type(group).__name__}")
        if dist.get_world_size(group) > 1 and head_shard(model, caller) is not None:
            raise ValueError(f"{caller}: the model is tensor-parallel: its ranks compute every forward together, so "
                             "a sweep cannot split its items over them (pass group=None or False)")
        return group if dist.get_world_size(group) > 1 else None
    if head_shard(model, caller) is not None:
        return None
    if not init_from_torchrun() or dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


def rank() -> int:
    """This process's rank in torch.distributed's default group (0 when it is not initialized)."""
    return _dist().get_rank() if is_initialized() else 0


def size(group) -> int:
    """How many processes `group` holds (1 for None: this one alone)."""
    return 1 if group is None else _dist().get_world_size(group)


def from_rank0(value):
    """`value` as rank 0 of the default group has it, on every rank (a collective; `value` itself
    when torch.distributed is not initialized)."""
    if not is_initialized():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def fingerprint(inputs) -> bytes:
    """A digest of a sweep's inputs, for map_items(inputs=...) when the inputs are large and the
    sweep calls map_items many times: hashed once."""
    return _fingerprint(inputs)


def _fingerprint(inputs) -> bytes:
    """A digest of a sweep's inputs (tensors by their bytes; dataclasses, dicts and sequences by
    their parts; the rest by pickle): equal on every rank that was given the same inputs."""
    digest = hashlib.sha256()

    def add(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(repr((t.dtype, tuple(t.shape))).encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            digest.update(type(x).__qualname__.encode())
            for f in dataclasses.fields(x):
                digest.update(f.name.encode())
                add(getattr(x, f.name))
        elif isinstance(x, dict):
            for k in sorted(x, key=repr):
                digest.update(repr(k).encode())
                add(x[k])
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__}{len(x)}".encode())
            for y in x:
                add(y)
        else:
            digest.update(pickle.dumps(x))

    add(inputs)
    return digest.digest()


class RankFailed(RuntimeError):
    """A rank's work raised: every rank of the sweep raises this, naming that rank and its error."""


def map_items(fn, items, group, *, caller: str, inputs=None, progress: bool = False, desc: str = ""):
    """``[fn(item) for item in items]``, the items split over `group`'s ranks (rank r takes items r,
    r + n, ...; None: all here), the results in item order on every rank.

    `inputs` (whatever the items are computed from: batches, seeds, masks) are compared across
    the ranks first: ranks given different inputs raise a ValueError before any work. A rank
    whose work raises makes every rank raise RankFailed with that rank's error and traceback.
    `progress` shows a progress bar on rank 0 (over its own items)."""
    items = list(items)
    if group is None:
        return [fn(item) for item in progress_over(items, desc=desc, enabled=progress)]
    dist = _dist()
    me, size = dist.get_rank(group), dist.get_world_size(group)
    digests = [None] * size
    dist.all_gather_object(digests, (_fingerprint(inputs), len(items)), group=group)
    differing = [r for r in range(size) if digests[r] != digests[0]]
    if differing:
        raise ValueError(f"{caller}: the ranks of the process group were given different inputs (rank "
                         f"{differing[0]} differs from rank 0); a sweep split over processes needs the same inputs "
                         "on every rank (pass group=False to run each process's own)")
    mine = list(range(me, len(items), size))
    error = None
    try:
        done = [fn(items[i]) for i in progress_over(mine, desc=desc, enabled=progress and me == 0)]
        payload = ("done", done)
    except Exception as e:  # sent to every rank: none of them waits for results that will never come
        error = e
        payload = ("failed", f"{type(e).__name__}: {e}", traceback.format_exc())
    parts = [None] * size
    dist.all_gather_object(parts, payload, group=group)
    failed = [r for r in range(size) if parts[r][0] == "failed"]
    if failed:
        r = failed[0]
        raise RankFailed(f"{caller}: rank {r} of {size} failed: {parts[r][1]}\n--- rank {r}'s traceback ---\n"
                         f"{parts[r][2]}") from error
    results = [None] * len(items)
    for r in range(size):
        for i, value in zip(range(r, len(items), size), parts[r][1]):
            results[i] = value
    return results
