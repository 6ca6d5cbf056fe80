"""The Monitor's device ring: per-tensor statistics of the last ``log_every`` steps, kept on the
gradients' device, reduced to layers and started on their way to the host at each log step.

A step costs one ``_foreach_copy_`` of four per-tensor fields into its slot. At a log step the
slots are reduced to layers (one ``index_add_`` over runs of slots with the same parameters),
reduced across the ranks of a process group when there is one (two packed collectives), and
copied to the host asynchronously on CUDA. What travels to the host is a :class:`Window`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .backends import RawStats
from .layers import LayerMap

FIELDS = 4  # per tensor and per layer: sum g^2, max |g|, non-finite count, zero count
# Why a step was skipped, as bits of a slot's code (known on the host or, for a fused step,
# decided on the device and read back with the rows). GradScaler's reason wins when both hold:
# it would have skipped the step anyway.
SKIPPED_NONFINITE, SKIPPED_BY_SCALER = 1, 2


@dataclass
class Slot:
    """One buffered step, as the host knows it."""

    step: int
    skipped: int  # skip reasons known on the host (bits)
    numel: np.ndarray  # element count of each layer, this step
    index: torch.Tensor | None  # the layer of each of its columns; None: no gradient


@dataclass
class Window:
    """A log step's buffered steps on their way to the host: the copies may still be in flight
    until ``ready`` (a CUDA event; None once they are on the host)."""

    ready: object  # torch.cuda.Event | None
    rows: torch.Tensor  # (steps, layers, FIELDS) float64, on the host
    slots: list[Slot]
    updates: dict[int, torch.Tensor]  # step -> (2, layers): weight^2 and update^2 per layer
    histograms: dict[int, torch.Tensor]  # step -> (layers, bins) counts of log2|g|
    ranks_and_numel: torch.Tensor | None  # per step: a flag per rank (non-finite values), then
    #   the whole layers' element counts; with a group only
    device_skips: torch.Tensor | None  # per step: skip reasons decided on the device (bits)
    layers: LayerMap  # the layers the rows are of
    clip_factors: torch.Tensor | None = None  # per step, with a clipper: the smallest factor
    #   it scaled a gradient by (1: nothing clipped); across a group, the smallest on any rank

    def wait(self, block: bool) -> bool:
        """Whether the copies have arrived; with ``block``, waits for them first."""
        if self.ready is None or self.ready.query():
            return True
        if block:
            self.ready.synchronize()
            return True
        return False


class DeviceRing:
    """``log_every`` slots of per-tensor statistics on the device, and what each slot's step
    needs at the flush."""

    def __init__(self, log_every: int, layers: LayerMap, group=None, clips: bool = False):
        self.log_every = log_every
        self.group = group
        self.clips = clips  # a clipper acts: each slot records its factor
        self._clip: torch.Tensor | None = None  # per slot: the clip factor, on the device
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.slots: list[Slot] = []
        self._skip: torch.Tensor | None = None  # per slot: reasons decided on the device
        self._device_skips = False  # whether a slot of this window wrote _skip
        self.reset(layers)

    def reset(self, layers: LayerMap) -> None:
        """Start over with ``layers`` (after a flush)."""
        self.layers = layers
        self._param_layer = np.asarray(layers.layer_of, dtype=np.int64)
        # per-tensor stats of each buffered step: (log_every, FIELDS, watched params) float64,
        # the first n_present columns of a slot used; reduced to layers at the flush
        self._ring: torch.Tensor | None = None
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (slot, n) -> fields
        self._layer_cache: tuple | None = None  # (present, device), (layer index, counts)

    @property
    def full(self) -> bool:
        return len(self.slots) == self.log_every

    @property
    def last_slot(self) -> bool:
        """Whether the next slot recorded is the last of the window (a log step)."""
        return len(self.slots) == self.log_every - 1

    def empty_slot(self, step: int) -> None:
        """A step with no gradient: its row stays zero."""
        self.slots.append(Slot(step, 0, np.zeros(len(self.layers), dtype=np.int64), None))

    def record(self, step: int, present: tuple[int, ...] | None, raw: RawStats,
               local_grads: list[torch.Tensor]) -> tuple[int, torch.Tensor]:
        """Copy a step's per-tensor statistics into the next slot; returns the slot and the
        layer of each gradient (on the statistics' device)."""
        slot = len(self.slots)
        device = raw.power_sum.device
        n = len(local_grads)
        if self._ring is None:
            self._ring = torch.empty(self.log_every, FIELDS, len(self.layers.params),
                                     dtype=torch.float64, device=device)
        index, layer_numel = self.layers_of(present, device, local_grads)
        self.slots.append(Slot(step, 0, layer_numel, index))
        fields = self._views.get((slot, n))
        if fields is None:  # made once per slot and size (a view costs microseconds)
            fields = list(self._ring[slot, :, :n].unbind(0))
            self._views[(slot, n)] = fields
        # one call for the four copies (the counts become float64 on the way)
        torch._foreach_copy_(fields, [raw.power_sum, raw.max_abs, raw.nonfinite, raw.zeros])
        return slot, index

    def skip_on_device(self, slot: int, reason: torch.Tensor) -> None:
        """Note the reasons (bits, float64 0-dim on the device) the slot's step is skipped for,
        decided on the device; read back with the rows."""
        if self._skip is None or self._skip.device != reason.device:
            self._skip = torch.zeros(self.log_every, dtype=torch.float64, device=reason.device)
        self._skip[slot] = reason
        self._device_skips = True

    def note_clip(self, slot: int, factor: torch.Tensor) -> None:
        """The smallest factor the clipper scaled a gradient by at the slot's step (0-dim, on
        the device; 1 when it changed nothing)."""
        if self._clip is None or self._clip.device != factor.device:
            self._clip = torch.ones(self.log_every, dtype=torch.float64, device=factor.device)
        self._clip[slot] = factor

    def layers_of(self, present: tuple[int, ...] | None, device: torch.device,
                  local_grads: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """The layer of each present gradient (on ``device``, for the index_add_) and the
        element count of each layer; kept while the same parameters have gradients (a
        gradient's shape is its parameter's, so the counts cannot change meanwhile)."""
        key = (present, device)
        if self._layer_cache is not None and self._layer_cache[0] == key:
            return self._layer_cache[1]
        layer_of = self._param_layer if present is None else self._param_layer[list(present)]
        layer_numel = np.zeros(len(self.layers), dtype=np.int64)
        np.add.at(layer_numel, layer_of,
                  np.fromiter(map(torch.Tensor.numel, local_grads), np.int64,
                              len(local_grads)))
        hit = torch.as_tensor(layer_of, device=device), layer_numel
        self._layer_cache = (key, hit)  # the set of params with grads rarely changes
        return hit

    def take_window(self, updates: dict[int, torch.Tensor],
                    histograms: dict[int, torch.Tensor]) -> Window | None:
        """The buffered steps reduced to layers (and across the group), with the log steps'
        update and histogram measurements, on their way to the host; the ring is empty
        afterwards. None when nothing is buffered."""
        count = len(self.slots)
        if count == 0:
            return None
        slots, self.slots = self.slots, []
        skips = None
        if self._device_skips:
            skips = self._skip[:count].clone()
            self._skip.zero_()
            self._device_skips = False
        if self.group is not None and histograms:  # counts add up across ranks
            steps = sorted(histograms)
            stacked = torch.stack([histograms[s] for s in steps])
            dist.all_reduce(stacked, group=self.group)
            histograms = dict(zip(steps, stacked))
        factors = None
        if self.clips:
            factors = (torch.ones(count, dtype=torch.float64) if self._clip is None
                       else self._clip[:count].clone())
            if self._clip is not None:
                self._clip.fill_(1.0)
        rows = None if self._ring is None else self._layer_rows(slots)
        ranks_and_numel = None
        if self.group is not None and rows is not None:
            rows, updates, ranks_and_numel, factors = self._reduce_across_ranks(
                rows, slots, updates, factors)
        if rows is None:  # no gradient at all so far
            host = torch.zeros(count, len(self.layers), FIELDS, dtype=torch.float64)
            return Window(None, host, slots, {}, histograms, ranks_and_numel, skips, self.layers,
                          None if factors is None else factors.cpu())
        if rows.device.type != "cuda":
            return Window(None, rows.clone(), slots, updates, histograms, ranks_and_numel, skips,
                          self.layers, None if factors is None else factors.cpu())
        host = torch.empty(rows.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(rows, non_blocking=True)

        def to_host(t):
            return None if t is None else t.to("cpu", non_blocking=True)

        ready = torch.cuda.Event()
        window = Window(ready, host, slots, {s: to_host(u) for s, u in updates.items()},
                        {s: to_host(h) for s, h in histograms.items()}, to_host(ranks_and_numel),
                        to_host(skips), self.layers, to_host(factors))
        ready.record()
        # The ring is rewritten from the next step on; the copy must finish first. Later work
        # on the stream is ordered after it, so no host wait is needed here.
        return window

    def _layer_rows(self, slots: list[Slot]) -> torch.Tensor:
        """The slots reduced to layers: (steps, layers, FIELDS) float64 on the ring's device.
        Runs of slots with the same layer index (the same parameters had gradients, the usual
        case: all of them) are reduced together."""
        count = len(slots)
        rows = torch.zeros(count, FIELDS, len(self.layers), dtype=torch.float64,
                           device=self._ring.device)
        start = 0
        while start < count:
            index = slots[start].index
            end = start + 1
            while end < count and slots[end].index is index:
                end += 1
            if index is not None:  # None: no gradient that step, its row stays zero
                part = self._ring[start:end, :, :len(index)]
                out = rows[start:end]
                out.index_add_(2, index, part)  # the sums and counts (and maxima, replaced next)
                out[:, 1].zero_().scatter_reduce_(1, index.expand(end - start, -1), part[:, 1],
                                                  "amax")
            start = end
        return rows.transpose(1, 2).contiguous()

    def _reduce_across_ranks(self, rows: torch.Tensor, slots: list[Slot], updates: dict,
                             factors: torch.Tensor | None):
        """Whole-model rows: sums and counts in one all_reduce, maxima in another. Also which
        ranks held non-finite values at each step, the whole layers' element counts, and the
        smallest clip factor of any rank (a maximum of negatives)."""
        count, n_layers = rows.shape[0], rows.shape[1]
        device, f64 = rows.device, torch.float64
        numel = torch.from_numpy(np.stack([s.numel for s in slots])).to(device, f64)
        flags = torch.zeros(count, self.world, dtype=f64, device=device)
        flags[:, self.rank] = rows[:, :, 2].sum(1)
        steps = sorted(updates)
        update_sq = (torch.stack([updates[s] for s in steps]) if steps
                     else torch.zeros(0, 2, n_layers, dtype=f64, device=device))
        maxima = rows[:, :, 1]
        nan = maxima.isnan()
        parts = [rows[:, :, 0], rows[:, :, 2], rows[:, :, 3], numel, nan.to(f64), flags, update_sq]
        sums = torch.cat([p.reshape(-1) for p in parts])
        maxes = torch.where(nan, torch.zeros_like(maxima), maxima).reshape(-1)
        if factors is not None:
            maxes = torch.cat([maxes, -factors.to(device)])
        else:
            maxes = maxes.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group)
        if factors is not None:
            maxes, factors = maxes[:count * n_layers], -maxes[count * n_layers:]
        sizes = [p.numel() for p in parts]
        sq, nonfinite, zeros, numel, nan_count, flags, update_sq = torch.split(sums, sizes)
        shape = (count, n_layers)
        maxes = maxes.reshape(shape)
        maxes = torch.where(nan_count.reshape(shape) > 0, torch.full_like(maxes, float("nan")),
                            maxes)
        reduced = torch.stack([sq.reshape(shape), maxes, nonfinite.reshape(shape),
                               zeros.reshape(shape)], dim=2)
        update_sq = update_sq.reshape(len(steps), 2, n_layers)
        # per step: which ranks held non-finite values, then the whole layers' element counts;
        # it stays on the device and travels with the rows (no host sync here)
        extra = torch.cat([flags.reshape(count, self.world), numel.reshape(shape)], dim=1)
        return reduced, dict(zip(steps, update_sq)), extra, factors
