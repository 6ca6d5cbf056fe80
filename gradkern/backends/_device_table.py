"""The tensor table and its chunk plan in GPU memory, and the launch facts, shared by the two
CUDA backends.

Building one costs host-to-device copies (queued on the current stream, no host stall): one for
the plan of the tensors' sizes and dtypes, one for their addresses. The cache keeps the last few
of each, so a training loop whose gradients keep their shapes uploads at most their addresses.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch

from .._chunks import chunk_plan
from .._table import WorkSet

_CACHE_SIZE = 8


def device_of(ws: WorkSet) -> torch.device:
    """The CUDA device of a work set, with its index always set."""
    device = ws.device if ws.device is not None else ws.work[0].device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# torch's current stream as its raw cudaStream_t in one C call. torch.cuda.current_stream builds
# a Stream object first: 36 us a call under cProfile on an H100 host, where the whole launch of
# the stats pass takes 50 (benchmarks/NOTES.md). torch's own compiled code reads it this way.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: torch.device) -> int:
    """The handle of torch's current stream on ``device`` (an int, as ``Stream.cuda_stream``)."""
    if _raw_current_stream is not None:
        return _raw_current_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def device_guard(device: torch.device):
    """A context that makes ``device`` current for kernel launches; an empty one when it already
    is (the usual case: entering and leaving ``torch.cuda.device`` costs tens of us)."""
    if device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(device)


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


class ShapePlan:
    """What a device table holds that depends only on the tensors' sizes and dtypes: element
    counts, dtype codes and the chunk plan (tensor and first element of each chunk, first chunk
    of each tensor). It travels as one packed int64 array (one pinned staging block, one copy);
    the device tensors are views into it."""

    def __init__(self, numel: np.ndarray, codes: np.ndarray, device: torch.device):
        chunk_tensor, chunk_begin, first_chunk = chunk_plan(numel)
        n = len(numel)
        words = [numel, chunk_tensor, chunk_begin, first_chunk]
        sizes = [len(w) for w in words]
        code_words = (n + 7) // 8  # the int8 codes, eight to a word
        packed = np.zeros(sum(sizes) + code_words, dtype=np.int64)
        np.concatenate(words, out=packed[:sum(sizes)])
        packed[sum(sizes):].view(np.int8)[:n] = codes
        (self.numel, self.chunk_tensor, self.chunk_begin, self.first_chunk,
         code_part) = to_device_async(packed, device).split(sizes + [code_words])
        self.codes = code_part.view(torch.int8)[:n]
        self.n_tensors = n
        self.n_chunks = len(chunk_tensor)
        self.extra: dict[str, object] = {}  # per-backend views of these tensors, built once

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.numel, self.codes, self.chunk_tensor, self.chunk_begin, self.first_chunk


class DeviceTable:
    """A table in device memory: the tensors' addresses (int64 bits of the uint64 pointers) and
    the :class:`ShapePlan` of their sizes and dtypes.

    The plan is shared by every table of the same shapes, so gradients that land at new
    addresses (``zero_grad(set_to_none=True)`` frees them every step) cost one small upload of
    their addresses, not a new plan."""

    def __init__(self, data: np.ndarray, plan: ShapePlan, device: torch.device):
        self.addresses = to_device_async(data.view(np.int64), device)
        self.plan = plan
        self.numel, self.codes = plan.numel, plan.codes
        self.chunk_tensor, self.chunk_begin = plan.chunk_tensor, plan.chunk_begin
        self.first_chunk = plan.first_chunk
        self.n_tensors, self.n_chunks = plan.n_tensors, plan.n_chunks
        self.extra: dict[str, object] = {}  # per-backend views of these tensors, built once

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.addresses, self.numel, self.codes, self.chunk_tensor, self.chunk_begin,
                self.first_chunk)


def _remember(cache: OrderedDict, key: tuple, make):
    """``cache[key]``, made by ``make()`` when missing; the least recently used entry goes
    beyond ``_CACHE_SIZE``."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


class DeviceTableCache:
    """The last few device tables and shape plans, most recently used last."""

    def __init__(self) -> None:
        self._tables: OrderedDict[tuple, DeviceTable] = OrderedDict()
        self._plans: OrderedDict[tuple, ShapePlan] = OrderedDict()

    def get(self, ws: WorkSet, device: torch.device) -> DeviceTable:
        data, numel, codes = ws.table()
        shapes = (device, numel.tobytes(), codes.tobytes())

        def make() -> DeviceTable:
            plan = _remember(self._plans, shapes, lambda: ShapePlan(numel, codes, device))
            return DeviceTable(data, plan, device)

        return _remember(self._tables, (data.tobytes(), *shapes), make)

    def element_counts(self, ws: WorkSet, device: torch.device) -> torch.Tensor:
        """``ws.numel`` on ``device`` (int64), the caller's to keep or modify.

        For dense tensors it is a device-side copy of the table's own counts: a copy from host
        memory would either stall the host (pageable memory) or, inside CUDA-graph capture,
        freeze a host staging buffer into the graph."""
        if ws.implicit_zeros is not None:  # sparse: the table counts stored values, not all
            return to_device_async(ws.numel, device)
        return self.get(ws, device).numel.clone()
