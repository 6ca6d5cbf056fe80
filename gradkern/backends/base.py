"""The contract every backend fulfils, and the per-tensor statistics it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .._norms import NormSpec

if TYPE_CHECKING:
    from .._table import WorkSet


@dataclass
class RawStats:
    """Per-tensor results of one read pass, one entry per tensor, on the tensors' device.

    ``power_sum`` holds what ``NormSpec.kind`` accumulates (sum |g|, sum g^2, sum |g|^p, or
    min |g|); it and ``max_abs`` are NaN for a tensor that holds a NaN. float64 throughout,
    counts int64.
    """

    power_sum: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor
    zeros: torch.Tensor


def empty_stats(n: int, device: torch.device | str = "cpu") -> RawStats:
    """Uninitialised output buffers for ``n`` tensors, for the kernels to fill."""
    f64, i64 = torch.float64, torch.int64
    return RawStats(torch.empty(n, dtype=f64, device=device),
                    torch.empty(n, dtype=f64, device=device),
                    torch.empty(n, dtype=i64, device=device),
                    torch.empty(n, dtype=i64, device=device))


class Backend(Protocol):
    """A set of kernels. Inputs are contiguous, dense, validated tensors on one device.

    Optional methods, looked up with ``getattr``: ``read_tensor_stats(tensors, spec)`` (read the
    table and run :meth:`tensor_stats` in one call; the C++ CPU backend) and
    ``element_counts(ws)`` (``ws.numel`` as a tensor on the device without a host sync; the CUDA
    backends). Without them the engine reads the table first and uses the host counts.
    """

    name: str
    # Whether the kernels work from the table alone (addresses, counts, dtype codes), so that
    # a table whose entries are not tensors (a unit table, one entry per row) can be passed;
    # False for the reference, which runs torch ops on ``ws.work``.
    reads_tables: bool

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        """One read pass over every tensor."""
        ...

    def clip_in_place(
        self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float
    ) -> None:
        """Multiply tensor i by ``coef[i]`` (or ``coef[0]`` if it has one entry) where the
        coefficient is not >= 1, then clamp to [-clip_value, clip_value] (``inf``: no clamp).
        ``coef`` is float64 on the tensors' device, or None for no scaling."""
        ...
