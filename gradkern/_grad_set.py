"""One gradient set: how a call sees the tensors it was given, decided once.

Every public op, the clippers and the Monitor build one :class:`GradSet` per call and go down
through it. It decides

* what the list is: plain tensors of this process; DTensor gradients (FSDP2, tensor parallel),
  whose statistics are reduced over the mesh dimensions that shard them; or shards of one set
  across the ranks of ``group=``;
* what the caller will do with it (:class:`Intent`), which for a Partial DTensor decides what is
  read and what is written;

and it owns the statistics (one read pass per norm kind, kept for reuse), their reduction
across ranks, and the writes. The tensors are split into parts reduced alike (see
:func:`gradkern.distributed.reduction_sets`); the usual call, plain tensors without a group,
is one part that the fast path reads in one C call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import _engine, _norms, distributed
from ._engine import Tables
from ._norms import NormSpec
from .backends import RawStats


class Intent(enum.Enum):
    """What the caller does with the gradients after reading their statistics."""

    READ = "read"  # nothing: statistics only
    SCALE = "scale"  # multiply by coefficients (linear: a Partial DTensor's terms are scaled)
    CLAMP = "clamp"  # clamp elementwise (not linear: a Partial DTensor is refused)


@dataclass
class _Part:
    """Tensors of the set whose statistics are reduced over the same process groups."""

    index: list[int] | None  # positions in the set; None: the whole set
    groups: list  # process groups the statistics are summed over ([]: none, this rank only)
    read: list[torch.Tensor]  # what the statistics read (a Partial DTensor: its summed part)
    write: list[torch.Tensor]  # what is written (a DTensor's own local tensor)
    names: Sequence[str] | None
    tables: Tables | None = None  # ``read`` as the kernels see it, from the first read pass
    stats: dict = field(default_factory=dict)  # NormSpec -> (raw, numel, error)


class GradSet:
    """A list of gradients as one call sees them. Build it with :meth:`of` (the drop-ins:
    DTensors follow their mesh) or :meth:`of_local` (the clippers and the Monitor: DTensors are
    read as their local tensors, reduced over ``group``).

    Nothing is read or written until asked; everything that can raise for a bad input does so
    before the first write.
    """

    def __init__(self, tensors: list[torch.Tensor], names: Sequence[str] | None, group,
                 parts: list[_Part], dtensors: bool, params: list | None = None):
        self.tensors = tensors
        self.names = names
        self.group = group
        self.parts = parts
        self.has_dtensors = dtensors  # results go back as replicated DTensors
        self.params = params  # the parameters whose gradients these are, when known
        # One part on this rank alone: nothing to reduce, and errors raise where they happen.
        self.local = len(parts) == 1 and not parts[0].groups
        # 1 / GradScaler's scale when the gradients are still scaled and the L2 statistics
        # were divided by it (see :meth:`unscale_stats`)
        self.inv_scale: torch.Tensor | None = None
        self._total_l2: torch.Tensor | None = None
        self._unsettled: tuple[Intent, str] | None = None  # see :meth:`_settle`
        self._fused_tried = False  # the fast path read the table and declined it

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def of(cls, tensors: list[torch.Tensor], names: Sequence[str] | None = None, *, group=None,
           intent: Intent = Intent.READ, what: str = "clip_") -> GradSet:
        """The set as the drop-ins see it: plain tensors over ``group`` (or this rank alone);
        DTensors reduced over the mesh dimensions that shard them, read through their local
        parts (a Partial one summed first) and written through their own local tensors.

        Raises:
            TypeError: ``intent`` is CLAMP and a tensor is a Partial DTensor (``what`` names
                the caller in the message). Nothing has been read or written.
        """
        if group is None:
            # Whether a DTensor is among them is settled by the first read: the fast path
            # reads plain tensors only, and looking for a DTensor in 20,000 tensors costs more
            # than reading their table.
            gradients = cls(tensors, names, None, [_Part(None, [], tensors, tensors, names)],
                            dtensors=False)
            gradients._unsettled = (intent, what)
            return gradients
        if not distributed.any_dtensor(tensors):  # one check per distinct type
            return cls(tensors, names, group, [_Part(None, [group], tensors, tensors, names)],
                       dtensors=False)
        return cls(tensors, names, group, _dtensor_parts(tensors, names, group, intent, what),
                   dtensors=True)

    def _settle(self, spec: NormSpec | None, counts: bool = True) -> None:
        """For a set built without a group: read it on the fast path (with ``spec``), or find
        the DTensors that kept it off it and split the set by their meshes."""
        intent, what = self._unsettled
        self._unsettled = None
        part = self.parts[0]
        if spec is not None:
            fused = _engine.fused_stats(part.read, part.names, spec, counts=counts)
            if fused is not None:
                part.tables, raw, numel = fused
                part.stats[spec] = (raw, numel, None)
                return
            self._fused_tried = True
        if distributed.any_dtensor(self.tensors):
            self.parts = _dtensor_parts(self.tensors, self.names, None, intent, what)
            self.has_dtensors = True
            self.local = len(self.parts) == 1 and not self.parts[0].groups

    @classmethod
    def of_local(cls, tensors: list[torch.Tensor], names: Sequence[str] | None = None, *,
                 group=None, intent: Intent = Intent.READ, what: str = "a clipper",
                 params: list | None = None) -> GradSet:
        """The set as the clippers and the Monitor see it: each DTensor by its local tensor,
        the whole set reduced over ``group`` (which must then be the group that shards them).

        Raises:
            TypeError: ``intent`` is not READ and a tensor is a Partial DTensor.
        """
        if distributed.any_dtensor(tensors):
            if intent is Intent.READ:
                tensors = distributed.local_to_read(tensors)
            else:
                distributed.refuse_partial(tensors, what)
                tensors = distributed.local_to_write(tensors)  # it writes: never copies
        parts = [_Part(None, [] if group is None else [group], tensors, tensors, names)]
        return cls(tensors, names, group, parts, dtensors=False, params=params)

    # ---- reading ----------------------------------------------------------------------------

    def _stats(self, part: _Part, spec: NormSpec,
               counts: bool = True) -> tuple[RawStats | None, torch.Tensor | None,
                                             BaseException | None]:
        """This rank's per-tensor statistics of ``part`` for ``spec``, read once and kept.
        Where the part is reduced across ranks a local error is kept, not raised, so that this
        rank still joins the collectives (which then raise it, see ``distributed.finish``)."""
        hit = part.stats.get(spec)
        if hit is not None and (hit[1] is not None or not counts):
            return hit
        if part.tables is not None:  # read before: another norm kind, one more pass
            raw, numel = _engine.read_stats(part.tables, spec, counts=counts)
            hit = (raw, numel, None)
        elif self.local and not self.has_dtensors:
            part.tables, raw, numel = _engine.tabulate_stats(part.read, part.names, spec,
                                                             counts=counts,
                                                             fast_path=not self._fused_tried)
            hit = (raw, numel, None)
        else:
            part.tables, raw, numel, error = distributed.local_stats(part.read, part.names,
                                                                       spec)
            if error is not None and not part.groups:
                raise error
            hit = (raw, numel, error)
        part.stats[spec] = hit
        return hit

    def local_stats(self, spec: NormSpec,
                    counts: bool = True) -> tuple[RawStats, torch.Tensor | None]:
        """``(raw, numel)``: the per-tensor statistics of a one-part set on this rank (the
        Monitor's ring rows). Raises what reading raises."""
        raw, numel, error = self._stats(self.parts[0], spec, counts)
        if error is not None:
            raise error
        return raw, numel

    def local_max_abs(self) -> torch.Tensor:
        """max |g| over this rank's tensors (0-dim float64), from the statistics already read
        (every read pass also takes max |g|); NaN when one holds a NaN, 0 when there are none."""
        maxima = []
        for part in self.parts:
            hit = _first_read(part)
            if hit is not None and hit[0] is not None and hit[0].max_abs.numel():
                maxima.append(hit[0].max_abs.max())
        if not maxima:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return torch.stack([m.to(maxima[0].device) for m in maxima]).max()

    def unscale_stats(self, inv_scale: torch.Tensor) -> None:
        """The gradients are still multiplied by GradScaler's scale (a fused step unscales them
        in its own kernel): divide the kept L2 statistics by it, and every later norm too."""
        part = self.parts[0]
        raw, numel, error = part.stats[_norms.L2]
        raw = RawStats(raw.power_sum * inv_scale.square(), raw.max_abs * inv_scale,
                       raw.nonfinite, raw.zeros)
        part.stats[_norms.L2] = (raw, numel, error)
        self.inv_scale = inv_scale

    def _device(self, part: _Part) -> torch.device:
        if part.tables is not None:
            return part.tables.device
        if part.groups:
            return distributed.collective_device(part.groups[0])
        return part.read[0].device if part.read else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """Where results live: the device of this rank's first tensors read, else the
        group's collective device."""
        for part in self.parts:
            if part.tables is not None:
                return part.tables.device
        if self.group is not None:
            return distributed.collective_device(self.group)
        return self._device(self.parts[0])

    @property
    def dtype(self) -> torch.dtype | None:
        """torch's promoted dtype of this rank's gradients read so far (None when none)."""
        dtypes = {p.tables.dtype for p in self.parts if p.tables is not None}
        return _norms.result_dtype(dtypes) if dtypes else None

    def norms(self, spec: NormSpec, *, per_tensor: bool = False,
              may_sync: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(per-tensor norms, total norm)``, float64: the total of the whole set (across
        parts, over each part's groups), and with ``per_tensor`` each tensor's whole norm in
        list order (else None). ``may_sync``: the caller reads a value on the host anyway, so a
        remote failure may be checked there (see ``distributed.finish``).

        An error on this rank (a bad dtype, say) raises here, after the collectives."""
        if self._unsettled is not None:
            self._settle(spec)
        if self.local:
            raw, numel, _ = self._stats(self.parts[0], spec)
            norms = _norms.per_tensor_norms(raw, numel, spec) if per_tensor else None
            total = _norms.total_norm(raw, numel, spec)
        else:
            totals, pieces = [], []
            for part in self.parts:
                raw, numel, error = self._stats(part, spec)
                device = self._device(part)
                if per_tensor:  # entry i of every rank is a shard of the same tensor i
                    n = len(part.index) if part.index is not None else len(self.tensors)
                    raw, numel = distributed.reduce_per_tensor(raw, numel, n, spec, part.groups,
                                                               device, error, may_sync)
                    pieces.append((part, _norms.per_tensor_norms(raw, numel, spec)))
                    totals.append(distributed.totals_of(raw, numel, spec, device))
                else:
                    totals.append(distributed.reduce_totals(raw, numel, spec, part.groups,
                                                            device, error, may_sync))
            total = distributed.combine_totals(totals).norm(spec)
            norms = _in_list_order(pieces, len(self.tensors), total.device) if per_tensor \
                else None
        if self.inv_scale is not None and spec != _norms.L2 and spec.p != 0.0:
            # every p-norm but the count of non-zeros scales with the gradients
            norms = None if norms is None else norms * self.inv_scale
            total = total * self.inv_scale
        return norms, total

    def total_l2(self) -> torch.Tensor:
        """The whole set's L2 norm (reduced across the group once, then kept)."""
        if self._total_l2 is None:
            self._total_l2 = self.norms(_norms.L2)[1]
        return self._total_l2

    def whole_tensor_stats(self, spec: NormSpec) -> tuple[RawStats, torch.Tensor]:
        """Per-tensor statistics of whole tensors, in list order: each reduced over its part's
        groups entry by entry (so every rank must list the same tensors, as FSDP does)."""
        if self._unsettled is not None:
            self._settle(spec)
        if self.local:
            raw, numel, _ = self._stats(self.parts[0], spec)
            return raw, numel
        pieces = []
        for part in self.parts:
            raw, numel, error = self._stats(part, spec)
            n = len(part.index) if part.index is not None else len(self.tensors)
            pieces.append((part, *distributed.reduce_per_tensor(raw, numel, n, spec, part.groups,
                                                                self._device(part), error)))
        device, n = pieces[0][1].power_sum.device, len(self.tensors)

        def in_order(field) -> torch.Tensor:
            return _in_list_order([(part, field(raw, numel)) for part, raw, numel in pieces], n,
                                  device)

        full = RawStats(*(in_order(lambda raw, _, k=k: getattr(raw, k))
                          for k in ("power_sum", "max_abs", "nonfinite", "zeros")))
        return full, in_order(lambda _, numel: numel)

    # ---- checks ----------------------------------------------------------------------------

    def check_defined(self, spec: NormSpec) -> None:
        """RuntimeError for a negative order over zero elements on this rank (it has no value;
        torch raises for it too)."""
        if spec.p >= 0 or not self.local:
            return
        tables = self.parts[0].tables
        if tables is None or not any(int(g.work.numel.sum()) for g in tables.devices):
            raise _norms.undefined_norm_error(spec)

    def check_finite(self, total: torch.Tensor, spec: NormSpec) -> None:
        """``error_if_nonfinite``: RuntimeError unless the norm as torch returns it (in the
        gradients' dtype, where a large finite norm can overflow) is finite. The message names
        the non-finite gradients where this rank knows them. Syncs with the device, as torch
        does."""
        dtype = self.result_dtype()
        if bool(torch.isfinite(total.to(dtype))):
            return
        names = self.nonfinite_names()
        if names:
            where = f"Non-finite gradients: {', '.join(names)}."
        elif bool(torch.isfinite(total)):
            where = (f"The gradients are finite, but their norm ({float(total):.6g}) overflows "
                     f"{dtype}.")
        elif not self.local:
            where = "The non-finite gradients are on another rank."
        else:
            where = ""
        raise _norms.nonfinite_norm_error(spec, where)

    def nonfinite_names(self) -> list[str]:
        """Names (or ``#index``) of this rank's tensors that hold NaN/inf, in list order, from
        the statistics read so far (a read pass when there are none). Syncs with the device."""
        if self._unsettled is not None:
            self._settle(_norms.parse_norm_type(float("inf")))
        found = []
        for part in self.parts:
            hit = _first_read(part)
            if hit is None:
                hit = self._stats(part, _norms.parse_norm_type(float("inf")))
            raw = hit[0]
            if raw is None or part.tables is None:
                continue
            bad = raw.nonfinite.cpu().numpy().nonzero()[0]
            where = part.index if part.index is not None else range(len(self.tensors))
            found += [(where[i], self._name(where[i])) for i in bad]
        return [name for _, name in sorted(found)]

    def _name(self, i: int) -> str:
        return self.names[i] if self.names is not None else f"#{i}"

    def result_dtype(self) -> torch.dtype:
        """The dtype the drop-ins return a norm in: torch's promoted dtype of the gradients
        (the default dtype on a rank that has none)."""
        dtype = self.dtype
        return torch.get_default_dtype() if dtype is None else dtype

    def returned(self, total: torch.Tensor) -> torch.Tensor:
        """The norm as torch returns it: in the gradients' promoted dtype, and for DTensor
        gradients a DTensor, replicated, whose ``full_tensor()`` is it."""
        value = total.to(self.result_dtype())
        return distributed.replicated_like(value, self.tensors) if self.has_dtensors else value

    # ---- writing ---------------------------------------------------------------------------

    def _writable(self) -> list[tuple[_Part, Tables]]:
        """Each part that has tensors on this rank, with what is written, tables."""
        if self._unsettled is not None:
            self._settle(None)
        out = []
        for part in self.parts:
            if not part.write:
                continue
            if part.write is part.read and part.tables is not None:
                out.append((part, part.tables))
            else:
                out.append((part, _engine.tabulate(part.write, part.names)))
        return out

    def check_writable(self) -> None:
        """RuntimeError, before anything is written, when a tensor cannot be written in place
        (see :func:`gradkern._engine.check_writable`)."""
        for _, tables in self._writable():
            _engine.check_writable(tables)

    def write(self, coef: torch.Tensor | None, clip_value: float = float("inf")) -> None:
        """Scale where ``coef`` < 1 (one entry for all, or one per tensor in list order; None:
        no scaling), then clamp to ``[-clip_value, clip_value]``, in place, in one pass per
        tensor. Every part is checked before the first is written."""
        targets = self._writable()
        for _, tables in targets:
            _engine.check_writable(tables)
        for part, tables in targets:
            part_coef = coef
            if coef is not None and coef.numel() > 1 and part.index is not None:
                part_coef = coef[torch.tensor(part.index, device=coef.device)]
            _engine.clip_in_place(tables, part_coef, clip_value)

def _first_read(part: _Part) -> tuple | None:
    """The statistics of the part's first read pass, any norm kind (each also holds max |g|
    and the counts), or None before one."""
    return next(iter(part.stats.values()), None)


def _in_list_order(pieces: list, n: int, device: torch.device) -> torch.Tensor:
    """Per-part values put back in the set's order (the parts cover every position)."""
    if len(pieces) == 1 and pieces[0][0].index is None:
        return pieces[0][1].to(device)
    out = torch.empty(n, dtype=pieces[0][1].dtype, device=device)
    for part, values in pieces:
        out[torch.tensor(part.index, device=device)] = values.to(device)
    return out


def _dtensor_parts(tensors: list, names: Sequence[str] | None, group, intent: Intent,
                   what: str) -> list[_Part]:
    """A list holding DTensors, split into parts reduced alike."""
    if intent is Intent.CLAMP:
        distributed.refuse_partial(tensors, what)
    parts = []
    for index, groups in distributed.reduction_sets(tensors, group):
        subset = [tensors[i] for i in index]
        read = distributed.local_to_read(subset)
        write = read
        if intent is not Intent.READ and distributed.has_partial(subset):
            write = distributed.local_to_write(subset)  # the terms, not their sum
        sub_names = None if names is None else [names[i] for i in index]
        whole = len(index) == len(tensors)
        parts.append(_Part(None if whole else index, groups, read, write, sub_names))
    return parts
