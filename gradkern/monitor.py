"""gk.Monitor: per-layer gradient health every step, on the device; detectors every log step.

Every optimizer step the Monitor runs the fused stats kernel once over all gradients (sum of
squares, max |g|, non-finite and zero counts per tensor), reduces them to layers with
``index_add_`` on the device, and writes one row of a ring buffer; clipping, when asked for,
reuses those statistics (no second read pass). Nothing is read back to the host until the
ring is full: every ``log_every`` steps the buffered rows are copied back in one transfer
(asynchronously on CUDA, processed at the next log step), then the detectors and sinks run.
The one exception is ``skip_nonfinite=True``, which must know before the update whether to skip
it: that costs one host read of a flag per step, as ``torch.amp.GradScaler`` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from . import _engine
from ._norm_spec import parse_norm_type
from .clippers import Clipper, _Grads, as_clipper
from .detectors import Detector, StepStats, default_detectors
from .events import Event
from .layers import LayerMap
from .sinks import Sink, as_sink

__all__ = ["Monitor"]

_FIELDS = 4  # grad_sq, grad_max, nonfinite, zeros
_L2 = parse_norm_type(2.0)


class _SkipStep(Exception):
    """Raised by the pre-step hook to stop the optimizer's update; caught by the step wrapper."""


class Monitor:
    """Watch the gradients of ``model`` at every optimizer step; detect, clip, log.

    Args:
        model: the module whose trainable parameters are watched.
        optimizer: when given, the Monitor registers step pre/post hooks on it, so a plain
            ``loss.backward(); optimizer.step()`` is observed with the gradients the optimizer
            really uses (after ``GradScaler.unscale_``). Without one, call :meth:`step` after
            backward.
        log_every: steps buffered on the device between host reads. Default 10.
        sinks: where records and events go: ``gk.sinks.JSONL(path)``,
            ``gk.sinks.TensorBoard(...)``, or any callable taking a dict.
        detectors: ``"default"`` (every rule in :mod:`gradkern.detectors` with its defaults),
            a list of detector instances, or ``None`` for none.
        clip: ``None``, a float (global max L2 norm), or a clipper (``gk.ClipByNorm``,
            ``gk.ClipByValue``, ``gk.AGC``, ``gk.AutoClip``, ``gk.ZClip``).
        skip_nonfinite: when the gradients hold NaN/inf, do not apply the step (weights and
            optimizer state stay as they were), zero the gradients and record an event; needs an
            optimizer. Costs one host sync per step.
        group_by: ``"module"`` (layers are modules: ``encoder.layers.3.mlp.fc1``) or
            ``"parameter"``.
        track_updates: on log steps, also measure each layer's weight norm and
            update/weight ratio (needs an optimizer; keeps a copy of the weights for that one
            step). Default True.

    Attributes:
        events: every :class:`gradkern.Event` so far.
        skipped_steps: steps not applied because of non-finite gradients.
        history: the per-step host records so far (list of :class:`StepStats`), at most
            ``keep_history`` of them (default 10,000).

    Example:
        >>> import torch, gradkern as gk
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gk.Monitor(model, opt, log_every=5, clip=1.0) as mon:
        ...     for _ in range(10):
        ...         opt.zero_grad()
        ...         model(torch.randn(16, 4)).pow(2).mean().backward()
        ...         opt.step()
        >>> len(mon.history), mon.layers.names
        (10, ['0', '2'])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        log_every: int = 10,
        sinks: Iterable = (),
        detectors: str | Iterable[Detector] | None = "default",
        clip: float | Clipper | None = None,
        skip_nonfinite: bool = False,
        group_by: str = "module",
        track_updates: bool = True,
        keep_history: int = 10_000,
    ):
        if int(log_every) < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if skip_nonfinite and optimizer is None:
            raise ValueError("skip_nonfinite=True needs the optimizer (the Monitor must be able "
                             "to stop its step)")
        self.layers = LayerMap.from_model(model, group_by)
        self.optimizer = optimizer
        self.log_every = int(log_every)
        self.sinks: list[Sink] = [as_sink(s) for s in sinks]
        if detectors == "default":
            self.detectors: list[Detector] = default_detectors()
        elif detectors is None:
            self.detectors = []
        elif isinstance(detectors, str):
            raise ValueError(f"detectors must be 'default', None or a list; got {detectors!r}")
        else:
            self.detectors = list(detectors)
        self.clipper = as_clipper(clip)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.track_updates = bool(track_updates) and optimizer is not None
        self.keep_history = int(keep_history)

        self.events: list[Event] = []
        self.history: list[StepStats] = []
        self.skipped_steps = 0
        self.steps = 0  # optimizer steps observed (skipped ones included)

        n_layers = len(self.layers)
        self._param_layer = np.asarray(self.layers.layer_of, dtype=np.int64)
        self._param_numel = np.asarray([p.numel() for p in self.layers.params], dtype=np.int64)
        self._ring: torch.Tensor | None = None  # (log_every, layers, _FIELDS) float64
        self._ring_numel = np.zeros((self.log_every, n_layers), dtype=np.int64)
        self._ring_steps: list[int] = []
        self._ring_skipped: list[bool] = []
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._snapshot: tuple[list[int], list[torch.Tensor]] | None = None
        self._pending: list[tuple] = []  # (ready event, host rows, step meta, updates) in flight
        self._hooks = []
        self._wrapped_step = None
        self._closed = False
        if optimizer is not None:
            self._attach(optimizer)

    # ---- wiring --------------------------------------------------------------------------

    def _attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hooks.append(optimizer.register_step_post_hook(self._post_step))
        if self.skip_nonfinite:
            original = optimizer.step  # bound method (possibly already wrapped by a scheduler)

            def step(*args, **kwargs):
                try:
                    return original(*args, **kwargs)
                except _SkipStep:
                    return None

            self._wrapped_step = original
            optimizer.step = step

    def close(self) -> None:
        """Process what is buffered, flush and close the sinks, and detach from the optimizer."""
        if self._closed:
            return
        self._flush_ring()
        self._drain()
        for h in self._hooks:
            h.remove()
        if self._wrapped_step is not None:
            self.optimizer.step = self._wrapped_step
        for sink in self.sinks:
            sink.close()
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- per step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Observe the current gradients (and clip them) when there is no optimizer to hook.

        Call it after ``backward()`` and before applying the update.
        """
        if self.optimizer is not None:
            raise RuntimeError("this Monitor is attached to an optimizer; its steps are observed "
                               "automatically, do not call mon.step() as well")
        self._observe()
        self._end_step()

    def _pre_step(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            if self._observe():
                self._end_step()
                raise _SkipStep()
            if self.track_updates and len(self._ring_steps) == self.log_every:
                self._take_snapshot()

    def _post_step(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            if self._snapshot is not None:
                self._measure_updates()
            self._end_step()

    def _observe(self) -> bool:
        """Stats of the current grads into the ring, then clip. True when the step is skipped."""
        present = [i for i, p in enumerate(self.layers.params) if p.grad is not None]
        slot = len(self._ring_steps)
        self._ring_steps.append(self.steps)
        self._ring_skipped.append(False)
        self._ring_numel[slot] = 0
        if not present:
            if self._ring is not None:
                self._ring[slot].zero_()
            return False
        params = [self.layers.params[i] for i in present]
        g = _engine.gather([p.grad for p in params], None)
        raw, numel = _engine.tensor_stats(g, _L2)
        device = raw.power_sum.device
        if self._ring is None:
            self._ring = torch.zeros(self.log_every, len(self.layers), _FIELDS,
                                     dtype=torch.float64, device=device)
        index = self._layer_index(tuple(present), device)
        row = self._ring[slot]
        row.zero_()
        row[:, 0].index_add_(0, index, raw.power_sum)
        row[:, 1].scatter_reduce_(0, index, raw.max_abs, "amax")
        row[:, 2].index_add_(0, index, raw.nonfinite.to(torch.float64))
        row[:, 3].index_add_(0, index, raw.zeros.to(torch.float64))
        np.add.at(self._ring_numel[slot], self._param_layer[present], self._param_numel[present])

        if self.skip_nonfinite and bool(row[:, 2].sum() > 0):  # the one host sync, by request
            for p in params:
                p.grad.zero_()
            self._ring_skipped[slot] = True
            self.skipped_steps += 1
            return True
        if self.clipper is not None:
            self.clipper._clip(_Grads(params, g, raw, numel))
        return False

    def _layer_index(self, present: tuple, device: torch.device) -> torch.Tensor:
        key = (present, device)
        index = self._index_cache.get(key)
        if index is None:
            index = torch.as_tensor(self._param_layer[list(present)], device=device)
            self._index_cache = {key: index}  # the set of params with grads rarely changes
        return index

    def _end_step(self) -> None:
        self.steps += 1
        if len(self._ring_steps) == self.log_every:
            self._flush_ring()

    # ---- update/weight ratios (log steps only) ---------------------------------------------

    def _take_snapshot(self) -> None:
        present = [i for i, p in enumerate(self.layers.params) if p.grad is not None]
        self._snapshot = (present, [self.layers.params[i].detach().clone() for i in present])

    def _measure_updates(self) -> None:
        present, before = self._snapshot
        self._snapshot = None
        after = [self.layers.params[i].detach() for i in present]
        w_raw, _ = _engine.tensor_stats(_engine.gather(before, None), _L2)
        torch._foreach_sub_(before, after)  # the snapshot becomes -update: no second copy
        d_raw, _ = _engine.tensor_stats(_engine.gather(before, None), _L2)
        index = self._layer_index(tuple(present), w_raw.power_sum.device)
        n = len(self.layers)
        w_sq = torch.zeros(n, dtype=torch.float64, device=index.device).index_add_(
            0, index, w_raw.power_sum)
        d_sq = torch.zeros_like(w_sq).index_add_(0, index, d_raw.power_sum)
        weight_norm = w_sq.sqrt()
        self._updates[self.steps] = (weight_norm, d_sq.sqrt() / weight_norm)

    # ---- host side -------------------------------------------------------------------------

    def _flush_ring(self) -> None:
        """Start the copy of the buffered rows to the host; process what has arrived."""
        count = len(self._ring_steps)
        if count == 0:
            return
        meta = [(self._ring_steps[i], self._ring_skipped[i], self._ring_numel[i].copy())
                for i in range(count)]
        updates = {s: self._updates.pop(s) for s, _, _ in meta if s in self._updates}
        if self._ring is None:  # no gradient at all so far
            host, ready = torch.zeros(count, len(self.layers), _FIELDS, dtype=torch.float64), None
            update_host = {}
        elif self._ring.device.type == "cuda":
            host = torch.empty((count, len(self.layers), _FIELDS), dtype=torch.float64,
                               pin_memory=True)
            host.copy_(self._ring[:count], non_blocking=True)
            update_host = {s: (w.to("cpu", non_blocking=True), r.to("cpu", non_blocking=True))
                           for s, (w, r) in updates.items()}
            ready = torch.cuda.Event()
            ready.record()
            # The ring is rewritten from the next step on; the copy must finish first. Later
            # work on the stream is ordered after it, so no host wait is needed here.
        else:
            host, ready = self._ring[:count].clone(), None
            update_host = updates
        self._ring_steps, self._ring_skipped = [], []
        self._pending.append((ready, host, meta, update_host))
        self._drain(block=False)

    def _drain(self, block: bool = True) -> None:
        """Process the copies that have arrived (all of them when ``block``)."""
        while self._pending:
            ready, host, meta, updates = self._pending[0]
            if ready is not None and not ready.query():
                if not block and len(self._pending) == 1:
                    return  # still in flight: handled at the next log step
                ready.synchronize()
            self._pending.pop(0)
            self._process(host.numpy(), meta, updates)
        for sink in self.sinks:
            sink.flush()

    def _process(self, rows: np.ndarray, meta: list, updates: dict) -> None:
        for (step, skipped, numel), row in zip(meta, rows):
            s = StepStats(step=step, grad_sq=row[:, 0], grad_max=row[:, 1], nonfinite=row[:, 2],
                          zeros=row[:, 3], numel=numel.astype(np.float64), skipped=skipped)
            if step in updates:
                weight_norm, ratio = updates[step]
                s.weight_norm, s.update_ratio = weight_norm.numpy(), ratio.numpy()
            self.history.append(s)
            if len(self.history) > self.keep_history:
                del self.history[: len(self.history) - self.keep_history]
            for sink in self.sinks:
                sink.write(self._record(s))
            for detector in self.detectors:
                for event in detector.observe(s, self.layers):
                    self.events.append(event)
                    for sink in self.sinks:
                        sink.write({"type": "event", **event.as_dict()})

    def _record(self, s: StepStats) -> dict:
        rms = s.grad_rms
        layers = {}
        for i, name in enumerate(self.layers.names):
            if s.numel[i] == 0:
                continue
            entry = {"grad_norm": float(np.sqrt(s.grad_sq[i])), "grad_rms": float(rms[i]),
                     "grad_max": float(s.grad_max[i]), "nonfinite": int(s.nonfinite[i]),
                     "zero_fraction": float(s.zeros[i] / s.numel[i])}
            if s.update_ratio is not None:
                entry["weight_norm"] = float(s.weight_norm[i])
                entry["update_ratio"] = float(s.update_ratio[i])
            layers[name] = entry
        return {"type": "step", "step": s.step, "total_norm": s.total_norm,
                "skipped": s.skipped, "layers": layers}

