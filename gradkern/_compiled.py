"""The public functions as ``torch.compile`` traces them: torch ops around the custom ops of
:mod:`gradkern._ops`, and nothing that reads a value back to the host.

The public functions call these while compiling (``torch.compiler.is_compiling()``) and take
their direct path otherwise. Each result equals the eager one: the same kernels, the same norm
arithmetic (:mod:`gradkern._engine`), the same result dtype. What needs the host
(``error_if_nonfinite``, ``find_nonfinite``) or torch.distributed (``group=``, DTensor
gradients) runs outside the graph: under ``fullgraph=True`` Dynamo raises with a message that
says why; otherwise the graph breaks there and that call runs eagerly.
"""

from __future__ import annotations

import torch

from . import _engine, _norms, _ops, distributed
from ._norms import NormSpec, parse_norm_type, result_dtype
from .backends import RawStats


def eager_only(reason: str):
    """A function Dynamo does not trace, with ``reason`` in the error ``fullgraph=True`` gives
    (older torch has no ``reason``: the function's name then says it)."""
    def wrap(fn):
        try:
            return torch._dynamo.disable(fn, reason=reason)
        except TypeError:
            return torch._dynamo.disable(fn)
    return wrap


@eager_only("gradkern: error_if_nonfinite=True reads the norm on the host, which a "
             "torch.compile graph cannot do; check torch.isfinite(norm) after the compiled "
             "region instead, or leave error_if_nonfinite=False inside it")
def _raise_if_nonfinite(total: torch.Tensor, spec: NormSpec, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(total.to(dtype))):
        raise _norms.nonfinite_norm_error(spec)


@eager_only("gradkern: group= and DTensor gradients (FSDP2, tensor parallel) take "
             "torch.distributed collectives, which gradkern does not trace into a torch.compile "
             "graph; call it outside the compiled region")
def with_collectives(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` outside the graph, on its direct path (not compiling there)."""
    return fn(*args, **kwargs)


def _needs_collectives(tensors: list[torch.Tensor], group) -> bool:
    return group is not None or any(map(distributed.is_dtensor, tensors))


def _items(parameters) -> list:
    """``parameters`` as a list (a generator is read once here, and the list passed on)."""
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def grads_of(items: list) -> tuple[list[torch.Tensor], list[str] | None]:
    """What :func:`gradkern._params.grads_of` returns, in code Dynamo traces."""
    if items and isinstance(items[0], tuple):
        names = [str(name) for name, _ in items]
        params = [p for _, p in items]
    else:
        params, names = items, None
    keep = [i for i, p in enumerate(params) if p.grad is not None]
    return [params[i].grad for i in keep], None if names is None else [names[i] for i in keep]


def tensors_of(items: list) -> list[torch.Tensor]:
    return [t for _, t in items] if items and isinstance(items[0], tuple) else items


def stats(tensors: list[torch.Tensor], spec: NormSpec) -> tuple[RawStats, torch.Tensor]:
    """One read pass (the custom op) and the element counts (constants of the graph)."""
    if spec.p < 0 and not any(t.numel() for t in tensors):
        raise _norms.undefined_norm_error(spec)
    raw = RawStats(*_ops.tensor_stats(tensors, spec.p))
    numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64,
                         device=raw.zeros.device)
    return raw, numel


def _total(tensors: list[torch.Tensor], norm_type, error_if_nonfinite: bool):
    """``(raw, numel, spec, total)``: the statistics and the float64 total norm of ``tensors``,
    with ``error_if_nonfinite``'s check outside the graph."""
    spec = parse_norm_type(norm_type)
    raw, numel = stats(tensors, spec)
    total = _norms.total_norm(raw, numel, spec)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, spec, _dtype(tensors))
    return raw, numel, spec, total


def _dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return result_dtype({t.dtype for t in tensors})


def get_total_norm(eager, tensors, norm_type, error_if_nonfinite, group) -> torch.Tensor:
    """:func:`gradkern.get_total_norm` (``eager``) in a graph."""
    items = _items(tensors)
    tensors = tensors_of(items)
    if _needs_collectives(tensors, group):
        return with_collectives(eager, items, norm_type, error_if_nonfinite, group=group)
    if not tensors:
        return torch.tensor(0.0)
    total = _total(tensors, norm_type, error_if_nonfinite)[3]
    return total.to(_dtype(tensors))


def clip_(eager, parameters, max_norm, value, norm_type, per_tensor, error_if_nonfinite,
          group) -> torch.Tensor:
    """:func:`gradkern.clip_` (``eager``) in a graph, ``max_norm`` and ``value`` checked (either
    may be None): :func:`gradkern.clip_grad_norm_` is ``clip_`` without a value."""
    items = _items(parameters)
    grads, _ = grads_of(items)
    if _needs_collectives(grads, group):
        return with_collectives(eager, items, max_norm, value=value, norm_type=norm_type,
                                per_tensor=per_tensor, error_if_nonfinite=error_if_nonfinite,
                                group=group)
    if not grads:
        return torch.tensor(0.0)
    raw, numel, spec, total = _total(grads, norm_type, error_if_nonfinite)
    coef = None
    if max_norm is not None:
        norm = _norms.per_tensor_norms(raw, numel, spec) if per_tensor else total.reshape(1)
        coef = _norms.clip_coefficient(max_norm, norm)
    if coef is not None or value is not None:
        _ops.clip_in_place(grads, coef, float("inf") if value is None else value)
    return total.to(_dtype(grads))


def clip_grad_value_(eager, parameters, clip_value: float) -> None:
    items = _items(parameters)
    grads, _ = grads_of(items)
    if _needs_collectives(grads, None):
        return with_collectives(eager, items, clip_value)
    if grads:
        _ops.clip_in_place(grads, None, clip_value)


def clip_grads_with_norm_(eager, parameters, max_norm: float, total_norm) -> None:
    items = _items(parameters)
    grads, _ = grads_of(items)
    if _needs_collectives(grads, None) or distributed.is_dtensor(total_norm):
        return with_collectives(eager, items, max_norm, total_norm)
    if not grads:
        return
    total = torch.as_tensor(total_norm, device=grads[0].device)
    _ops.clip_in_place(grads, _norms.clip_coefficient(max_norm, total).reshape(1),
                       float("inf"))


def grad_stats(eager, parameters, norm_type, group):
    """:func:`gradkern.grad_stats` (``eager``) in a graph: ``(names, raw, numel, spec,
    dtype)`` for :func:`gradkern.stats._from_raw`, or what ``eager`` returned."""
    items = _items(parameters)
    grads, names = grads_of(items)
    if _needs_collectives(grads, group):
        return with_collectives(eager, items, norm_type, group=group)
    spec = parse_norm_type(norm_type)
    if not grads:
        return names, None, None, spec, None
    raw, numel = stats(grads, spec)
    return names, raw, numel, spec, _dtype(grads)


@eager_only("gradkern.find_nonfinite returns parameter names, read back from the device, which "
            "a torch.compile graph cannot; call it outside the compiled region, or use "
            "grad_stats(...).nonfinite inside it")
def find_nonfinite_eagerly(parameters) -> list[str]:
    from .stats import find_nonfinite

    return find_nonfinite(parameters)
