"""Padded batches in a patched model: transformers' key padding as headops arguments.

A row's positions count from its first real token (docs/integration.md): with left padding, as
tokenizers pad prompts for generation, its sinks are its own first tokens and a spec's key_bias
over the first K keys falls on them, so each prompt of a padded batch is attended as it would
be alone. Without a HeadSparseCache the padded keys stay in the sequence, masked by a -inf
key_bias, and the per-head arguments move by the row's padding; a HeadSparseCache is given
each row's tokens without their padding (``padding_side="left"``) and stores none of it.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from ._model_attention import read_once


class Padding(NamedTuple):
    """The key padding of a 4-D mask, read from its last query row (causal or bidirectional masks
    with key padding)."""

    valid: torch.Tensor  # [B, Sk] bool: the keys the mask lets through
    first: torch.Tensor  # [B] int64: each row's first valid key (0 for a row with none); host, unless compiling
    left_only: bool | None  # whether each row is padding, then tokens only (None while compiling: not read)


def of_mask(mask):
    """The mask's Padding, or None when it masks nothing. One device-to-host copy for what the host
    decides on, per mask tensor (a forward's layers share it: _model_attention.read_once); nothing
    is read while torch.compile traces."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise NotImplementedError(f"headops: attention masks of shape {tuple(mask.shape)} are not supported")
    last = mask[:, 0, -1, :]
    valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    first = valid.to(torch.int8).argmax(-1)
    if torch.compiler.is_compiling():  # (no branch on data)
        return Padding(valid, first, None)

    def decide():
        return torch.cat([first, torch.stack([valid.all(), _left_only(valid, first)]).to(torch.int64)]).tolist()

    read = read_once("padding", (mask,), decide)
    if read[-2]:
        return None
    return Padding(valid, torch.tensor(read[:-2], dtype=torch.int64), bool(read[-1]))


def _left_only(valid, first):
    """Whether each row of `valid` is padding, then tokens only (a 0-d bool tensor)."""
    positions = torch.arange(valid.shape[-1], device=valid.device)
    return (valid == (positions >= first.unsqueeze(-1))).all()


def padding_bias(valid):
    """[B, 1, Sk] key_bias: 0 on the keys of `valid`, -inf on the padding."""
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(valid, zero, torch.tensor(float("-inf"))).unsqueeze(1)


def from_first_token(args: dict, first, dropped: int = 0) -> dict:
    """The per-head arguments of a padded batch with each row's positions counted from its first
    token (`first`, [B]; over the keys that start at position `dropped` where the model's cache
    dropped the first ones): sinks move by it (the padding before them is masked), and key_bias by
    position (``[Hq, dropped + Sk]``, a spec's) becomes ``[B, Hq, Sk]``, each row's moved by it."""
    args = dict(args)
    sinks = args.get("sinks")
    if sinks is not None:
        args["sinks"] = (sinks.unsqueeze(-2) + first.to(sinks.device).unsqueeze(-1) - dropped).clamp_min(0)
    key_bias = args.get("key_bias")
    if key_bias is not None and key_bias.dim() == 2:
        keys = key_bias.shape[-1] - dropped
        at = first.to(key_bias.device).unsqueeze(-1)
        # key j is at position dropped + j, the row's (dropped + j - first)-th; < 0: padding
        source = (torch.arange(keys, device=key_bias.device) + dropped - at).clamp_min(0)
        args["key_bias"] = key_bias[:, source].transpose(0, 1)
    return args


def pads_before_first_tokens(caller, padding: Padding) -> list:
    """Per row, the padding before its first token, where every row is padding and then tokens
    only (a NotImplementedError otherwise: a HeadSparseCache stores each row's tokens from its
    first on, and takes no holes). Traced by torch.compile, where of_mask read nothing, it is
    decided here (the cache's host work breaks the graph there)."""
    left_only = padding.left_only
    if left_only is None:
        left_only = bool(_left_only(padding.valid, padding.first))
    if not left_only:
        raise NotImplementedError(f"{caller}: a HeadSparseCache takes padded prompts padded on the left (each row's "
                                  "padding, then its tokens: a tokenizer's padding_side='left'); this attention mask "
                                  "masks other keys")
    return padding.first.tolist()


_CHECKED = weakref.WeakValueDictionary()  # full masks found to be causal/bidirectional + padding, by id


def refuse_other_masks(caller, mask, causal: bool, window) -> None:
    """A mask of a query row each (``[B, 1 or H, Sq, Sk]``, Sq > 1: one the caller made itself, which
    transformers passes on as it is) must be what headops computes from its last row: causal or
    not, the model's sliding window, the last row's key padding; a NotImplementedError otherwise (a
    tree, a prefix, sequences packed by a block mask). Checked once per mask tensor; not while
    torch.compile traces (a branch on data). A floating mask must say only which keys are seen (0,
    or the dtype's lowest values / -inf): other values are a bias added to the logits (BEiT's
    relative position bias, ALiBi), which headops does not compute: a NotImplementedError too."""
    if mask is None or mask.dim() != 4 or torch.compiler.is_compiling():
        return
    if _CHECKED.get(id(mask)) is mask:
        return
    hidden = None if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    if hidden is not None and bool(((mask != 0) & ~hidden).any()):
        raise NotImplementedError(f"{caller}: the attention mask adds other values than 0 and -inf to the logits (a "
                                  "bias: e.g. BEiT's relative position bias, ALiBi), which headops does not compute; "
                                  "it takes masks that say which keys each query sees")
    if mask.shape[-2] < 2:
        _CHECKED[id(mask)] = mask
        return
    seen = mask if hidden is None else ~hidden
    Sq, Sk = seen.shape[-2:]
    rows = torch.arange(Sq, device=seen.device).unsqueeze(-1) + (Sk - Sq)  # each query's position among the keys
    keys = torch.arange(Sk, device=seen.device)
    expected = seen[:, :, -1:, :].expand_as(seen).clone()
    if causal:
        expected &= keys <= rows
    if window:
        expected &= rows - keys < window
    # (a query that sees no key: the kernel gives it zeros, as the mask's rows of padding are unused)
    if not bool(((seen == expected) | ~expected.any(-1, keepdim=True)).all()):
        raise NotImplementedError(f"{caller}: the attention mask passed in is not causal (or bidirectional) attention "
                                  "with key padding, which is what headops computes (a tree, a prefix or packed "
                                  "sequences need a mask of their own)")
    _CHECKED[id(mask)] = mask
