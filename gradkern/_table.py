"""Turning user gradients into the flat, contiguous tensors that the kernels read and write.

Every check happens here, before any kernel runs: a bad input raises and nothing is mutated.
Non-contiguous grads are copied to contiguous buffers (and copied back after an in-place op);
sparse COO grads are reduced to their coalesced values plus a count of implicit zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter

import numpy as np
import torch

from . import _native
from ._constants import DTYPE_CODES, DTYPES_BY_CODE

_get_dtype = attrgetter("dtype")

# The table reader lives in the C++ module; without it the Python path below does the work.
_cpu = _native.cpu

# Where torch keeps each tensor's metadata, and how the C readers get it (see _torch_layout):
# probed the first time a table is read, not at import (it builds tensors and runs a backward
# pass), then kept. For each CUDA device likewise, the first time its tensors are read.
_LAYOUT: object = None
_READER: str | None = None
_CUDA_LAYOUTS: dict[int, object] = {}
_CUDA_READERS: dict[int, str] = {}


def _cpu_layout() -> object:
    global _LAYOUT, _READER
    if _READER is None:
        if _cpu is None:
            _LAYOUT, _READER = None, "Python (the C++ module is not built)"
        else:
            from ._torch_layout import find_layout

            _LAYOUT, _READER = find_layout(_cpu)
    return _LAYOUT


def reader_report(device: torch.device | None = None) -> str:
    """One line saying how table rows of ``device``'s tensors (default: CPU) are read: directly
    from torch's memory, or through its getters, and why. Probes on first use."""
    reader_arguments(device)
    if device is None or device.type != "cuda" or _cpu is None:
        return _READER
    index = torch.cuda.current_device() if device.index is None else device.index
    return _CUDA_READERS.get(index, _READER)


def describe(i: int, names: Sequence[str] | None) -> str:
    """How error messages name tensor ``i``."""
    return f"{names[i]!r}" if names is not None else f"#{i}"


@dataclass
class WorkSet:
    """Contiguous dense tensors standing in for the user's tensors (all on one device), in order.

    ``work[i]`` aliases the user's storage where it can; otherwise ``writeback`` holds the
    (original, buffer) pairs to copy back after an in-place op.
    """

    work: list[torch.Tensor]  # may be the caller's own list: read, never modified
    codes: np.ndarray  # int8 dtype code per tensor
    numel: np.ndarray  # int64 element count the user sees (dense numel for sparse tensors)
    implicit_zeros: np.ndarray | None = None  # int64, the zeros a sparse tensor does not store
    writeback: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    addresses: np.ndarray | None = None  # uint64 data pointers, when already read
    dtype_mask: int | None = None  # bit c set when some tensor has code c (from the C readers)
    unwritable: str | None = None  # the first tensor that cannot be written in place, named
    device: torch.device | None = None  # where the entries live when ``work`` is empty

    @property
    def size(self) -> int:
        """Entries in the table (tensors, or units when a table splits tensors into rows)."""
        return len(self.codes)

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(addresses, element counts, dtype codes): the tensor table the compiled kernels take."""
        if self.addresses is not None:
            return self.addresses, self.numel, self.codes
        n = len(self.work)
        data = np.fromiter(map(torch.Tensor.data_ptr, self.work), dtype=np.uint64, count=n)
        if self.implicit_zeros is None:
            return data, self.numel, self.codes
        numel = np.fromiter(map(torch.Tensor.numel, self.work), dtype=np.int64, count=n)
        return data, numel, self.codes

    def copy_back(self) -> None:
        for original, buffer in self.writeback:
            original.copy_(buffer)

    def subset(self, keep: np.ndarray) -> WorkSet:
        """The entries at positions ``keep`` (for writing; the writeback pairs stay whole)."""
        addresses, numel, codes = self.table()
        return WorkSet([self.work[i] for i in keep] if self.work else [], codes[keep],
                       numel[keep], None, self.writeback, addresses[keep],
                       unwritable=self.unwritable, device=self.device)


_ITEM_BYTES = np.array([torch.empty((), dtype=d).element_size() for d in DTYPE_CODES],
                       dtype=np.uint64)  # by dtype code


# Tables found disjoint lately, by (size, first address, last address): a training loop clips
# the same gradients step after step, and allocators hand them the same memory again, so one
# comparison (~20 us for 10,000 tensors) replaces two sorts (~500 us).
_DISJOINT: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
_DISJOINT_KEPT = 8


def repeated_entries(ws: WorkSet) -> tuple[np.ndarray, np.ndarray] | None:
    """For writing in place: None when every entry of ``ws`` has memory of its own (the usual
    case, told by two sorts), else ``(keep, repeats)``: the position of the first appearance of
    each distinct tensor, in list order, and how many times it appears (the same tensor listed
    twice, e.g. a parameter in two lists). Two kernels writing one tensor at once would race.

    Raises:
        RuntimeError: two different tensors share part of their memory (overlapping views),
            so no order of writes is right. Nothing has been written.
    """
    if ws.size < 2:
        return None
    addresses, numel, codes = ws.table()
    nbytes = numel.astype(np.uint64) * _ITEM_BYTES[codes]
    key = (ws.size, int(addresses[0]), int(addresses[-1]))
    seen = _DISJOINT.get(key)
    if seen is not None and np.array_equal(seen[0], addresses) and \
            np.array_equal(seen[1], nbytes):
        return None  # the table of a recent step, already checked
    live = np.flatnonzero(nbytes)
    starts, ends = addresses[live], addresses[live] + nbytes[live]
    # Disjoint intervals sort their starts and ends alike: the k-th end never passes the
    # (k+1)-th start. Any overlap (a repeat included) breaks that somewhere.
    if (np.sort(ends)[:-1] <= np.sort(starts)[1:]).all():
        if len(_DISJOINT) >= _DISJOINT_KEPT:
            del _DISJOINT[next(iter(_DISJOINT))]
        _DISJOINT[key] = (addresses.copy(), nbytes)
        return None
    order = live[np.lexsort((nbytes[live], addresses[live]))]
    a, b = addresses[order], nbytes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    distinct_start, distinct_end = a[first], a[first] + b[first]
    if (distinct_end[:-1] > distinct_start[1:]).any():
        raise RuntimeError(
            "two gradients share part of their memory (overlapping views of one buffer), so "
            "they cannot be clipped in place one after the other. Nothing was modified.")
    repeats_sorted = np.diff(np.append(np.flatnonzero(first), len(order)))
    keep_sorted = np.minimum.reduceat(order, np.flatnonzero(first))
    empty = np.setdiff1d(np.arange(ws.size), live)  # zero-size entries write nothing
    keep = np.concatenate([keep_sorted, empty])
    repeats = np.concatenate([repeats_sorted, np.ones(len(empty), dtype=np.int64)])
    in_order = np.argsort(keep, kind="stable")
    return keep[in_order], repeats[in_order]


def reader_arguments(device: torch.device | None = None) -> tuple[type, tuple[torch.dtype, ...],
                                                                  object]:
    """What the C table readers take to recognise a plain tensor: the tensor type, the dtypes in
    code order, and the ``_cpu.TorchLayout`` they prefetch through and read rows with: the CPU
    one, or for a CUDA ``device`` that device's (see ``_torch_layout.find_cuda_layout``)."""
    layout = _LAYOUT if _READER is not None else _cpu_layout()
    if device is None or device.type != "cuda" or layout is None:
        return torch.Tensor, DTYPES_BY_CODE, layout
    index = torch.cuda.current_device() if device.index is None else device.index
    layout = _CUDA_LAYOUTS.get(index)
    if layout is None:
        if torch.cuda.is_current_stream_capturing():
            # The probe launches work of its own, which must not land in the caller's graph:
            # this call reads its rows through the getters, and a later one probes.
            return torch.Tensor, DTYPES_BY_CODE, _LAYOUT
        from ._torch_layout import find_cuda_layout

        with torch.cuda.device(index):
            layout, _CUDA_READERS[index] = find_cuda_layout(_LAYOUT, index)
        _CUDA_LAYOUTS[index] = layout
    return torch.Tensor, DTYPES_BY_CODE, layout


def read_dense_table(tensors: list[torch.Tensor], device: torch.device) -> WorkSet | None:
    """The fast path: a WorkSet over ``tensors`` read in one C loop, or None.

    None unless every tensor is a plain ``torch.Tensor``, contiguous, strided, of a supported
    dtype and on ``device``; the caller then takes :func:`make_work_set`, which handles (or
    rejects) the rest.
    """
    if _cpu is None or device.type not in ("cpu", "cuda"):
        return None
    flag, index = ("is_cpu", -1) if device.type == "cpu" else ("is_cuda", device.index)
    tensor_type, dtypes, layout = reader_arguments(device)
    data, numel, codes, ok, dtype_mask = _cpu.read_tensor_table(tensors, tensor_type, dtypes,
                                                                flag, index, layout)
    if not ok.all():
        return None
    return WorkSet(tensors, codes, numel, addresses=data, dtype_mask=dtype_mask)


PLAIN_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def units_of(t: torch.Tensor) -> int:
    """How many units (rows: all dims but the first) a tensor has; a vector or scalar is one."""
    return 1 if t.dim() <= 1 else t.shape[0]


def make_unit_work_set(tensors: list[torch.Tensor]) -> WorkSet | None:
    """A table with one entry per unit (row) of each tensor, built with numpy rather than a
    Python loop over rows; None unless every tensor is a plain, contiguous, strided tensor on
    one device (a subclass may keep its values elsewhere). Its entries have no tensors of
    their own (``work`` is empty): only backends that read address tables can take it."""
    if not tensors:
        return None
    device = tensors[0].device
    if any(not t.is_contiguous() or t.layout != torch.strided or t.device != device
           or type(t) not in PLAIN_TENSOR_TYPES or t.dtype not in DTYPE_CODES for t in tensors):
        return None
    units = np.array([units_of(t) for t in tensors], dtype=np.int64)
    numel = np.array([t.numel() for t in tensors], dtype=np.int64)
    per_unit = np.where(units > 0, numel // np.maximum(units, 1), 0)
    itemsize = np.array([t.element_size() for t in tensors], dtype=np.uint64)
    base = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)
    owner = np.repeat(np.arange(len(tensors)), units)
    first = np.concatenate([[0], np.cumsum(units)[:-1]])
    row = (np.arange(units.sum()) - first[owner]).astype(np.uint64)
    addresses = base[owner] + row * per_unit[owner].astype(np.uint64) * itemsize[owner]
    codes = np.array([DTYPE_CODES[t.dtype] for t in tensors], dtype=np.int8)[owner]
    return WorkSet(work=[], codes=codes, numel=per_unit[owner], addresses=addresses,
                   device=device)


def _has_memory(t: torch.Tensor) -> bool:
    try:
        return torch.Tensor.data_ptr(t) != 0
    except Exception:  # torch raises for some tensors without storage, a subclass may too
        return False


def _check_storage(tensors: list[torch.Tensor], names: Sequence[str] | None) -> None:
    """TypeError for a strided tensor with elements but no memory of its own: a wrapper
    subclass such as DTensor, whose values live in an inner tensor. Its data pointer is null,
    and a kernel given it would read (or write) address 0. Plain tensors are checked by type,
    once per distinct type."""
    unusual = set(map(type, tensors)) - PLAIN_TENSOR_TYPES
    if not unusual:
        return
    for i, t in enumerate(tensors):
        if (type(t) in unusual and t.layout == torch.strided and t.device.type != "meta"
                and t.numel() > 0 and not _has_memory(t)):
            hint = (" Pass its local shard (`.to_local()`), or call a gradkern function that "
                    "takes DTensor gradients (get_total_norm, clip_grad_norm_, clip_, "
                    "clip_grad_value_, clip_grads_with_norm_, grad_stats, find_nonfinite, "
                    "Monitor)." if type(t).__name__ == "DTensor" else "")
            raise TypeError(
                f"tensor {describe(i, names)} is a {type(t).__name__} without memory of its own "
                f"(a wrapper tensor subclass); gradkern reads gradients in place.{hint}")


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether several elements of ``t`` share one memory location (an expanded tensor), so that
    torch refuses to write it in place. Reading it is fine."""
    try:
        return torch._debug_has_internal_overlap(t) == 1  # torch's own test (1: it overlaps)
    except AttributeError:  # the usual cause: a broadcast dimension
        return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))


def check_tensors(tensors: list, names: Sequence[str] | None = None) -> None:
    """TypeError for an item that is not a tensor (one type check per distinct type)."""
    if all(issubclass(t, torch.Tensor) for t in set(map(type, tensors))):
        return
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {describe(i, names)} is a {type(t).__name__}, not a tensor"
                            + ("; `parameters` mixes tensors with (name, tensor) pairs"
                               if type(t) is tuple else ""))


def make_work_set(tensors: list[torch.Tensor], names: Sequence[str] | None = None) -> WorkSet:
    """Validate ``tensors`` (one device) and return the buffers the kernels operate on.

    Raises:
        TypeError: for a dtype other than fp32/fp64/fp16/bf16, or a layout other than strided or
            sparse COO. Nothing is modified.
    """
    n = len(tensors)  # (:func:`check_tensors` ran in the caller, gradkern._engine.tabulate)
    codes_list = list(map(DTYPE_CODES.get, map(_get_dtype, tensors), repeat(-1)))
    if -1 in codes_list:
        i = codes_list.index(-1)
        dtype = tensors[i].dtype
        if dtype.is_complex:
            raise TypeError(
                f"gradkern does not support complex gradients (its kernels read real values); "
                f"tensor {describe(i, names)} is {dtype}. torch.nn.utils handles them.")
        kind = "a floating-point" if dtype.is_floating_point else "a non-floating-point"
        raise TypeError(
            f"gradkern works on float32, float64, float16 and bfloat16 gradients; tensor "
            f"{describe(i, names)} is {kind} {dtype}"
        )
    _check_storage(tensors, names)
    codes = np.array(codes_list, dtype=np.int8)
    numel = np.fromiter(map(torch.Tensor.numel, tensors), dtype=np.int64, count=n)
    try:
        # The common case: every tensor strided and contiguous. One C-level call per tensor.
        if all(map(torch.Tensor.is_contiguous, tensors)):
            return WorkSet(list(tensors), codes, numel)
    except RuntimeError:
        pass  # sparse tensors have no notion of contiguity; take the general path
    work: list[torch.Tensor] = []
    implicit = np.zeros(n, dtype=np.int64)
    writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
    unwritable = None
    for i, t in enumerate(tensors):
        if t.layout == torch.strided:
            if t.is_contiguous():
                work.append(t)
            else:
                if unwritable is None and _has_internal_overlap(t):
                    unwritable = describe(i, names)
                buffer = t.contiguous()
                work.append(buffer)
                writeback.append((t, buffer))
        elif t.layout == torch.sparse_coo:
            coalesced = t if t.is_coalesced() else t.coalesce()
            values = coalesced._values()
            if not values.is_contiguous():
                values = values.contiguous()
                coalesced = torch.sparse_coo_tensor(
                    coalesced._indices(), values, coalesced.shape, is_coalesced=True
                )
            work.append(values)
            implicit[i] = t.numel() - values.numel()
            if coalesced is not t:
                writeback.append((t, coalesced))
        else:
            raise TypeError(
                f"gradkern supports strided and sparse COO gradients; tensor "
                f"{describe(i, names)} has layout {t.layout}"
            )
    return WorkSet(work, codes, numel, implicit, writeback, unwritable=unwritable)
