"""Statistics of one gradient set split across ranks (``group=`` on the ops, clippers, Monitor).

Each rank computes its local per-tensor statistics with the kernels; then one packed
``all_reduce(SUM)`` carries every sum and count (p-th power sums, NaN/inf counts, zeros, element
counts, error flags) and one ``all_reduce(MAX)`` every maximum (max |g|, and min |g| as a max
of negatives). Two collectives per call whatever the number of tensors, no host sync (the
buffers stay on the gradients' device), and NaN is carried as a count rather than trusted to
the collective's max.

Two shapes of reduction:

* totals (norms, global clipping): a fixed-size message, so every rank may hold a different
  number of tensors (pipeline stages, uneven shards, a rank with no gradients at all);
* per tensor (``grad_stats``, per-tensor clipping): entry i of every rank is a shard of the same
  logical tensor i (FSDP-style), so every rank must pass the same number of tensors.

An exception on one rank (bad argument, unsupported dtype) does not leave the others waiting:
the failing rank still joins the collectives with an error flag, then re-raises; the others
raise a RuntimeError that says which rank failed.

Example (two processes with a gloo group, each holding half of the gradients)::

    total = gk.get_total_norm(my_shards, group=dist.group.WORLD)   # the whole set's norm
"""
# A NaN in Totals.nan_tensors (another rank failed, on a GPU without a sync) makes every norm
# NaN: Totals.norm tests nan_tensors > 0, which is False for NaN, so it is tested separately.

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._norms import NormKind, NormSpec, root
from .backends import RawStats

__all__ = ["Totals", "reduce_totals", "reduce_per_tensor", "local_stats", "collective_device",
           "RemoteError"]

class RemoteError(RuntimeError):
    """Another rank of the group raised; this rank raises too instead of waiting forever."""


def local_stats(tensors: list[torch.Tensor], names, spec: NormSpec):
    """This rank's part of a collective call: ``(tables, raw, numel, error)``.

    Tables/raw/numel are None when the rank holds no tensors or the local work raised; the
    exception is kept, not raised, so that the rank still joins the collectives (see finish()).
    """
    if not tensors:
        return None, None, None, None
    try:
        from . import _engine

        return (*_engine.tabulate_stats(tensors, names, spec), None)
    except Exception as exc:  # re-raised by finish() once every rank has joined
        return None, None, None, exc


def collective_device(group, hint: torch.device | None = None) -> torch.device:
    """Where the packed buffers live: the gradients' device, else what the backend needs."""
    if hint is not None:
        return hint
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(sums: torch.Tensor, maxes: torch.Tensor, group) -> None:
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)


def finish(error: BaseException | None, errors_seen: torch.Tensor, may_sync: bool) -> None:
    """After the collectives: the failing rank re-raises its own error; the others raise
    RemoteError. Knowing that another rank failed means reading a number from the device, which
    is free on the CPU; on a GPU it is done only where the call syncs anyway (``may_sync``,
    e.g. ``error_if_nonfinite=True``); otherwise the results are poisoned with NaN instead."""
    if error is not None:
        raise error
    if errors_seen.device.type == "cpu" or may_sync:
        failed = int(errors_seen.item())
        if failed:
            raise RemoteError(f"gradkern: {failed} other rank(s) of the process group raised in "
                              "this call; see their error messages")


def _poison(value: torch.Tensor, errors_seen: torch.Tensor) -> torch.Tensor:
    return torch.where(errors_seen > 0, torch.full_like(value, float("nan")), value)


@dataclass
class Totals:
    """Whole-set statistics after the reduction, 0-dim float64 tensors on one device."""

    power: torch.Tensor  # sum of the kind's power terms over finite-or-inf tensors
    max_abs: torch.Tensor
    min_abs: torch.Tensor
    nonfinite: torch.Tensor
    zeros: torch.Tensor
    numel: torch.Tensor
    nan_tensors: torch.Tensor  # tensors (over all ranks) that hold a NaN

    def norm(self, spec: NormSpec) -> torch.Tensor:
        """The p-norm of the whole set (NaN when any tensor holds a NaN)."""
        if spec.kind == NormKind.MIN_ABS:
            value = self.min_abs
        elif spec.kind != NormKind.NONE:
            value = root(self.power, spec)
        elif spec.p == 0.0:
            value = self.numel - self.zeros
        else:
            value = self.max_abs
        bad = (self.nan_tensors > 0) | self.nan_tensors.isnan()
        return torch.where(bad, torch.full_like(value, float("nan")), value)


_SUM_FIELDS = 6  # power, nonfinite, zeros, numel, nan tensors, errors
_MAX_FIELDS = 2  # max |g|, -min |g|


def _local_totals(raw: RawStats | None, numel: torch.Tensor | None, spec: NormSpec,
                  device: torch.device, failed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    f64 = torch.float64
    sums = torch.zeros(_SUM_FIELDS, dtype=f64, device=device)
    maxes = torch.tensor([0.0, float("-inf")], dtype=f64, device=device)
    sums[5] = float(failed)
    if raw is None or raw.power_sum.numel() == 0:
        return sums, maxes
    power = raw.power_sum.to(device)
    nan = power.isnan()
    finite_power = torch.where(nan, torch.zeros_like(power), power)
    if spec.kind != NormKind.MIN_ABS:
        sums[0] = finite_power.sum()
    sums[1] = raw.nonfinite.to(device, f64).sum()
    sums[2] = raw.zeros.to(device, f64).sum()
    sums[3] = numel.to(device, f64).sum()
    sums[4] = nan.to(f64).sum()
    max_abs = raw.max_abs.to(device)
    maxes[0] = torch.where(max_abs.isnan(), torch.zeros_like(max_abs), max_abs).max()
    if spec.kind == NormKind.MIN_ABS:
        maxes[1] = -torch.where(nan, torch.full_like(power, float("inf")), power).min()
    return sums, maxes


def reduce_totals(raw: RawStats | None, numel: torch.Tensor | None, spec: NormSpec, group,
                  device: torch.device, error: BaseException | None,
                  may_sync: bool = False) -> Totals:
    """Whole-set totals from each rank's per-tensor statistics: two collectives per group
    (``group`` may be a list of groups, reduced one after the other, e.g. the sharded
    dimensions of a device mesh; an empty list reduces nothing)."""
    sums, maxes = _local_totals(raw, numel, spec, device, error is not None)
    for g in group if isinstance(group, list) else [group]:
        _reduce(sums, maxes, g)
    finish(error, sums[5], may_sync)
    return _totals(sums, maxes, nan_tensors=_poison(sums[4], sums[5]))


def totals_of(raw: RawStats, numel: torch.Tensor, spec: NormSpec, device: torch.device) -> Totals:
    """The totals of per-tensor statistics that are already whole (reduced entry by entry),
    with no collective."""
    sums, maxes = _local_totals(raw, numel, spec, device, failed=False)
    return _totals(sums, maxes, nan_tensors=sums[4])


def _totals(sums: torch.Tensor, maxes: torch.Tensor, nan_tensors: torch.Tensor) -> Totals:
    return Totals(power=sums[0], max_abs=maxes[0], min_abs=-maxes[1], nonfinite=sums[1],
                  zeros=sums[2], numel=sums[3], nan_tensors=nan_tensors)


def reduce_per_tensor(raw: RawStats | None, numel: torch.Tensor | None, n: int,
                      spec: NormSpec, group, device: torch.device,
                      error: BaseException | None,
                      may_sync: bool = False) -> tuple[RawStats, torch.Tensor]:
    """Entry-wise reduction of the per-tensor statistics of ``n`` tensors (two collectives):
    entry i of every rank is a shard of the same tensor i."""
    f64 = torch.float64
    sums = torch.zeros(5 * n + 1, dtype=f64, device=device)
    maxes = torch.zeros(2 * n, dtype=f64, device=device)
    maxes[n:] = float("-inf")
    sums[-1] = float(error is not None)
    if raw is not None and n:
        power = raw.power_sum.to(device)
        nan = power.isnan()
        sums[0:n] = torch.where(nan, torch.zeros_like(power), power)
        sums[n:2 * n] = raw.nonfinite.to(device, f64)
        sums[2 * n:3 * n] = raw.zeros.to(device, f64)
        sums[3 * n:4 * n] = numel.to(device, f64)
        sums[4 * n:5 * n] = nan.to(f64)
        max_abs = raw.max_abs.to(device)
        maxes[:n] = torch.where(max_abs.isnan(), torch.zeros_like(max_abs), max_abs)
        if spec.kind == NormKind.MIN_ABS:
            maxes[n:] = -torch.where(nan, torch.full_like(power, float("inf")), power)
    for g in group if isinstance(group, list) else [group]:
        _reduce(sums, maxes, g)
    finish(error, sums[-1], may_sync)
    nan_any = (sums[4 * n:5 * n] > 0) | (sums[-1] > 0)
    nan = torch.full((n,), float("nan"), dtype=f64, device=device)
    power = -maxes[n:] if spec.kind == NormKind.MIN_ABS else sums[:n]
    reduced = RawStats(power_sum=torch.where(nan_any, nan, power),
                       max_abs=torch.where(nan_any, nan, maxes[:n]),
                       nonfinite=sums[n:2 * n].to(torch.int64),
                       zeros=sums[2 * n:3 * n].to(torch.int64))
    return reduced, sums[3 * n:4 * n].to(torch.int64)


# ---- DTensor gradients (FSDP2 fully_shard, tensor parallel) -----------------------------------

def _dtensor_class():
    """torch's DTensor class once its module is loaded, else None. Until something imports
    ``torch.distributed.tensor`` no DTensor can exist, so gradkern does not import it (that
    costs ~0.7 s, most of ``import gradkern``): it looks the module up instead."""
    global _DTENSOR
    if _DTENSOR is None:
        api = sys.modules.get("torch.distributed.tensor._api")
        _DTENSOR = None if api is None else getattr(api, "DTensor", None)
    return _DTENSOR


_DTENSOR = None


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: list) -> bool:
    """Whether any of ``tensors`` is a DTensor: one check per distinct type, not per tensor
    (10,000 isinstance calls cost more than the C loop that reads the table)."""
    cls = _dtensor_class()
    return cls is not None and any(issubclass(t, cls) for t in set(map(type, tensors)))


def local_to_read_one(t) -> torch.Tensor:
    """The local shard of a DTensor gradient, its partial sums reduced first (once)."""
    if is_partial(t):
        from torch.distributed.tensor import Replicate

        placements = [Replicate() if p.is_partial() else p for p in t.placements]
        t = t.redistribute(t.device_mesh, placements)
    return t.to_local()


def local_to_read(tensors: list) -> list:
    """For reading: :func:`local_to_read_one` of each DTensor in ``tensors``, other tensors as they
    are; the list itself when none is a DTensor (one check per distinct type). A Partial
    DTensor's part is a new tensor (its terms summed), so writes to it are lost."""
    return [local_to_read_one(t) if is_dtensor(t) else t for t in tensors] \
        if any_dtensor(tensors) else tensors


def replicated_like(value: torch.Tensor, tensors: list):
    """``value`` (the same on every rank) as a DTensor replicated over the mesh of the first
    DTensor in ``tensors``: what torch's norm functions return for DTensor gradients, so that
    code written for them (``total.full_tensor()``) runs unchanged."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = next(t for t in tensors if is_dtensor(t)).device_mesh
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


def is_partial(t) -> bool:
    """Whether ``t`` is a DTensor with a Partial placement (one term of a sum on each rank)."""
    return is_dtensor(t) and any(p.is_partial() for p in t.placements)


def has_partial(tensors: list) -> bool:
    """Whether some tensor is a Partial DTensor (one check per distinct type when none is a
    DTensor)."""
    return any(map(is_partial, tensors)) if any_dtensor(tensors) else False


def local_to_write(tensors: list) -> list:
    """For writing in place: each DTensor's own local tensor, other tensors as they are; the
    list itself when none is a DTensor. A Partial DTensor's local tensor is one term of its
    sum: scaling every term by one coefficient scales the sum, anything else needs
    :func:`refuse_partial` first."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors] \
        if any_dtensor(tensors) else tensors


def refuse_partial(tensors: list, what: str) -> None:
    """TypeError naming ``what`` when a tensor is a Partial DTensor: clamping its terms (or
    reading their statistics and writing them back) would clip the terms, not the gradient."""
    if not any_dtensor(tensors):
        return
    for i, t in enumerate(tensors):
        if is_partial(t):
            raise TypeError(
                f"{what} cannot clip gradient #{i} in place: it is a DTensor with a Partial "
                "placement, whose local tensors are terms of a sum. Redistribute it first "
                "(Replicate or Shard).")


def require_group_for_shards(tensors: list, what: str) -> None:
    """ValueError when ``tensors`` hold a DTensor sharded over more than one rank: without a
    process group, norms of the local shards would silently be this rank's alone."""
    if not any_dtensor(tensors):
        return
    for i, t in enumerate(tensors):
        if is_dtensor(t) and any(_splits(p) and t.device_mesh.size(dim) > 1
                                 for dim, p in enumerate(t.placements)):
            raise ValueError(
                f"tensor #{i} is a DTensor sharded across ranks: give {what} the process group "
                "that shards it (group=...), so that the norms are the whole model's and not "
                "this rank's part.")


def sharding_groups(t) -> list:
    """The process groups to reduce a DTensor's statistics over: one per mesh dimension that
    shards it. Replicated dimensions hold copies and are counted once, by not reducing."""
    mesh = t.device_mesh
    return [mesh.get_group(dim) for dim, p in enumerate(t.placements) if _splits(p)]


def _splits(placement) -> bool:
    """Whether the ranks along a mesh dimension hold different parts of the tensor: Shard, and
    the strided shards FSDP2 makes over tensor parallelism (``_StridedShard``, for which
    ``is_shard()`` is False). Replicate holds copies; Partial is reduced before reading."""
    return not (placement.is_replicate() or placement.is_partial())


def combine_totals(parts: list[Totals]) -> Totals:
    """Totals of disjoint sets, already reduced each: add sums, max the maxima, min the minima."""
    first = parts[0]
    out = Totals(first.power.clone(), first.max_abs.clone(), first.min_abs.clone(),
                 first.nonfinite.clone(), first.zeros.clone(), first.numel.clone(),
                 first.nan_tensors.clone())
    for t in parts[1:]:
        device = out.power.device
        out.power = out.power + t.power.to(device)
        out.max_abs = torch.maximum(out.max_abs, t.max_abs.to(device))
        out.min_abs = torch.minimum(out.min_abs, t.min_abs.to(device))
        out.nonfinite = out.nonfinite + t.nonfinite.to(device)
        out.zeros = out.zeros + t.zeros.to(device)
        out.numel = out.numel + t.numel.to(device)
        out.nan_tensors = out.nan_tensors + t.nan_tensors.to(device)
    return out


def reduction_sets(tensors: list, group) -> list[tuple[list[int], list]]:
    """Split a gradient list into sets reduced the same way: ``(indices, groups)``.

    Tensors are keyed by the process groups their statistics must be summed over: a DTensor's
    sharded mesh dimensions (Shard(0) and Shard(1) on the same mesh share one set; replicated
    dimensions add nothing), a plain tensor's ``group`` (or none). One set is one pair of
    collectives per group in it, so a call makes as few as its placements allow. The order
    depends only on the list, so every rank issues the same collectives.
    """
    sets: dict[tuple, tuple[list[int], list]] = {}
    for i, t in enumerate(tensors):
        groups = sharding_groups(t) if is_dtensor(t) else ([] if group is None else [group])
        key = tuple(id(g) for g in groups)
        sets.setdefault(key, ([], groups))[0].append(i)
    if not sets:
        return [([], [] if group is None else [group])]
    return list(sets.values())
