"""The CUDA backend: gradkern._cuda, built from cpp/cuda/ when nvcc was found.

The module is imported here so that a broken CUDA build is reported by ``gk.backends()``
instead of failing ``import gradkern``. The kernels take the tensor table and its chunk plan in
device memory; this backend builds them with torch (no host sync: host-to-device copies on the
current stream) and keeps the last few, so a training loop whose grad pointers do not change
reuses them. Outputs and workspace come from torch's caching allocator; launches go to torch's
current stream, under the tensors' device.
"""

from __future__ import annotations

import torch

from .. import _native
from .._norms import NormSpec
from .._table import WorkSet
from ._device_table import (DeviceTableCache, current_stream_handle, device_guard, device_of,
                            multiprocessors)
from .base import RawStats, empty_stats

_cuda, IMPORT_ERROR = _native.cuda()

KERNELS_READY = _cuda is not None and hasattr(_cuda, "tensor_stats")


def runtime_info() -> dict | None:
    """Build and run-time facts of the CUDA module, or None if it is not compiled in."""
    return None if _cuda is None else dict(_cuda.runtime_info())


class CudaBackend:
    name = "cuda"
    reads_tables = True

    def __init__(self) -> None:
        self._tables = DeviceTableCache()

    def _handles(self, ws: WorkSet, device: torch.device) -> tuple[tuple, int]:
        """The table as the module takes it (device addresses and sizes), and its chunk count."""
        table = self._tables.get(ws, device)
        handles = table.extra.get("cuda")
        if handles is None:
            handles = tuple(t.data_ptr() for t in table.tensors()) + (table.n_tensors,
                                                                       table.n_chunks)
            table.extra["cuda"] = handles
        return handles, table.n_chunks

    def element_counts(self, ws: WorkSet) -> torch.Tensor:
        """The tensors' element counts on their device, without a host sync."""
        return self._tables.element_counts(ws, device_of(ws))

    @staticmethod
    def _launch_args(device: torch.device) -> tuple[int, int]:
        return multiprocessors(device.index), current_stream_handle(device)

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        device = device_of(ws)
        n = ws.size
        out = empty_stats(n, device)
        with device_guard(device):
            handles, n_chunks = self._handles(ws, device)
            workspace = torch.empty(_cuda.WORKSPACE_WORDS * max(n_chunks, 1), dtype=torch.float64,
                                    device=device)
            sm_count, stream = self._launch_args(device)
            _cuda.tensor_stats(handles, int(spec.kind), float(spec.p),
                               out.power_sum.data_ptr(), out.max_abs.data_ptr(),
                               out.nonfinite.data_ptr(), out.zeros.data_ptr(),
                               workspace.data_ptr(), sm_count, stream)
        return out

    def clip_in_place(self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float) -> None:
        device = device_of(ws)
        with device_guard(device):
            handles, _ = self._handles(ws, device)
            sm_count, stream = self._launch_args(device)
            if coef is None:
                address, n_coef = 0, 0
            else:
                coef = coef.to(device=device, dtype=torch.float64).contiguous()
                address, n_coef = coef.data_ptr(), coef.numel()
            _cuda.clip_in_place(handles, address, n_coef, float(clip_value), sm_count,
                                stream)
