"""Reading the ``parameters`` argument the way torch does, plus ``named_parameters()`` pairs."""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable
from itertools import compress, repeat
from operator import attrgetter, is_not
from typing import Union

import torch

from . import _native
from ._table import reader_arguments

# [p.grad for p in params] in one C loop that prefetches each parameter's metadata
_read_grads = None if _native.cpu is None else _native.cpu.read_grads

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]]]

_get_grad = attrgetter("grad")


def split_names(
    parameters: TensorOrTensors, warn_empty_generator: bool = False
) -> tuple[list[torch.Tensor], list[str] | None]:
    """(tensors, names): names when ``parameters`` yields ``(name, tensor)`` pairs, else None."""
    if isinstance(parameters, torch.Tensor):
        return [parameters], None
    is_generator = isinstance(parameters, types.GeneratorType)
    # A list is used as it is: copying 10,000 references writes to 10,000 tensor objects, which
    # after a backward pass are out of cache (~0.2 ms). Nothing downstream modifies it.
    items = parameters if type(parameters) is list else list(parameters)
    if not items:
        if is_generator and warn_empty_generator:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
        return [], None
    if isinstance(items[0], tuple):
        if not all(type(item) is tuple and len(item) == 2 for item in items):
            _raise_mixed(items, named=True)
        names = [str(name) for name, _ in items]
        return [t for _, t in items], names
    return items, None


def _raise_mixed(items: list, named: bool) -> None:
    """TypeError for a list that mixes ``(name, tensor)`` pairs with plain tensors: reading it
    either way would silently drop or misread part of it."""
    for i, item in enumerate(items):
        if (type(item) is tuple and len(item) == 2) != named:
            what = "a (name, tensor) pair" if not named else f"a {type(item).__name__}"
            first = "(name, tensor) pairs" if named else "tensors"
            raise TypeError(f"`parameters` mixes {first} with {what} (item {i}); pass "
                            "named_parameters() pairs or tensors, not both")


def grads_of(
    parameters: TensorOrTensors, warn_empty_generator: bool = False
) -> tuple[list[torch.Tensor], list[str] | None]:
    """The ``.grad`` of every parameter that has one, with their names when known."""
    params, names = split_names(parameters, warn_empty_generator)
    try:
        grads, kept = present_grads(params)
    except AttributeError:  # something without a .grad: say what, if it is a pair
        if names is None and any(type(item) is tuple for item in params):
            _raise_mixed(params, named=False)
        raise
    if kept is not None and names is not None:
        names = [names[i] for i in kept]
    return grads, names


def present_grads(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int] | None]:
    """``(grads, kept)``: the ``.grad`` of each of ``params`` that has one, and the positions
    of those parameters, or None when every one has a gradient."""
    if _read_grads is not None:
        tensor_type, _, layout = reader_arguments()
        return _read_grads(params, tensor_type, layout)
    grads = list(map(_get_grad, params))
    keep = list(map(is_not, grads, repeat(None)))
    if all(keep):
        return grads, None
    return list(compress(grads, keep)), list(compress(range(len(params)), keep))


def check_bound(value: float | torch.Tensor, what: str) -> float:
    """A clipping bound as a float: finite or +inf, and >= 0. ValueError otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(v) or v < 0:
        raise ValueError(f"{what} must be >= 0 (or inf), got {v}")
    return v
