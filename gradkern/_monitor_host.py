"""The Monitor's host side: windows of buffered steps, once their copies have arrived, become
step records (:class:`StepStats`); the detectors run on them one step at a time, in step
order, and the sinks receive them in the record schema below.

Only rank 0 of a process group writes to the sinks; every rank keeps the history and runs the
detectors, so that every rank knows the same events.
"""

from __future__ import annotations

import numpy as np

from ._monitor_ring import SKIPPED_BY_SCALER, SKIPPED_NONFINITE, Window
from .detectors import Detector, StepStats
from .events import Event
from .layers import LayerMap
from .sinks import Sink

# Histograms of log2|g| (log steps, when a sink asks for them): one bin per power of two over
# the whole fp32 range; fp64 values beyond it land in the end bins.
HIST_MIN, HIST_MAX = -150, 130
HIST_BINS = HIST_MAX - HIST_MIN


def skip_reason(code: int) -> str | None:
    """The ``skip_reason`` of a step record: ``"grad_scaler"`` (GradScaler found inf/NaN),
    ``"nonfinite"`` (``skip_nonfinite=True``), or None (the step was applied)."""
    if code & SKIPPED_BY_SCALER:
        return "grad_scaler"
    return "nonfinite" if code & SKIPPED_NONFINITE else None


class HostPipeline:
    """Windows in flight, and what became of those that arrived: the history, the events and
    the count of skipped steps."""

    def __init__(self, detectors: list[Detector], sinks: list[Sink], keep_history: int,
                 rank: int = 0, world: int = 1):
        self.detectors = detectors
        self.sinks = sinks if rank == 0 else []  # where this rank writes
        self.keep_history = keep_history
        self.world = world
        self.events: list[Event] = []
        self.history: list[StepStats] = []
        self.skipped_steps = 0
        self._pending: list[Window] = []

    def start(self, header: dict) -> None:
        """Give the sinks the run's header record, before any step."""
        for sink in self.sinks:
            sink.start(header)

    def push(self, window: Window) -> None:
        """Queue a window; process every one that has arrived (the newest may wait for the
        next log step, so that the host never stalls on the copy it just started)."""
        self._pending.append(window)
        self.drain(block=False)

    def drain(self, block: bool = True) -> None:
        """Process the windows that have arrived (all of them when ``block``), then flush the
        sinks."""
        while self._pending:
            window = self._pending[0]
            if not window.wait(block=block or len(self._pending) > 1):
                return  # still in flight: handled at the next log step
            self._pending.pop(0)
            self._process(window)
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def _process(self, window: Window) -> None:
        rows = window.rows.numpy()
        flags = None if window.ranks_and_numel is None else window.ranks_and_numel.numpy()
        device_codes = None if window.device_skips is None else window.device_skips.numpy()
        factors = None if window.clip_factors is None else window.clip_factors.numpy()
        for k, (slot, row) in enumerate(zip(window.slots, rows)):
            code = slot.skipped | (0 if device_codes is None else int(device_codes[k]))
            reason = skip_reason(code)
            s = StepStats(step=slot.step, grad_sq=row[:, 0], grad_max=row[:, 1],
                          nonfinite=row[:, 2], zeros=row[:, 3],
                          numel=slot.numel.astype(np.float64), skipped=reason is not None,
                          skip_reason=reason)
            if reason is not None:
                self.skipped_steps += 1
            if factors is not None and slot.index is not None and reason is None:
                s.clip_factor = float(factors[k])
            if flags is not None:  # reduced across the group: flags, then element counts
                s.nonfinite_ranks = [int(r) for r in np.flatnonzero(flags[k, :self.world])]
                s.numel = flags[k, self.world:].copy()
            if slot.step in window.histograms:
                s.log2_histogram = window.histograms[slot.step].numpy()
            if slot.step in window.updates:
                w_sq, d_sq = window.updates[slot.step].numpy()
                s.weight_norm = np.sqrt(w_sq)
                with np.errstate(invalid="ignore", divide="ignore"):
                    s.update_ratio = np.sqrt(d_sq) / s.weight_norm
            self.history.append(s)
            if len(self.history) > self.keep_history:
                del self.history[: len(self.history) - self.keep_history]
            for sink in self.sinks:
                sink.write(step_record(s, window.layers))
            for detector in self.detectors:
                for event in detector.observe(s, window.layers):
                    self.events.append(event)
                    for sink in self.sinks:
                        sink.write({"type": "event", **event.as_dict()})


def step_record(s: StepStats, layer_map: LayerMap) -> dict:
    """A step as the sinks receive it (see :mod:`gradkern.sinks`): the total norm, whether and
    why it was skipped, and per layer the gradient norm, RMS, max |g|, non-finite count and
    zero fraction (with the weight norm and update ratio on log steps that measured them)."""
    rms = s.grad_rms
    layers = {}
    for i, name in enumerate(layer_map.names):
        if s.numel[i] == 0:
            continue
        entry = {"grad_norm": float(np.sqrt(s.grad_sq[i])), "grad_rms": float(rms[i]),
                 "grad_max": float(s.grad_max[i]), "nonfinite": int(s.nonfinite[i]),
                 "zero_fraction": float(s.zeros[i] / s.numel[i])}
        if s.update_ratio is not None:
            entry["weight_norm"] = float(s.weight_norm[i])
            entry["update_ratio"] = float(s.update_ratio[i])
        layers[name] = entry
        if s.log2_histogram is not None:
            entry["log2_hist"] = s.log2_histogram[i].astype(int).tolist()
    record = {"type": "step", "step": s.step, "total_norm": s.total_norm,
              "skipped": s.skipped, "layers": layers}
    if s.skipped:
        record["skip_reason"] = s.skip_reason
    if s.clip_factor is not None:
        record["clipped"] = s.clip_factor < 1.0
        record["clip_factor"] = s.clip_factor
    if s.log2_histogram is not None:
        record["log2_hist_range"] = [HIST_MIN, HIST_MAX]
    return record
