"""The Numba CPU backend: the twins in _numba_kernels.py, for machines without gradkern._cpu.

Numba compiles on first use (then caches on disk), so importing gradkern does not import numba;
this module is loaded only when the backend is asked for.
"""

from __future__ import annotations

import numpy as np
import torch

from .._norms import NormSpec
from .._table import WorkSet
from .._chunks import chunk_plan
from ._clip_bounds import clip_bounds
from .base import RawStats, empty_stats


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
        self._kernels.tensor_stats(
            data.view(np.int64), numel, codes, chunk_tensor, chunk_begin, first_chunk,
            int(spec.kind), float(spec.p),
            out.power_sum.numpy(), out.max_abs.numpy(), out.nonfinite.numpy(), out.zeros.numpy(),
        )
        return out

    def clip_in_place(
        self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float
    ) -> None:
        data, numel, codes = ws.table()
        chunk_tensor, chunk_begin, _ = chunk_plan(numel)
        coef_array = np.ones(1) if coef is None else coef.numpy()
        self._kernels.clip_in_place(
            data.view(np.int64), numel, codes, chunk_tensor, chunk_begin, coef_array,
            clip_bounds(clip_value)[1],
        )
