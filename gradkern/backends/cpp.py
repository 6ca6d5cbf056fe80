"""The C++ CPU backend: gradkern._cpu, built from cpp/cpu/ and bound in src/bind_cpu.cpp."""

from __future__ import annotations

import torch

from .. import _native
from .._norms import NormSpec
from .._table import WorkSet, reader_arguments
from .base import RawStats, empty_stats

_cpu, IMPORT_ERROR = _native.cpu, _native.CPU_ERROR


class CppBackend:
    name = "cpp"
    reads_tables = True

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        out = empty_stats(ws.size)
        _cpu.tensor_stats(*ws.table(), int(spec.kind), spec.p, out.power_sum.numpy(),
                          out.max_abs.numpy(), out.nonfinite.numpy(), out.zeros.numpy())
        return out

    def read_tensor_stats(self, tensors: list[torch.Tensor],
                          spec: NormSpec) -> tuple[WorkSet, RawStats] | None:
        """The table of ``tensors`` and their statistics in one C call, the pass running while
        the table is still being read; None when some tensor needs the general path (a subclass,
        another device, a non-contiguous or sparse layout, an unsupported dtype)."""
        out = empty_stats(len(tensors))
        data, numel, codes, ok, dtype_mask = _cpu.read_tensor_stats(
            tensors, *reader_arguments(), int(spec.kind), spec.p, out.power_sum.numpy(),
            out.max_abs.numpy(), out.nonfinite.numpy(), out.zeros.numpy())
        if not ok:
            return None
        return WorkSet(tensors, codes, numel, addresses=data, dtype_mask=dtype_mask), out

    def clip_in_place(self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float) -> None:
        _cpu.clip_in_place(*ws.table(), None if coef is None else coef.numpy(), clip_value)
