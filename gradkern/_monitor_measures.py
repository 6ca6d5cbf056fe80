"""What the Monitor measures on log steps only: each layer's weight norm and update/weight
ratio (a copy of the weights before the update, compared after it) and histograms of log2|g|
(when a sink asks for them). Both are extra read passes, so they run once per ``log_every``
steps, and their results travel to the host with that window's rows.
"""

from __future__ import annotations

import torch

from . import _norms, distributed
from ._grad_set import GradSet
from ._monitor_host import HIST_BINS, HIST_MAX, HIST_MIN
from ._monitor_ring import DeviceRing


def log2_histograms(grads: list[torch.Tensor], index: torch.Tensor, n_layers: int,
                    inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of log2|g| per layer, ``(n_layers, HIST_BINS)`` float64, one bin per power of two
    (zeros and NaN/inf left out: the zero and non-finite counts already say how many there
    are). ``index``: the layer of each gradient. ``inv_scale``: the gradients are still scaled
    by GradScaler, by its inverse."""
    out = torch.zeros(n_layers, HIST_BINS, dtype=torch.float64, device=index.device)
    for k, g in enumerate(grads):
        a = g.detach().reshape(-1).abs().float()
        if inv_scale is not None:
            a = a * inv_scale.to(torch.float32)
        a = a[(a > 0) & a.isfinite()]
        exponent = a.log2().clamp_(HIST_MIN, HIST_MAX - 0.5)
        counts = torch.histc(exponent, bins=HIST_BINS, min=HIST_MIN, max=HIST_MAX)
        out[index[k]] += counts.to(torch.float64)
    return out


def _empty_like_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like ``tensors``, cut from one allocation per device and
    dtype: one allocator call and one block instead of one per tensor."""
    by_kind: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    out: list = [None] * len(tensors)
    for (device, dtype), positions in by_kind.items():
        sizes = [tensors[i].numel() for i in positions]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        for i, part in zip(positions, flat.split(sizes)):
            out[i] = part.view(tensors[i].shape)
    return out


class UpdateTracker:
    """Weight norms and update/weight ratios per layer: :meth:`before` copies this rank's part
    of the weights before the update, :meth:`after` measures the difference."""

    def __init__(self) -> None:
        self._snapshot: tuple | None = None  # (present, params, weights before the update)
        self._cpu_buffers: tuple | None = None  # (present, buffers) kept for CPU weights

    @property
    def pending(self) -> bool:
        return self._snapshot is not None

    def forget(self) -> None:
        """Drop a snapshot whose step never completed."""
        self._snapshot = None

    def reset(self) -> None:
        """New layers: the kept CPU buffers no longer fit."""
        self._snapshot = self._cpu_buffers = None

    def before(self, params: list[torch.nn.Parameter], present: tuple[int, ...] | None) -> None:
        """Copy the weights of ``params`` (the watched parameters at positions ``present``,
        None: all of them)."""
        if not params:  # no gradient this step, so no update to measure
            return
        weights = distributed.local_to_read(params)
        kept = self._cpu_buffers
        if (kept is not None and kept[0] == present and weights[0].device.type == "cpu"
                and all(c.dtype == w.dtype for c, w in zip(kept[1], weights))):
            copies = kept[1]  # (a model moved to another device or dtype gets new ones)
        else:
            copies = _empty_like_all(weights)
            if weights[0].device.type == "cpu":
                # On the CPU a fresh copy of the weights at every log step costs a page fault
                # per 4 KiB (the allocator hands large blocks back to the OS), so the buffers
                # stay. On a GPU the caching allocator reuses the blocks, and between log steps
                # the memory serves the activations.
                self._cpu_buffers = (present, copies)
        torch._foreach_copy_(copies, weights)
        self._snapshot = (present, params, copies)

    def after(self, ring: DeviceRing) -> torch.Tensor:
        """``(2, layers)`` float64 on the device: weight^2 and update^2 summed per layer
        (square roots are taken on the host)."""
        present, params, before = self._snapshot
        self._snapshot = None
        w_raw, _ = GradSet.of_local(before).local_stats(_norms.L2, counts=False)
        torch._foreach_sub_(before, distributed.local_to_read(params))  # before becomes -update
        d_raw, _ = GradSet.of_local(before).local_stats(_norms.L2, counts=False)
        index, _ = ring.layers_of(present, w_raw.power_sum.device, before)
        sums = torch.stack([w_raw.power_sum, d_raw.power_sum])
        return torch.zeros(2, len(ring.layers), dtype=torch.float64,
                           device=index.device).index_add_(1, index, sums)
