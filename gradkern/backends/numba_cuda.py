"""The numba-cuda backend: the kernels in _numba_cuda_kernels.py, for CUDA tensors when the
compiled gradkern._cuda module is absent.

Same device table as the compiled backend (built once per parameter set, cached), outputs and
workspace from torch's caching allocator, launches on torch's current stream through
``numba.cuda.external_stream``. Tensors reach numba through ``__cuda_array_interface__``, which
torch exports without a stream, so numba does not synchronise on them: no call here waits for
the GPU. Kernels compile on first use and are cached on disk.
"""

from __future__ import annotations

import math
import warnings

import torch

from .._norms import NormSpec
from .._table import WorkSet
from ._device_table import (DeviceTable, DeviceTableCache, current_stream_handle, device_of,
                            multiprocessors, to_device_async)
from ._clip_bounds import clip_bounds
from .base import RawStats, empty_stats

_BLOCKS_PER_SM = 8
_NUMBA_SMALL_GRID = 128  # numba warns below this many blocks


def _launcher(kernel, blocks: int, threads: int, stream):
    """``kernel[blocks, threads, stream]``. A small parameter set is a small grid by design, so
    numba's low-occupancy warning is silenced for this launch only."""
    if blocks >= _NUMBA_SMALL_GRID:
        return kernel[blocks, threads, stream]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size")
        return kernel[blocks, threads, stream]


class NumbaCudaBackend:
    name = "numba_cuda"
    reads_tables = True

    def __init__(self) -> None:
        from numba import cuda

        from . import _numba_cuda_kernels

        self._cuda = cuda
        self._k = _numba_cuda_kernels
        self._tables = DeviceTableCache()
        self._streams: dict[int, object] = {}
        self._ones: dict[torch.device, torch.Tensor] = {}
        self._bounds: dict[tuple[torch.device, float], tuple] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def _arrays(self, table: DeviceTable) -> tuple:
        arrays = table.extra.get("numba")
        if arrays is None:
            plan = table.plan.extra.get("numba")  # numel, codes, chunk_tensor, ...: shared
            if plan is None:
                plan = table.plan.extra["numba"] = tuple(map(self._cuda.as_cuda_array,
                                                             table.plan.tensors()))
            arrays = table.extra["numba"] = (self._cuda.as_cuda_array(table.addresses), *plan)
        return arrays

    def _stream(self, device: torch.device):
        handle = current_stream_handle(device)
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._cuda.external_stream(handle)
            self._streams[handle] = stream
        return stream

    def element_counts(self, ws: WorkSet) -> torch.Tensor:
        """The tensors' element counts on their device, without a host sync."""
        return self._tables.element_counts(ws, device_of(ws))

    @staticmethod
    def _blocks(device: torch.device, n_chunks: int) -> int:
        return max(1, min(n_chunks, _BLOCKS_PER_SM * multiprocessors(device.index)))

    # -- ops ---------------------------------------------------------------------------------

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        device = device_of(ws)
        n = ws.size
        out = empty_stats(n, device)
        as_array = self._cuda.as_cuda_array
        with torch.cuda.device(device), self._cuda.gpus[device.index]:
            table = self._tables.get(ws, device)
            addresses, numel, codes, chunk_tensor, chunk_begin, first_chunk = self._arrays(table)
            part_acc = torch.empty(max(table.n_chunks, 1), dtype=torch.float64, device=device)
            part_bits = torch.empty((4, max(table.n_chunks, 1)), dtype=torch.int64, device=device)
            stream = self._stream(device)
            kind, p = int(spec.kind), float(spec.p)
            if table.n_chunks:
                blocks = self._blocks(device, table.n_chunks)
                _launcher(self._k.chunk_partials, blocks, self._k.THREADS, stream)(
                    addresses, numel, codes, chunk_tensor, chunk_begin, kind, p,
                    as_array(part_acc), as_array(part_bits))
            if n:
                blocks = (n + self._k.THREADS - 1) // self._k.THREADS
                _launcher(self._k.fold_tensors, blocks, self._k.THREADS, stream)(
                    codes, first_chunk, kind, as_array(part_acc), as_array(part_bits),
                    as_array(out.power_sum), as_array(out.max_abs), as_array(out.nonfinite),
                    as_array(out.zeros))
        return out

    def clip_in_place(self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float) -> None:
        clamp = not math.isinf(clip_value)
        if coef is None and not clamp:
            return
        device = device_of(ws)
        as_array = self._cuda.as_cuda_array
        with torch.cuda.device(device), self._cuda.gpus[device.index]:
            table = self._tables.get(ws, device)
            if table.n_chunks == 0:
                return
            if coef is None:
                coef = self._ones.get(device)
                if coef is None:
                    coef = self._ones[device] = torch.ones(1, dtype=torch.float64, device=device)
            else:
                coef = coef.to(device=device, dtype=torch.float64).contiguous()
            addresses, numel, codes, chunk_tensor, chunk_begin, _ = self._arrays(table)
            bound_bits, bound_values = self._bounds_on(device, clip_value)
            _launcher(self._k.clip_chunks, self._blocks(device, table.n_chunks), self._k.THREADS,
                      self._stream(device))(
                addresses, numel, codes, chunk_tensor, chunk_begin, as_array(coef), bound_bits,
                bound_values, clamp)

    def _bounds_on(self, device: torch.device, clip_value: float) -> tuple:
        """The clamp bounds as device arrays, kept per clip value (a loop uses one or two)."""
        key = (device, clip_value)
        cached = self._bounds.get(key)
        if cached is None:
            if len(self._bounds) >= 16:
                self._bounds.clear()
            bits, values, _ = clip_bounds(clip_value)
            tensors = (to_device_async(bits, device), to_device_async(values, device))
            cached = self._bounds[key] = (tensors, tuple(map(self._cuda.as_cuda_array, tensors)))
        return cached[1]
