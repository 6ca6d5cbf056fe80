"""The tensor table and its chunk plan in GPU memory, and the launch facts, shared by the two
CUDA backends.

Building one costs host-to-device copies (queued on the current stream, no host stall); a
training loop whose grad pointers do not change between steps reuses it, so the cache keeps the
last few, keyed by device and table contents.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch

from .._chunks import chunk_plan
from .._table import WorkSet

_CACHE_SIZE = 8


def device_of(ws: WorkSet) -> torch.device:
    """The CUDA device of a work set, with its index always set."""
    device = ws.work[0].device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@lru_cache(maxsize=None)
def multiprocessors(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (the persistent grids scale with it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def to_device_async(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of ``a`` on ``device``, queued on the current stream without stalling the host.

    The source goes through pinned memory: a copy from pageable memory may wait for the stream
    to drain first. torch's pinned-memory cache keeps the staging block alive until the copy has
    run.

    Raises RuntimeError during CUDA-graph capture: the graph would keep a copy from a staging
    block that the host allocator reuses afterwards, so replays would read whatever is there.
    What gradkern uploads (tables, clamp bounds) is cached, so one warm-up call outside the
    capture, which torch asks for its own ops too, uploads it for good."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "gradkern needs one call with these gradients (and this clip value) before CUDA-graph "
            "capture, to upload their table to the GPU: run a warm-up step outside the capture, "
            "as torch asks for its own ops")
    return torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)


class DeviceTable:
    """Device tensors: addresses (int64 bits of the uint64 pointers), element counts, dtype
    codes, and the chunk plan (tensor and first element of each chunk, first chunk of each
    tensor)."""

    def __init__(self, data: np.ndarray, numel: np.ndarray, codes: np.ndarray,
                 device: torch.device):
        chunk_tensor, chunk_begin, first_chunk = chunk_plan(numel)
        self.addresses = to_device_async(data.view(np.int64), device)
        self.numel = to_device_async(numel, device)
        self.codes = to_device_async(codes, device)
        self.chunk_tensor = to_device_async(chunk_tensor, device)
        self.chunk_begin = to_device_async(chunk_begin, device)
        self.first_chunk = to_device_async(first_chunk, device)
        self.n_tensors = len(numel)
        self.n_chunks = len(chunk_tensor)
        self.extra: dict[str, object] = {}  # per-backend views of these tensors, built once

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.addresses, self.numel, self.codes, self.chunk_tensor, self.chunk_begin,
                self.first_chunk)


class DeviceTableCache:
    """The last few device tables, most recently used last."""

    def __init__(self) -> None:
        self._tables: OrderedDict[tuple, DeviceTable] = OrderedDict()

    def get(self, ws: WorkSet, device: torch.device) -> DeviceTable:
        data, numel, codes = ws.table()
        key = (device, data.tobytes(), numel.tobytes(), codes.tobytes())
        table = self._tables.get(key)
        if table is None:
            table = DeviceTable(data, numel, codes, device)
            self._tables[key] = table
            if len(self._tables) > _CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def element_counts(self, ws: WorkSet, device: torch.device) -> torch.Tensor:
        """``ws.numel`` on ``device`` (int64), the caller's to keep or modify.

        For dense tensors it is a device-side copy of the table's own counts: a copy from host
        memory would either stall the host (pageable memory) or, inside CUDA-graph capture,
        freeze a host staging buffer into the graph."""
        if ws.implicit_zeros is not None:  # sparse: the table counts stored values, not all
            return to_device_async(ws.numel, device)
        return self.get(ws, device).numel.clone()
