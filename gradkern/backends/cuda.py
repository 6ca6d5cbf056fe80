"""The CUDA backend: gradkern._cuda, built from cpp/cuda/ when nvcc was found.

The module is imported here so that a broken CUDA build is reported by ``gk.backends()``
instead of failing ``import gradkern``. The kernels take the tensor table and its chunk plan in
device memory; this backend builds them with torch (no host sync: host-to-device copies on the
current stream) and keeps the last few, so a training loop whose grad pointers do not change
reuses them. Outputs and workspace come from torch's caching allocator; launches go to torch's
current stream, under the tensors' device.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .._chunks import chunk_plan
from .._norm_spec import NormSpec
from .._table import WorkSet
from .base import RawStats

try:
    from .. import _cuda
except ImportError as exc:
    _cuda = None
    IMPORT_ERROR: str | None = f"gradkern._cuda is not in this build ({exc})"
else:
    IMPORT_ERROR = None

KERNELS_READY = _cuda is not None and hasattr(_cuda, "tensor_stats")
_CACHE_SIZE = 8


def runtime_info() -> dict | None:
    """Build and run-time facts of the CUDA module, or None if it is not compiled in."""
    return None if _cuda is None else dict(_cuda.runtime_info())


class _DeviceTable:
    """The table and chunk plan as device tensors, and the tuple the kernels take."""

    def __init__(self, data: np.ndarray, numel: np.ndarray, codes: np.ndarray,
                 device: torch.device):
        chunk_tensor, chunk_begin, first_chunk = chunk_plan(numel)

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

        # int64 views keep the bits of the uint64 addresses; the kernel reads them as uint64.
        self.tensors = [put(data.view(np.int64)), put(numel), put(codes), put(chunk_tensor),
                        put(chunk_begin), put(first_chunk)]
        self.n_tensors = len(numel)
        self.n_chunks = len(chunk_tensor)
        self.handles = tuple(t.data_ptr() for t in self.tensors) + (self.n_tensors, self.n_chunks)


class CudaBackend:
    name = "cuda"

    def __init__(self) -> None:
        self._tables: OrderedDict[tuple, _DeviceTable] = OrderedDict()
        self._sm_count: dict[int, int] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _device_of(self, ws: WorkSet) -> torch.device:
        return ws.work[0].device

    def _table(self, ws: WorkSet, device: torch.device) -> _DeviceTable:
        data, numel, codes = ws.table()
        key = (device, data.tobytes(), numel.tobytes(), codes.tobytes())
        table = self._tables.get(key)
        if table is None:
            table = _DeviceTable(data, numel, codes, device)
            self._tables[key] = table
            if len(self._tables) > _CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def _launch_args(self, device: torch.device) -> tuple[int, int]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._sm_count:
            self._sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._sm_count[index], torch.cuda.current_stream(index).cuda_stream

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        device = self._device_of(ws)
        n = ws.size
        f64, i64 = torch.float64, torch.int64
        out = RawStats(torch.empty(n, dtype=f64, device=device),
                       torch.empty(n, dtype=f64, device=device),
                       torch.empty(n, dtype=i64, device=device),
                       torch.empty(n, dtype=i64, device=device))
        with torch.cuda.device(device):
            table = self._table(ws, device)
            workspace = torch.empty(_cuda.WORKSPACE_WORDS * max(table.n_chunks, 1), dtype=f64,
                                    device=device)
            sm_count, stream = self._launch_args(device)
            _cuda.tensor_stats(table.handles, int(spec.kind), float(spec.p),
                               out.power_sum.data_ptr(), out.max_abs.data_ptr(),
                               out.nonfinite.data_ptr(), out.zeros.data_ptr(),
                               workspace.data_ptr(), sm_count, stream)
        return out

    def clip_in_place(self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float) -> None:
        device = self._device_of(ws)
        with torch.cuda.device(device):
            table = self._table(ws, device)
            sm_count, stream = self._launch_args(device)
            if coef is None:
                address, n_coef = 0, 0
            else:
                coef = coef.to(device=device, dtype=torch.float64).contiguous()
                address, n_coef = coef.data_ptr(), coef.numel()
            _cuda.clip_in_place(table.handles, address, n_coef, float(clip_value), sm_count,
                                stream)
