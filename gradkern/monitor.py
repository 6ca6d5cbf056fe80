"""gk.Monitor: per-layer gradient health every step, on the device; detectors every log step.

Every optimizer step the Monitor runs the fused stats kernel once over all gradients (sum of
squares, max |g|, non-finite and zero counts per tensor) and copies them into one row of a ring
buffer on the device; clipping, when asked for, reuses those statistics (no second read pass).
Nothing is read back to the host until the ring is full: every ``log_every`` steps the buffered
rows are reduced to layers on the device (one ``index_add_`` over all of them) and copied back
in one transfer (asynchronously on CUDA, processed at the next log step), then the detectors and
sinks run. An ordinary step thus costs the host one table read, the stats pass's launches and
one ``_foreach_copy_``: on a host-bound GPU step that is what the Monitor's overhead is made of.
The one exception is ``skip_nonfinite=True`` with an optimizer that is not fused, which must
know before the update whether to skip it: that costs one host read of a flag per step, as
``torch.amp.GradScaler`` does. A fused optimizer is told to skip on the device instead (see
:mod:`gradkern._optimizer_step`).

The parts: this module takes part in the optimizer's steps (hooks, skips, clipping); the device
ring (:mod:`gradkern._monitor_ring`) buffers the statistics; the log-step measurements
(:mod:`gradkern._monitor_measures`) add update ratios and histograms; the host pipeline
(:mod:`gradkern._monitor_host`) turns arrived windows into records, events and sink output.
"""

from __future__ import annotations

import numbers
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone

import torch
import torch.distributed as dist

from . import _norms, distributed
from ._optimizer_step import (FusedStep, closure_of, drop_momentum_buffers,
                              first_fused_sgd_step, give_back, hold_grads, resolve_optimizer,
                              takes_grad_scale, with_closure)
from ._grad_set import GradSet, Intent
from ._monitor_host import HostPipeline, skip_reason
from ._monitor_measures import UpdateTracker, log2_histograms
from ._monitor_ring import SKIPPED_BY_SCALER, SKIPPED_NONFINITE, DeviceRing
from ._params import present_grads
from .backends import RawStats
from .clippers import ClipByNorm, Clipper, as_clipper
from .detectors import Detector, StepStats, default_detectors
from .events import Event
from .layers import LayerMap, registrations, watch_registrations
from .sinks import Sink, as_sink

__all__ = ["Monitor", "skip_reason"]

def _count_argument(value, what: str, minimum: int) -> int:
    """An integer argument (``2.5`` is refused, not rounded), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _unscale_(grads: list[torch.Tensor], inv_scale: torch.Tensor) -> None:
    """Multiply the gradients by GradScaler's inverse scale in place (the fused kernel would
    have), one foreach call per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        torch._foreach_mul_(same, inv_scale.to(same[0].device, torch.float32))


class _StepInProgress:
    """What the Monitor did to the optimizer step under way, for its post-step hook to undo or
    complete."""

    __slots__ = ("observed", "held", "fused", "momentum_check")

    def __init__(self):
        self.observed = False  # statistics taken (a closure step: once its closure has run)
        self.held: list = []  # gradients taken away so that a plain step skips
        self.fused: FusedStep | None = None
        self.momentum_check: list = []  # fused SGD parameters to look at after a first step


class Monitor:
    """Watch the gradients of ``model`` at every optimizer step; detect, clip, log.

    The Monitor observes the gradients the optimizer is about to apply, whatever the step looks
    like (it attaches through the optimizer's step hooks only, so LR schedulers see an
    untouched optimizer):

    * a plain ``optimizer.step()``, with or without gradient accumulation;
    * ``optimizer.step(closure)`` (Lightning, LBFGS): observed after the closure ran, once per
      step;
    * ``torch.amp.GradScaler`` with a foreach or plain optimizer (the gradients are unscaled
      before the step), and with a fused one (``fused=True`` Adam, AdamW, SGD, Adagrad), which
      unscales inside its own kernel: the statistics are divided by the scale on the device,
      ``clip`` folds its coefficient into the optimizer's ``grad_scale`` and
      ``skip_nonfinite`` sets its ``found_inf``, all without a host sync;
    * a wrapper that holds the optimizer as ``.optimizer`` (Accelerate, Lightning).

    Parameters the model or the optimizer gains later (a new module, ``add_param_group``,
    unfrozen weights) are watched and clipped from the next step on.

    Args:
        model: the module whose parameters are watched (a ``torch.compile``'d module is named
            after the module it compiles).
        optimizer: when given, the Monitor observes every step of it through its step hooks.
            Without one, call :meth:`step` after backward.
        log_every: steps buffered on the device between host reads (an int >= 1). Default 10.
        sinks: where records and events go: ``gk.sinks.JSONL(path)``,
            ``gk.sinks.TensorBoard(...)``, or any callable taking a dict.
        detectors: ``"default"`` (every rule in :mod:`gradkern.detectors` with its defaults),
            a list of detector instances, or ``None`` for none.
        clip: ``None``, a float (global max L2 norm), or a clipper (``gk.ClipByNorm``,
            ``gk.ClipByValue``, ``gk.AGC``, ``gk.AutoClip``, ``gk.ZClip``).
        skip_nonfinite: when the gradients hold NaN/inf, do not apply the step: weights and
            optimizer state stay as they were, the gradients are left as they are, and the step
            is recorded as skipped. Needs an optimizer. A fused optimizer skips on the device;
            any other costs one host read of a flag per step, as GradScaler does.
        scaler: the ``torch.amp.GradScaler`` of the loop, so that steps it skips (inf/NaN in
            the gradients: it then never calls a non-fused optimizer's ``step``) are recorded
            as skipped too and counted; without it they are not seen. Needs an optimizer.
        group_by: ``"module"`` (layers are modules: ``encoder.layers.3.mlp.fc1``) or
            ``"parameter"``.
        track_updates: on log steps, also measure each layer's weight norm and
            update/weight ratio (needs an optimizer; keeps a copy of the weights for that one
            step). Default True.
        keep_history: how many step records :attr:`history` keeps (an int >= 0). Default
            10,000.
        group: a ``torch.distributed`` process group whose ranks each hold a shard of the
            same model (FSDP-style; every rank builds the Monitor on the same module
            structure). The buffered statistics are reduced across the group at each log step
            (two packed collectives), so layers and totals describe the whole model; clipping
            and ``skip_nonfinite`` decide on the whole model too; sinks are written on rank 0
            only; non-finite events say which rank(s) held the bad values. DDP needs no group
            (its gradients are already identical on every rank). With FSDP2 (DTensor
            parameters) pass the group that shards them; the Monitor reads the local shards
            (and raises ValueError for sharded parameters without a group).

    Attributes:
        events: every :class:`gradkern.Event` so far.
        skipped_steps: steps not applied (``skip_nonfinite``, or GradScaler), counted as their
            records reach the host (every ``log_every`` steps, and at :meth:`close`).
        history: the per-step host records so far (list of :class:`StepStats`), at most
            ``keep_history`` of them. With a clipper, each says the smallest factor it scaled
            the gradients by (``clip_factor``; 1: nothing clipped), and so do the sinks' step
            records (``"clip_factor"``, ``"clipped"``).
        run_id: the id in the run's header record, which every sink receives first (a
            ``gk.sinks.JSONL`` file starts each run with it).

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer nor a wrapper holding one.
        ValueError: a bad ``log_every``, ``keep_history``, ``detectors`` or ``group_by``, or
            ``skip_nonfinite``/``scaler`` without an optimizer.

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
        scaler: torch.amp.GradScaler | None = None,
        group_by: str = "module",
        track_updates: bool = True,
        keep_history: int = 10_000,
        group=None,
    ):
        self.log_every = _count_argument(log_every, "log_every", minimum=1)
        self.keep_history = _count_argument(keep_history, "keep_history", minimum=0)
        if optimizer is None and (skip_nonfinite or scaler is not None):
            raise ValueError(("skip_nonfinite=True" if skip_nonfinite else "scaler=") +
                             " needs the optimizer (the Monitor must take part in its steps)")
        self.optimizer = None if optimizer is None else resolve_optimizer(optimizer)
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
        self.scaler = scaler
        self.track_updates = bool(track_updates) and optimizer is not None
        self.group = group
        self._model = model
        self._group_by = group_by
        watch_registrations()  # new modules and parameters, anywhere, bump a counter
        self._watched_version: tuple | None = None
        self.layers = self._layer_map()
        self.sinks: list[Sink] = [as_sink(s) for s in sinks]
        self.steps = 0  # optimizer steps observed (skipped ones included)

        self._ring = DeviceRing(self.log_every, self.layers, group,
                                clips=self.clipper is not None)
        self._host = HostPipeline(self.detectors, self.sinks, self.keep_history,
                                  self._ring.rank, self._ring.world)
        self.run_id = uuid.uuid4().hex[:12]
        self._host.start(self._header())
        self._tracker = UpdateTracker()
        self._updates: dict[int, torch.Tensor] = {}  # step -> (2, layers): weight^2, update^2
        self._want_histograms = any(getattr(s, "histograms", False) for s in self.sinks)
        self._histograms: dict[int, torch.Tensor] = {}  # step -> (layers, bins) counts
        self._hooks = []
        self._step_state: _StepInProgress | None = None  # from pre-step to post-step hook
        self._scaler_step = None  # (scaler, its own step attribute or None, the wrapper)
        self._closed = False
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._hooks.append(self.optimizer.register_step_post_hook(self._post_step))
        if scaler is not None:
            self._watch_scaler(scaler)

    def _header(self) -> dict:
        """The run's header record (the first line of a ``gk.sinks.JSONL`` file): who, when,
        what model, and the Monitor's settings, clip threshold included."""
        from . import __version__

        clipper = self.clipper
        threshold = None  # a fixed threshold for the total L2 norm, which a report can draw
        if (isinstance(clipper, ClipByNorm) and not clipper.per_tensor
                and clipper._spec == _norms.L2):
            threshold = clipper.max_norm
        return {
            "type": "run", "run_id": self.run_id,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gradkern": __version__, "model": type(self._model).__name__,
            "parameters": int(sum(self.layers.layer_numel)), "layers": len(self.layers),
            "layer_kinds": dict(zip(self.layers.names, self.layers.kinds)),
            "clip_threshold": threshold,
            "settings": {
                "log_every": self.log_every, "clip": None if clipper is None else repr(clipper),
                "skip_nonfinite": self.skip_nonfinite, "scaler": self.scaler is not None,
                "group_by": self._group_by, "track_updates": self.track_updates,
                "keep_history": self.keep_history,
                "detectors": [type(d).__name__ for d in self.detectors],
                "world_size": self._ring.world,
            },
        }

    @property
    def events(self) -> list[Event]:
        """Every :class:`gradkern.Event` so far."""
        return self._host.events

    @property
    def history(self) -> list[StepStats]:
        """The per-step host records so far, at most ``keep_history`` of them."""
        return self._host.history

    @property
    def skipped_steps(self) -> int:
        """Steps not applied, counted as their records reach the host."""
        return self._host.skipped_steps

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    # ---- which parameters ------------------------------------------------------------------

    def _layer_map(self) -> LayerMap:
        """The model's parameters, and those only the optimizer holds, grouped into layers."""
        extra = []
        if self.optimizer is not None:
            in_model = {id(p) for p in self._model.parameters()}
            for g, group in enumerate(self.optimizer.param_groups):
                extra += [(f"param_groups.{g}.params.{i}", p) for i, p in
                          enumerate(group["params"]) if id(p) not in in_model]
        layers = LayerMap.from_model(self._model, self._group_by, extra)
        if self.group is None:  # FSDP2 or tensor-parallel parameters without their group
            distributed.require_group_for_shards(layers.params, "the Monitor")
        self._watched_version = self._version()
        return layers

    def _version(self) -> tuple:
        """Changes when a module or parameter is registered anywhere, or the optimizer's
        parameter groups change: a few integer reads per step."""
        groups = self.optimizer.param_groups if self.optimizer is not None else ()
        return (registrations(), len(groups), sum(len(g["params"]) for g in groups))

    def _follow_new_parameters(self) -> None:
        """Rebuild the layers when parameters were added since the last step; the steps
        buffered so far are flushed first, under the layers they were recorded with."""
        if self._version() == self._watched_version:
            return
        layers = self._layer_map()
        if [id(p) for p in layers.params] == [id(p) for p in self.layers.params]:
            return
        self._flush_ring()
        self.layers = layers
        self._ring.reset(layers)
        self._tracker.reset()

    # ---- wiring --------------------------------------------------------------------------

    def _watch_scaler(self, scaler) -> None:
        """Wrap ``scaler.step`` (on this instance only) to see the steps it skips."""
        before = vars(scaler).get("step")
        original = scaler.step
        monitor = self

        def step(optimizer, *args, **kwargs):
            ours = monitor._is_ours(optimizer)
            steps = monitor.steps
            out = original(optimizer, *args, **kwargs)
            if ours and monitor.steps == steps and not monitor._closed:
                monitor._scaler_skipped()  # the optimizer's step never ran
            return out

        scaler.step = step
        self._scaler_step = (scaler, before, step)

    def _is_ours(self, optimizer) -> bool:
        try:
            return resolve_optimizer(optimizer) is self.optimizer
        except TypeError:
            return False

    def close(self) -> None:
        """Process what is buffered, flush and close the sinks, and detach from the optimizer
        (and the scaler). Further steps are not observed; :meth:`step` raises."""
        if self._closed:
            return
        self._flush_ring()
        self._host.drain()
        for h in self._hooks:
            h.remove()
        if self._scaler_step is not None:
            scaler, before, ours = self._scaler_step
            if vars(scaler).get("step") is ours:  # (not wrapped again since)
                if before is None:
                    del scaler.step
                else:
                    scaler.step = before
        self._host.close()
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

        Raises:
            RuntimeError: the Monitor is attached to an optimizer (its steps are observed
                automatically), or it is closed.
        """
        if self._closed:
            raise RuntimeError("this Monitor is closed; make a new one to keep watching")
        if self.optimizer is not None:
            raise RuntimeError("this Monitor is attached to an optimizer; its steps are observed "
                               "automatically, do not call mon.step() as well")
        self._follow_new_parameters()
        self._observe(None)
        self._end_step()

    def _pre_step(self, optimizer, args, kwargs):
        if self._step_state is not None:  # the previous step raised: undo, and count it
            unfinished, self._step_state = self._step_state, None
            give_back(unfinished.held)
            if unfinished.fused is not None:
                unfinished.fused.remove_added()
            self._tracker.forget()
            if unfinished.observed:
                self._end_step()
        state = self._step_state = _StepInProgress()
        closure = closure_of(args, kwargs)
        if closure is None:
            with torch.no_grad():
                self._before_update(optimizer, state)
            return None

        def observed_closure():
            loss = closure()
            if not state.observed:  # LBFGS calls it again in its line search
                with torch.no_grad():
                    self._before_update(optimizer, state)
            return loss

        return with_closure(args, kwargs, observed_closure)

    def _before_update(self, optimizer, state: _StepInProgress) -> None:
        """The gradients are final: statistics, then skip or clip."""
        state.observed = True
        self._follow_new_parameters()
        if takes_grad_scale(optimizer):
            state.fused = FusedStep(optimizer)
            if self.skip_nonfinite or state.fused.found_inf is not None:
                state.momentum_check = first_fused_sgd_step(optimizer)
        present = self._observe(state)
        if state.held:
            return  # skipped: no update to measure
        if self.track_updates and self._ring.full:  # a log step
            params = self.layers.params
            self._tracker.before(params if present is None else [params[i] for i in present],
                                 present)

    def _post_step(self, optimizer, args, kwargs) -> None:
        state, self._step_state = self._step_state, None
        with torch.no_grad():
            if state is None or not state.observed:  # a closure the optimizer never called
                self._ring.empty_slot(self.steps)
                state = state or _StepInProgress()
            give_back(state.held)
            if state.fused is not None:
                found_inf = state.fused.final_found_inf()
                state.fused.remove_added()
                if state.momentum_check and found_inf is not None and bool(found_inf > 0):
                    drop_momentum_buffers(optimizer, state.momentum_check)  # first step only
            if self._tracker.pending:
                self._updates[self.steps] = self._tracker.after(self._ring)
            self._end_step()

    def _scaler_skipped(self) -> None:
        """GradScaler found inf/NaN and did not call the optimizer: record the step, with the
        statistics of the gradients it unscaled."""
        with torch.no_grad():
            self._follow_new_parameters()
            self._observe(None, act=False)
            self._ring.slots[-1].skipped |= SKIPPED_BY_SCALER
            self._end_step()

    def _observe(self, state: _StepInProgress | None, act: bool = True) -> tuple | None:
        """Stats of the current grads into the ring, then (``act``) skip or clip. Returns which
        parameters had a gradient (``present`` of :meth:`_current_grads`)."""
        present, gradients = self._current_grads()
        if gradients is None:
            self._ring.empty_slot(self.steps)
            return present
        local_grads = gradients.tensors
        fused = state.fused if state is not None else None
        # the element counts on the device only for a clipper (a kernel launch otherwise spent)
        raw, _ = gradients.local_stats(_norms.L2, counts=self.clipper is not None and act)
        device = raw.power_sum.device
        inv_scale = None
        if fused is not None and fused.scale is not None:  # still scaled by GradScaler
            inv_scale = fused.scale.to(device, torch.float64).reciprocal()
            gradients.unscale_stats(inv_scale)
            raw, _ = gradients.local_stats(_norms.L2, counts=False)
        log_step = self._ring.last_slot
        slot, index = self._ring.record(self.steps, present, raw, local_grads)
        if self._want_histograms and log_step:
            self._histograms[self.steps] = log2_histograms(local_grads, index, len(self.layers),
                                                           inv_scale)
        if not act:
            return present
        if fused is not None:
            self._decide_on_device(slot, raw, fused)
        elif self.skip_nonfinite and bool(self._nonfinite_any(raw)):  # a host sync, by request
            state.held = hold_grads(self.optimizer)  # the optimizer skips what has no grad
            self._ring.slots[slot].skipped |= SKIPPED_NONFINITE
            return present
        if self.clipper is not None:
            found = self.clipper.global_coefficient(gradients) if fused is not None else None
            if found is not None:
                fused.fold(found[1])  # applied by the optimizer's own kernel
                factor = found[1]
            else:
                if inv_scale is not None:  # the clipper needs the true gradients first
                    _unscale_(local_grads, inv_scale)
                    fused.unscaled()
                    gradients.inv_scale = None
                self.clipper.apply(gradients)
                factor = self.clipper.last_factor
            self._ring.note_clip(slot, factor.reshape(()).to(torch.float64))
        return present

    def _nonfinite_any(self, raw: RawStats) -> torch.Tensor:
        """Whether any watched gradient holds NaN/inf (0-dim bool, on the device); with a group,
        on any rank, so that every rank decides alike."""
        bad = raw.nonfinite.sum()
        if self.group is not None:
            dist.all_reduce(bad, group=self.group)
        return bad > 0

    def _decide_on_device(self, slot: int, raw: RawStats, fused: FusedStep) -> None:
        """A fused step: skip through ``found_inf`` (combined with GradScaler's), and note on
        the device why this slot's step will be skipped, if it is."""
        reason = None
        if self.skip_nonfinite:
            bad = self._nonfinite_any(raw)
            fused.skip_if(bad)
            reason = bad.to(torch.float64) * SKIPPED_NONFINITE
        if fused.found_inf is not None:  # GradScaler's
            by_scaler = (fused.found_inf.to(raw.power_sum.device) > 0).to(torch.float64)
            reason = by_scaler * SKIPPED_BY_SCALER + (0 if reason is None else reason)
        if reason is not None:
            self._ring.skip_on_device(slot, reason)

    def _current_grads(self) -> tuple[tuple[int, ...] | None, GradSet | None]:
        """``(present, gradients)``: the watched parameters that have a gradient now, as a
        gradient set (None when none has), read through this rank's part of each (FSDP2,
        tensor parallel). ``present`` lists their positions, or is None when every parameter
        has one (the usual step, which then builds no index list)."""
        params = self.layers.params
        grads, kept = present_grads(params)
        present = None
        if kept is not None:
            present = tuple(kept)
            params = [params[i] for i in present]
        if not params:
            return present, None
        intent = Intent.READ if self.clipper is None else Intent.CLAMP
        return present, GradSet.of_local(grads, None, group=self.group, intent=intent,
                                         what="the Monitor's clipper", params=params)

    def _end_step(self) -> None:
        self.steps += 1
        if self._ring.full:
            self._flush_ring()

    def _flush_ring(self) -> None:
        """Send the buffered steps, with their log-step measurements, to the host pipeline,
        which processes what has arrived."""
        steps = {slot.step for slot in self._ring.slots}
        updates = {s: self._updates.pop(s) for s in steps if s in self._updates}
        histograms = {s: self._histograms.pop(s) for s in steps if s in self._histograms}
        window = self._ring.take_window(updates, histograms)
        if window is not None:
            self._host.push(window)
