"""The pure-torch backend: the semantic reference, and the path for any device without kernels.

Plain torch ops in float64, one tensor at a time. Slow, obviously right, and free of host syncs
(everything stays on the tensors' device).
"""

from __future__ import annotations

import torch

from .._norms import NormKind, NormSpec
from .._table import WorkSet
from .base import RawStats


class TorchBackend:
    name = "torch"
    reads_tables = False

    def tensor_stats(self, ws: WorkSet, spec: NormSpec) -> RawStats:
        device = ws.work[0].device
        f64 = dict(dtype=torch.float64, device=device)
        power, max_abs, nonfinite, zeros = [], [], [], []
        for t in ws.work:
            a = t.detach().reshape(-1).to(torch.float64).abs()
            has_nan = torch.isnan(a).any()
            if spec.kind == NormKind.L1:
                power.append(a.sum())
            elif spec.kind == NormKind.L2:
                power.append(a.square().sum())
            elif spec.kind == NormKind.POWER:
                power.append(a.pow(spec.p).sum())
            elif spec.kind == NormKind.MIN_ABS:
                m = a.amin() if a.numel() else torch.tensor(float("inf"), **f64)
                power.append(torch.where(has_nan, torch.nan, m))
            else:
                power.append(torch.zeros((), **f64))
            m = a.amax() if a.numel() else torch.zeros((), **f64)
            max_abs.append(torch.where(has_nan, torch.nan, m))
            nonfinite.append((~torch.isfinite(a)).sum())
            zeros.append((a == 0).sum())
        return RawStats(
            torch.stack(power), torch.stack(max_abs), torch.stack(nonfinite), torch.stack(zeros)
        )

    def clip_in_place(
        self, ws: WorkSet, coef: torch.Tensor | None, clip_value: float
    ) -> None:
        for i, t in enumerate(ws.work):
            if coef is not None:
                k = coef[0] if coef.numel() == 1 else coef[i]
                # A coefficient >= 1 leaves the tensor alone; NaN poisons it (as torch does).
                t.copy_(torch.where(k >= 1, t, t * k.to(torch.float64)))
            if clip_value != float("inf"):
                t.clamp_(-clip_value, clip_value)
