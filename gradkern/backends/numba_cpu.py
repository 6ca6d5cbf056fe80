"""The Numba CPU backend: the twins in _numba_kernels.py, for machines without gradkern._cpu.

Numba compiles on first use (then caches on disk), so importing gradkern does not import numba;
this module is loaded only when the backend is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch

from .._chunks import chunk_plan
from .._constants import MIN_PARALLEL_RANGES, MIN_PARALLEL_RANGES_SHARED
from .._norms import NormSpec
from .._table import WorkSet
from ._clip_bounds import clip_bounds
from ._cpu_share import cpu_shared
from .base import RawStats, empty_stats


def runs_alone(numel: np.ndarray) -> bool:
    """Whether a pass over tensors of ``numel`` elements (int64) runs on the calling thread: the
    C++ passes' rule (``gradkern/parallel.h``), counting the work items the C++ chunk plan packs
    them into (``_numba_kernels.work_items``). A pass too small to pay for waking the team runs
    alone, and so does one under MIN_PARALLEL_RANGES_SHARED items (32M elements of large
    tensors) when the cores are shared (:func:`~gradkern.backends._cpu_share.cpu_shared`),
    since a team member the scheduler has not run holds the pass for a scheduler slice or two."""
    from ._numba_kernels import work_items

    items = work_items(numel)
    return items < MIN_PARALLEL_RANGES or (items < MIN_PARALLEL_RANGES_SHARED and cpu_shared())


@contextmanager
def _team_for(numel: np.ndarray) -> Iterator[None]:
    """Numba's team for a pass over tensors of ``numel`` elements: the calling thread alone
    where :func:`runs_alone` says so (Numba's thread count is the calling thread's own setting,
    restored after). The kernels fold chunk results in a fixed order, so the bits are the same."""
    if not runs_alone(numel):
        yield
        return
    team = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(team)


class NumbaBackend:
    name = "numba"
    reads_tables = True

    def __init__(self) -> None:
        from . import _numba_kernels

        self._kernels = _numba_kernels

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        data, numel, codes = ws.table()
        chunk_tensor, chunk_begin, first_chunk = chunk_plan(numel)
        out = empty_stats(ws.size)
        with _team_for(numel):
            self._kernels.tensor_stats(
                data.view(np.int64), numel, codes, chunk_tensor, chunk_begin, first_chunk,
                int(spec.kind), float(spec.p), out.power_sum.numpy(), out.max_abs.numpy(),
                out.nonfinite.numpy(), out.zeros.numpy(),
            )
        return out

    def clip_in_place(
        self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float
    ) -> None:
        data, numel, codes = ws.table()
        chunk_tensor, chunk_begin, _ = chunk_plan(numel)
        coef_array = np.ones(1) if coef is None else coef.numpy()
        with _team_for(numel):
            self._kernels.clip_in_place(
                data.view(np.int64), numel, codes, chunk_tensor, chunk_begin, coef_array,
                clip_bounds(clip_value)[1],
            )
