"""Per-tensor gradient statistics in one fused pass, and non-finite detection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _norms
from ._grad_set import GradSet
from .backends import RawStats
from ._norms import parse_norm_type
from ._params import TensorOrTensors, grads_of

__all__ = ["GradStats", "grad_stats", "find_nonfinite"]


@dataclass
class GradStats:
    """Statistics of a set of gradients; every field is a tensor on the gradients' device.

    Attributes:
        names: parameter names when ``named_parameters()`` was passed, else None.
        norm: p-norm of each gradient (float32; float64 if any gradient is float64).
        max_abs: max |g| of each gradient (NaN if it holds a NaN; 0 if empty).
        nonfinite: count of NaN and inf values in each gradient (int64).
        zeros: count of exact zeros in each gradient (int64).
        numel: element count of each gradient (int64).
        total_norm: p-norm of all gradients viewed as one vector, 0-dim.
    """

    names: list[str] | None
    norm: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor
    zeros: torch.Tensor
    numel: torch.Tensor
    total_norm: torch.Tensor


@torch.no_grad()
def grad_stats(parameters: TensorOrTensors, norm_type: float = 2.0, *, group=None) -> GradStats:
    """Norm, max |g|, non-finite count and zero count of every gradient, in one read pass.

    Nothing is copied to the host: the fields stay on the gradients' device, so calling this
    every step does not stall a GPU. Parameters whose ``.grad`` is None are left out.

    Args:
        parameters: a tensor, an iterable of tensors, or ``named_parameters()`` pairs.
        norm_type: p of the per-tensor and total norms. Default: 2.0.
        group: a ``torch.distributed`` process group whose ranks each hold a shard of every
            gradient (FSDP-style: entry i on every rank is part of the same gradient i, so every
            rank must have the same number of gradients). The fields are then the whole
            gradients' statistics, from two packed collectives. Default: None.

    Example:
        >>> import torch, gradkern as gk
        >>> model = torch.nn.Linear(3, 1)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> s = gk.grad_stats(model.named_parameters())
        >>> s.names, s.numel.tolist(), s.nonfinite.tolist()
        (['weight', 'bias'], [3, 1], [0, 0])
    """
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        found = _compiled.grad_stats(grad_stats, parameters, norm_type, group)
        if isinstance(found, GradStats):  # (computed outside the graph)
            return found
        names, raw, numel, spec, dtype = found
        return _empty(names) if raw is None else _from_raw(names, raw, numel, spec, dtype)
    spec = parse_norm_type(norm_type)
    grads, names = grads_of(parameters)
    if not grads and group is None:
        return _empty(names)
    gradients = GradSet.of(grads, names, group=group)
    raw, numel = gradients.whole_tensor_stats(spec)
    return _from_raw(names, raw, numel, spec, gradients.dtype)


def _empty(names) -> GradStats:
    empty_f = torch.zeros(0)
    empty_i = torch.zeros(0, dtype=torch.int64)
    return GradStats(names, empty_f, empty_f, empty_i, empty_i, empty_i, torch.tensor(0.0))


def _from_raw(names, raw: RawStats, numel: torch.Tensor, spec,
              dtype: torch.dtype | None) -> GradStats:
    """GradStats from per-tensor statistics of gradients whose promoted dtype is ``dtype``."""
    out_dtype = _norms.stats_dtype(dtype)
    return GradStats(
        names=names,
        norm=_norms.per_tensor_norms(raw, numel, spec).to(out_dtype),
        max_abs=raw.max_abs.to(out_dtype),
        nonfinite=raw.nonfinite,
        zeros=raw.zeros,
        numel=numel,
        total_norm=_norms.total_norm(raw, numel, spec).to(out_dtype),
    )


@torch.no_grad()
def find_nonfinite(parameters: TensorOrTensors) -> list[str]:
    """Names of the parameters whose gradients hold NaN or inf, in the order given.

    Pass ``named_parameters()`` to get names; plain tensors are reported as ``#index`` (the
    position among the parameters that have a gradient). This reads the answer back to the
    host, so it synchronises with the GPU, and it cannot run inside a ``torch.compile`` graph:
    there it breaks the graph and runs eagerly (under ``fullgraph=True``, Dynamo raises and
    says why). For DTensor gradients (FSDP2, tensor parallel) it looks at this rank's part of
    each.

    Example:
        >>> import torch, gradkern as gk
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([1.0, float("nan")])
        >>> gk.find_nonfinite([("layer.weight", p)])
        ['layer.weight']
    """
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        return _compiled.find_nonfinite_eagerly(parameters)
    grads, names = grads_of(parameters)
    if not grads:
        return []
    return GradSet.of(grads, names).nonfinite_names()
