"""The C++ CPU backend: gradkern._cpu, built from cpp/cpu/ and bound in src/bind_cpu.cpp."""

from __future__ import annotations

import torch

from .._norm_spec import NormSpec
from .._table import WorkSet
from .base import RawStats, empty_stats

try:
    from .. import _cpu
except ImportError as exc:
    _cpu = None
    IMPORT_ERROR: str | None = f"gradkern._cpu did not import: {exc}"
else:
    IMPORT_ERROR = None


class CppBackend:
    name = "cpp"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        out = empty_stats(ws.size)
        _cpu.tensor_stats(*ws.table(), int(spec.kind), spec.p, out.power_sum.numpy(),
                          out.max_abs.numpy(), out.nonfinite.numpy(), out.zeros.numpy())
        return out

    def clip_in_place(self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float) -> None:
        _cpu.clip_in_place(*ws.table(), None if coef is None else coef.numpy(), clip_value)
