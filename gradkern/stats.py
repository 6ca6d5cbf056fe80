"""Per-tensor gradient statistics in one fused pass, and non-finite detection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _engine, distributed
from .backends import RawStats
from ._norm_spec import parse_norm_type
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
        names, raw, numel, spec, has_fp64 = found
        return _empty(names) if raw is None else _from_raw(names, raw, numel, spec, has_fp64)
    spec = parse_norm_type(norm_type)
    grads, names = grads_of(parameters)
    if not grads and group is None:
        return _empty(names)
    # Plain tensors first: a list the fast path takes holds no DTensor, and looking for one in
    # 20,000 tensors costs a third of a GPU call's host time.
    fused = _engine.fused_stats(grads, names, spec) if group is None else None
    if fused is None and (group is not None or distributed.any_dtensor(grads)):
        return _grad_stats_across(grads, names, spec, group)
    g, raw, numel = fused or _engine.gather_stats(grads, names, spec, fused_failed=True)
    return _from_raw(names, raw, numel, spec, g.dtype == torch.float64)


def _empty(names) -> GradStats:
    empty_f = torch.zeros(0)
    empty_i = torch.zeros(0, dtype=torch.int64)
    return GradStats(names, empty_f, empty_f, empty_i, empty_i, empty_i, torch.tensor(0.0))


def _from_raw(names, raw: RawStats, numel: torch.Tensor, spec, has_fp64: bool) -> GradStats:
    """GradStats from per-tensor statistics: norms in fp32, fp64 when a gradient is fp64."""
    out_dtype = torch.float64 if has_fp64 else torch.float32
    return GradStats(
        names=names,
        norm=_engine.per_tensor_norms(raw, numel, spec).to(out_dtype),
        max_abs=raw.max_abs.to(out_dtype),
        nonfinite=raw.nonfinite,
        zeros=raw.zeros,
        numel=numel,
        total_norm=_engine.total_norm(raw, numel, spec).to(out_dtype),
    )


def _grad_stats_across(grads, names, spec, group) -> GradStats:
    """grad_stats of shards: with ``group``, entry i of every rank is a part of the same
    gradient i; a DTensor gradient is reduced over the mesh dimensions that shard it."""
    work = distributed.reduction_sets(grads, group)
    n = len(grads)
    pieces = []
    for idx, groups in work:
        items = [distributed.dtensor_local(grads[i]) if distributed.is_dtensor(grads[i])
                 else grads[i] for i in idx]
        g, raw, numel, error = distributed.local_stats(items, None, spec)
        if g is not None:
            device = g.device
        elif group is not None:
            device = distributed.collective_device(group)
        else:
            device = items[0].device if items else torch.device("cpu")
        raw, numel = distributed.reduce_per_tensor(raw, numel, len(idx), spec, groups, device,
                                                   error)
        pieces.append((idx, raw, numel, None if g is None else g.dtype))
    device = pieces[0][1].power_sum.device
    f64, i64 = torch.float64, torch.int64
    full = {k: torch.zeros(n, dtype=f64 if k in ("power_sum", "max_abs") else i64, device=device)
            for k in ("power_sum", "max_abs", "nonfinite", "zeros")}
    full_numel = torch.zeros(n, dtype=i64, device=device)
    for idx, raw, numel, _ in pieces:
        index = torch.tensor(idx, dtype=torch.long, device=device)
        for k in full:
            full[k][index] = getattr(raw, k).to(device)
        full_numel[index] = numel.to(device)
    has_fp64 = any(d == torch.float64 for *_, d in pieces)
    return _from_raw(names, RawStats(**full), full_numel, spec, has_fp64)


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
    g, raw, _ = _engine.gather_stats(distributed.local_parts(grads), names,
                                     parse_norm_type(float("inf")))
    return _engine.nonfinite_names(g, raw.nonfinite)
