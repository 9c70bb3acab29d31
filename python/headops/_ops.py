"""The headops op schemas, read by argument name.

The schemas have one table, their registration in csrc/bindings.cpp (torch.library checks the
C++ kernels' signatures against it when the extension loads). The fake kernels and the autograd
glue bind their arguments through the registered schema by name, so no argument position is
copied by hand anywhere in Python.
"""

from __future__ import annotations

import functools
import types

import torch


@functools.cache
def schema(op: str) -> torch._C.FunctionSchema:
    return getattr(torch.ops.headops, op).default._schema


@functools.cache
def argument_names(op: str) -> tuple[str, ...]:
    return tuple(a.name for a in schema(op).arguments)


def bind(op: str, args, kwargs=None) -> types.SimpleNamespace:
    """A call's arguments by schema name, defaults filled in where the call left them out."""
    kwargs = kwargs or {}
    params = schema(op).arguments
    if len(args) > len(params):
        raise TypeError(f"headops.{op}: takes {len(params)} arguments, got {len(args)}")
    unknown = set(kwargs) - {a.name for a in params}
    if unknown:
        raise TypeError(f"headops.{op}: unexpected argument(s) {', '.join(sorted(unknown))}")
    values = {}
    for i, param in enumerate(params):
        if i < len(args):
            values[param.name] = args[i]
        elif param.name in kwargs:
            values[param.name] = kwargs[param.name]
        elif param.has_default_value():
            values[param.name] = param.default_value
        else:
            raise TypeError(f"headops.{op}: missing argument {param.name}")
    return types.SimpleNamespace(**values)


def tensors(bound: types.SimpleNamespace):
    """(name, tensor) for every tensor of a bound call, the members of tensor lists included."""
    for name, value in vars(bound).items():
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{name}[{i}]", t) for i, t in enumerate(value) if isinstance(t, torch.Tensor))
