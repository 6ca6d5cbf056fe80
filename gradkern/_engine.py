"""The machinery under a gradient set: validate tensors and turn them into tables by device,
run the backend of each device, put the results in list order.

:func:`tabulate` does all checking before any kernel runs, so that an error leaves every tensor
as it was. Per-tensor statistics come back from the backend in float64 on the result device (no
host sync); :mod:`gradkern._norms` turns them into norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import torch

from ._norms import NormKind, NormSpec, result_dtype, result_dtype_of_mask
from . import _norms
from ._table import (WorkSet, check_tensors, make_unit_work_set, make_work_set,
                     read_dense_table, repeated_entries, units_of)
from .backends import Backend, RawStats, backend_for
from .backends._device_table import to_device_async

_get_device = attrgetter("device")
_get_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")


@dataclass
class DeviceWork:
    """The tensors of one device, with the backend that serves them."""

    backend: Backend
    work: WorkSet
    index: torch.Tensor | None  # positions in the full list; None when this is the whole list


@dataclass
class Tables:
    """A list of tensors as the kernels see it: one work set per device, validated."""

    tensors: list[torch.Tensor]
    names: Sequence[str] | None
    devices: list[DeviceWork]
    device: torch.device  # where results live: the first tensor's device, as in torch
    dtype: torch.dtype  # torch's result dtype for a norm over these tensors


def tabulate(tensors: list[torch.Tensor], names: Sequence[str] | None = None, *,
             fast_path: bool = True) -> Tables:
    """Validate ``tensors`` (non-empty) and split them by device. Raises before touching anything.

    ``fast_path=False`` skips the one-C-loop reader (for tensors it has already declined).
    """
    first = tensors[0].device
    dense = read_dense_table(tensors, first) if fast_path else None
    if dense is not None:  # the common case, read in one C loop
        return _whole(tensors, names, backend_for(first), dense)
    check_tensors(tensors, names)
    if first.type == "cpu" and all(map(_is_cpu, tensors)):
        devices = [DeviceWork(backend_for(first), make_work_set(tensors, names), None)]
    else:
        by_device: dict[torch.device, list[int]] = {}
        for i, d in enumerate(map(_get_device, tensors)):
            by_device.setdefault(d, []).append(i)
        devices = []
        for device, idx in by_device.items():
            sub_names = None if names is None else [names[i] for i in idx]
            ws = make_work_set([tensors[i] for i in idx], sub_names)
            index = None if len(by_device) == 1 else torch.tensor(idx, device=first)
            devices.append(DeviceWork(backend_for(device), ws, index))
    dtype = result_dtype(set(map(_get_dtype, tensors)))
    return Tables(tensors, names, devices, first, dtype)


def fused_stats(tensors: list[torch.Tensor], names: Sequence[str] | None, spec: NormSpec, *,
                counts: bool = True) -> tuple[Tables, RawStats, torch.Tensor | None] | None:
    """The fast path of :func:`tabulate_stats`, for lists of plain dense tensors on one device:
    the table read in one C loop, then the backend's pass; for the C++ CPU backend both in one
    call (its pass overlaps the reading). None when a tensor needs the general path, so never
    for a DTensor: a caller that gets a result need not look for one."""
    first = tensors[0].device
    backend = backend_for(first)
    read_tensor_stats = getattr(backend, "read_tensor_stats", None)
    if read_tensor_stats is None:
        dense = read_dense_table(tensors, first)
        if dense is None:
            return None
        g = _whole(tensors, names, backend, dense)
        return (g, *read_stats(g, spec, counts=counts))
    hit = read_tensor_stats(tensors, spec)
    if hit is None:
        return None
    ws, raw = hit
    return (_whole(tensors, names, backend, ws), raw,
            torch.from_numpy(ws.numel) if counts else None)


def _whole(tensors: list[torch.Tensor], names: Sequence[str] | None, backend: Backend,
           ws: WorkSet) -> Tables:
    """Every tensor in one device_work, as a C table reader read them (its dtype mask gives torch's
    result dtype)."""
    return Tables(tensors, names, [DeviceWork(backend, ws, None)], tensors[0].device,
                  result_dtype_of_mask(ws.dtype_mask))


def tabulate_stats(tensors: list[torch.Tensor], names: Sequence[str] | None, spec: NormSpec, *,
                   fast_path: bool = True,
                   counts: bool = True) -> tuple[Tables, RawStats, torch.Tensor | None]:
    """``(tables, raw, numel)``: :func:`tabulate` then :func:`read_stats`, through
    :func:`fused_stats` where it applies. Raises (touching nothing) as :func:`tabulate` does.
    ``fast_path=False``: skip :func:`fused_stats` (it has already declined these tensors).
    ``counts=False``: numel is None (a caller that never uses the element counts spares their
    device copy, a kernel launch on a GPU)."""
    if fast_path:
        fused = fused_stats(tensors, names, spec, counts=counts)
        if fused is not None:
            return fused
    # fused_stats has read the table in one C loop and met a tensor that needs the general path
    g = tabulate(tensors, names, fast_path=False)
    return (g, *read_stats(g, spec, counts=counts))


def read_stats(g: Tables, spec: NormSpec, *,
               counts: bool = True) -> tuple[RawStats, torch.Tensor | None]:
    """Per-tensor statistics over the whole list on ``g.device``, and the element counts (None
    unless ``counts``)."""
    parts = []
    for device_work in g.devices:
        raw = device_work.backend.tensor_stats(device_work.work, spec)
        numel = _element_counts(device_work) if counts else None
        if device_work.work.implicit_zeros is not None:
            device = raw.zeros.device
            raw.zeros = raw.zeros + _from_host(device_work.work.implicit_zeros, device)
            if spec.kind == NormKind.MIN_ABS:  # an implicit zero is the smallest |g| there is
                has_implicit = _from_host(device_work.work.implicit_zeros > 0, device)
                raw.power_sum = torch.where(has_implicit & ~raw.power_sum.isnan(), 0.0,
                                            raw.power_sum)
        parts.append((device_work, raw, numel))
    if len(parts) == 1:
        _, raw, numel = parts[0]
        return _to(raw, g.device), None if numel is None else numel.to(g.device)
    n = len(g.tensors)
    full = RawStats(*(torch.empty(n, dtype=d, device=g.device) for d in
                      (torch.float64, torch.float64, torch.int64, torch.int64)))
    full_numel = torch.empty(n, dtype=torch.int64, device=g.device) if counts else None
    for device_work, raw, numel in parts:
        raw = _to(raw, g.device)
        for name in ("power_sum", "max_abs", "nonfinite", "zeros"):
            getattr(full, name)[device_work.index] = getattr(raw, name)
        if counts:
            full_numel[device_work.index] = numel.to(g.device)
    return full, full_numel


def _element_counts(device_work: DeviceWork) -> torch.Tensor:
    """The device_work's element counts, int64, where its statistics are. A CUDA backend serves them
    from its device table (see ``DeviceTableCache.element_counts``); elsewhere they are the host
    array itself."""
    counts = getattr(device_work.backend, "element_counts", None)
    return torch.from_numpy(device_work.work.numel) if counts is None else counts(device_work.work)


def _from_host(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``, without a host stall for a GPU."""
    return torch.from_numpy(a) if device.type == "cpu" else to_device_async(a, device)


def _to(raw: RawStats, device: torch.device) -> RawStats:
    if raw.power_sum.device == device:
        return raw
    return RawStats(raw.power_sum.to(device), raw.max_abs.to(device), raw.nonfinite.to(device),
                    raw.zeros.to(device))


def check_writable(g: Tables) -> None:
    """RuntimeError, before anything is written, when a tensor of ``g`` cannot be written in
    place (an expanded tensor, whose elements share memory)."""
    for device_work in g.devices:
        if device_work.work.unwritable is not None:
            raise RuntimeError(
                f"gradient {device_work.work.unwritable} cannot be clipped in place: several of "
                "its elements share one memory location (an expanded tensor). Nothing was "
                "modified. Give it memory of its own first, e.g. `p.grad = p.grad.clone()`.")


def clip_in_place(g: Tables, coef: torch.Tensor | None, clip_value: float) -> None:
    """Scale (where ``coef`` < 1, per tensor or one for all) then clamp, in one pass per tensor.
    Raises (see :func:`check_writable`, :func:`repeated_entries`) before writing anything,
    whether or not a value would change: a training loop fails at its first clip, not at the
    first that scales.

    A tensor listed more than once is written once, as torch's sequence of in-place ops would
    leave it: one coefficient for all (global clipping) is applied once per appearance, a
    per-tensor coefficient once (a tensor clipped to a norm is within it), and clamping is the
    same however often it runs.
    """
    check_writable(g)
    if clip_value == float("inf") and (coef is None or (
            coef.device.type == "cpu" and bool((coef >= 1.0).all()))):
        # Nothing to do, and on the CPU that is known for free (on a GPU the kernel reads the
        # coefficient itself rather than make the host wait for it). A NaN coefficient scales.
        return
    plans = []
    for device_work in g.devices:  # every check before the first write
        work, device_coef = device_work.work, coef
        if coef is not None:
            if device_work.index is not None and coef.numel() > 1:
                device_coef = coef[device_work.index]
            device_coef = device_coef.to(work.work[0].device if work.work else coef.device,
                                       torch.float64)
        repeated = repeated_entries(work)
        if repeated is not None:
            keep, repeats = repeated
            work = work.subset(keep)
            if device_coef is not None and device_coef.numel() == 1:
                device_coef = device_coef.pow(torch.from_numpy(repeats).to(device_coef))
            elif device_coef is not None:
                device_coef = device_coef[torch.from_numpy(keep).to(device_coef.device)]
        plans.append((device_work, work, device_coef))
    for device_work, work, device_coef in plans:
        device_work.backend.clip_in_place(work, device_coef, clip_value)
        device_work.work.copy_back()


def unit_norms(tensors: list[torch.Tensor], spec: NormSpec) -> torch.Tensor:
    """float64 norm of every unit (row; a vector is one unit) of every tensor, concatenated in
    order, on the tensors' device: one read pass of the backend's kernels over a table with an
    entry per unit, or the reference's torch ops where the backend reads tensors, not tables."""
    table = make_unit_work_set(tensors)
    backend = None if table is None else backend_for(table.device)
    if backend is not None and backend.reads_tables:
        raw = backend.tensor_stats(table, spec)
        numel = torch.from_numpy(table.numel).to(raw.zeros.device)
        return _norms.per_tensor_norms(raw, numel, spec)
    return torch.cat([torch.linalg.vector_norm(t.double().reshape(units_of(t), -1), spec.p, dim=1)
                      for t in tensors])


def scale_units_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply each unit (as :func:`unit_norms` orders them) by its entry of ``coef`` where
    that is below 1, in place."""
    table = make_unit_work_set(tensors)
    backend = None if table is None else backend_for(table.device)
    if backend is not None and backend.reads_tables:
        backend.clip_in_place(table, coef.to(table.device, torch.float64), float("inf"))
        return
    start = 0
    for t in tensors:
        n = units_of(t)
        c = coef[start:start + n].to(t.device, t.dtype)
        t.mul_(c.reshape(()) if t.dim() <= 1 else c.reshape((n,) + (1,) * (t.dim() - 1)))
        start += n

