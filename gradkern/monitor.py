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
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist

from . import _norms, distributed
from ._optimizer_step import (FusedStep, closure_of, drop_momentum_buffers,
                              first_fused_sgd_step, give_back, hold_grads, resolve_optimizer,
                              takes_grad_scale, with_closure)
from ._grad_set import GradSet, Intent
from ._params import present_grads
from .backends import RawStats
from .clippers import Clipper, as_clipper
from .detectors import Detector, StepStats, default_detectors
from .events import Event
from .layers import LayerMap, registrations, watch_registrations
from .sinks import Sink, as_sink

__all__ = ["Monitor"]

_FIELDS = 4  # grad_sq, grad_max, nonfinite, zeros
# Why a step was skipped, as bits of a slot's code (known on the host or, for a fused step,
# decided on the device and read back with the rows). GradScaler's reason wins when both hold:
# it would have skipped the step anyway.
SKIPPED_NONFINITE, SKIPPED_BY_SCALER = 1, 2
# Histograms of log2|g| (log steps, when a sink asks for them): one bin per power of two over
# the whole fp32 range; fp64 values beyond it land in the end bins.
HIST_MIN, HIST_MAX = -150, 130
HIST_BINS = HIST_MAX - HIST_MIN


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


def skip_reason(code: int) -> str | None:
    """The ``skip_reason`` of a step record: ``"grad_scaler"`` (GradScaler found inf/NaN),
    ``"nonfinite"`` (``skip_nonfinite=True``), or None (the step was applied)."""
    if code & SKIPPED_BY_SCALER:
        return "grad_scaler"
    return "nonfinite" if code & SKIPPED_NONFINITE else None


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
            ``keep_history`` of them.

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
        self._rank = dist.get_rank(group) if group is not None else 0
        self._world = dist.get_world_size(group) if group is not None else 1
        self._model = model
        self._group_by = group_by
        watch_registrations()  # new modules and parameters, anywhere, bump a counter
        self._watched_version: tuple | None = None
        self.layers = self._layer_map()
        self.sinks: list[Sink] = [as_sink(s) for s in sinks]

        self.events: list[Event] = []
        self.history: list[StepStats] = []
        self.skipped_steps = 0
        self.steps = 0  # optimizer steps observed (skipped ones included)

        self._ring_steps: list[int] = []
        self._ring_skipped: list[int] = []  # per slot: skip reasons known on the host (bits)
        self._ring_index: list[torch.Tensor | None] = []  # per slot: the layer of each column
        self._reset_layers()
        self._ring_skip: torch.Tensor | None = None  # per slot: reasons known on the device
        self._device_skips = False  # whether a slot of this window wrote _ring_skip
        self._updates: dict[int, torch.Tensor] = {}  # step -> (2, layers): weight^2, update^2
        self._want_histograms = any(getattr(s, "histograms", False) for s in self.sinks)
        self._histograms: dict[int, torch.Tensor] = {}  # step -> (layers, HIST_BINS) counts
        self._snapshot: tuple | None = None  # (present, params, weights before the update)
        self._pending: list[tuple] = []  # (ready event, host rows, step meta, ...) in flight
        self._hooks = []
        self._step_state: _StepInProgress | None = None  # from pre-step to post-step hook
        self._scaler_step = None  # (scaler, its own step attribute or None, the wrapper)
        self._closed = False
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._hooks.append(self.optimizer.register_step_post_hook(self._post_step))
        if scaler is not None:
            self._watch_scaler(scaler)

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
        self._reset_layers()

    def _reset_layers(self) -> None:
        n_layers = len(self.layers)
        self._param_layer = np.asarray(self.layers.layer_of, dtype=np.int64)
        # per-tensor stats of each buffered step: (log_every, _FIELDS, watched params) float64,
        # the first n_present columns of a slot used; reduced to layers at the flush
        self._ring: torch.Tensor | None = None
        self._ring_views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (slot, n) -> fields
        self._ring_numel = np.zeros((self.log_every, n_layers), dtype=np.int64)
        self._layer_cache: tuple | None = None  # (present, device), (layer index, counts)
        self._cpu_snapshot: tuple | None = None  # (present, buffers) kept for CPU weights

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
        self._drain()
        for h in self._hooks:
            h.remove()
        if self._scaler_step is not None:
            scaler, before, ours = self._scaler_step
            if vars(scaler).get("step") is ours:  # (not wrapped again since)
                if before is None:
                    del scaler.step
                else:
                    scaler.step = before
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
            self._snapshot = None
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
        if self.track_updates and len(self._ring_steps) == self.log_every:
            self._take_snapshot(present)

    def _post_step(self, optimizer, args, kwargs) -> None:
        state, self._step_state = self._step_state, None
        with torch.no_grad():
            if state is None or not state.observed:  # a closure the optimizer never called
                self._empty_slot()
                state = state or _StepInProgress()
            give_back(state.held)
            if state.fused is not None:
                found_inf = state.fused.final_found_inf()
                state.fused.remove_added()
                if state.momentum_check and found_inf is not None and bool(found_inf > 0):
                    drop_momentum_buffers(optimizer, state.momentum_check)  # first step only
            if self._snapshot is not None:
                self._measure_updates()
            self._end_step()

    def _scaler_skipped(self) -> None:
        """GradScaler found inf/NaN and did not call the optimizer: record the step, with the
        statistics of the gradients it unscaled."""
        with torch.no_grad():
            self._follow_new_parameters()
            self._observe(None, act=False)
            self._ring_skipped[-1] |= SKIPPED_BY_SCALER
            self._end_step()

    def _empty_slot(self) -> None:
        self._ring_steps.append(self.steps)
        self._ring_skipped.append(0)
        self._ring_numel[len(self._ring_steps) - 1] = 0
        self._ring_index.append(None)

    def _observe(self, state: _StepInProgress | None, act: bool = True) -> tuple | None:
        """Stats of the current grads into the ring, then (``act``) skip or clip. Returns which
        parameters had a gradient (``present`` of :meth:`_current_grads`)."""
        slot = len(self._ring_steps)
        present, gradients = self._current_grads()
        if gradients is None:
            self._empty_slot()
            return present
        params, local_grads = gradients.params, gradients.tensors
        self._ring_steps.append(self.steps)
        self._ring_skipped.append(0)
        fused = state.fused if state is not None else None
        # the element counts on the device only for a clipper (a kernel launch otherwise spent)
        raw, _ = gradients.local_stats(_norms.L2, counts=self.clipper is not None and act)
        device = raw.power_sum.device
        inv_scale = None
        if fused is not None and fused.scale is not None:  # still scaled by GradScaler
            inv_scale = fused.scale.to(device, torch.float64).reciprocal()
            gradients.unscale_stats(inv_scale)
            raw, _ = gradients.local_stats(_norms.L2, counts=False)
        if self._ring is None:
            self._ring = torch.empty(self.log_every, _FIELDS, len(self.layers.params),
                                     dtype=torch.float64, device=device)
        index, layer_numel = self._layers_of(present, device, local_grads)
        self._ring_numel[slot] = layer_numel
        self._ring_index.append(index)
        fields = self._ring_views.get((slot, len(params)))
        if fields is None:  # made once per slot and size (a view costs microseconds)
            fields = list(self._ring[slot, :, :len(params)].unbind(0))
            self._ring_views[(slot, len(params))] = fields
        # one call for the four copies (the counts become float64 on the way)
        torch._foreach_copy_(fields, [raw.power_sum, raw.max_abs, raw.nonfinite, raw.zeros])

        if self._want_histograms and slot == self.log_every - 1:
            self._histograms[self.steps] = self._log2_histograms(local_grads, index, inv_scale)
        if not act:
            return present
        if fused is not None:
            self._decide_on_device(slot, raw, fused)
        elif self.skip_nonfinite and bool(self._nonfinite_any(raw)):  # a host sync, by request
            state.held = hold_grads(self.optimizer)  # the optimizer skips what has no grad
            self._ring_skipped[slot] |= SKIPPED_NONFINITE
            return present
        if self.clipper is not None:
            found = self.clipper.global_coefficient(gradients) if fused is not None else None
            if found is not None:
                fused.fold(found[1])  # applied by the optimizer's own kernel
            else:
                if inv_scale is not None:  # the clipper needs the true gradients first
                    _unscale_(local_grads, inv_scale)
                    fused.unscaled()
                    gradients.inv_scale = None
                self.clipper.apply(gradients)
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
        if reason is None:
            return
        if self._ring_skip is None or self._ring_skip.device != reason.device:
            self._ring_skip = torch.zeros(self.log_every, dtype=torch.float64,
                                          device=reason.device)
        self._ring_skip[slot] = reason
        self._device_skips = True

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

    def _layers_of(self, present: tuple[int, ...] | None, device: torch.device,
                   local_grads: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """The layer of each present gradient (on ``device``, for the ring's index_add_) and the
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

    def _log2_histograms(self, grads: list[torch.Tensor], index: torch.Tensor,
                         inv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Counts of log2|g| per layer, one bin per power of two (zeros and NaN/inf left out:
        the zero and non-finite counts already say how many there are). An extra read pass,
        taken only on log steps and only when a sink wants histograms. ``inv_scale``: the
        gradients are still scaled by GradScaler, by its inverse."""
        out = torch.zeros(len(self.layers), HIST_BINS, dtype=torch.float64, device=index.device)
        for k, g in enumerate(grads):
            a = g.detach().reshape(-1).abs().float()
            if inv_scale is not None:
                a = a * inv_scale.to(torch.float32)
            a = a[(a > 0) & a.isfinite()]
            exponent = a.log2().clamp_(HIST_MIN, HIST_MAX - 0.5)
            counts = torch.histc(exponent, bins=HIST_BINS, min=HIST_MIN, max=HIST_MAX)
            out[index[k]] += counts.to(torch.float64)
        return out

    def _end_step(self) -> None:
        self.steps += 1
        if len(self._ring_steps) == self.log_every:
            self._flush_ring()

    # ---- update/weight ratios (log steps only) ---------------------------------------------

    def _take_snapshot(self, present: tuple[int, ...] | None) -> None:
        params = (self.layers.params if present is None
                  else [self.layers.params[i] for i in present])
        if not params:  # no gradient this step, so no update to measure
            return
        weights = distributed.local_parts(params)
        kept = self._cpu_snapshot
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
                self._cpu_snapshot = (present, copies)
        torch._foreach_copy_(copies, weights)
        self._snapshot = (present, params, copies)

    def _measure_updates(self) -> None:
        present, params, before = self._snapshot
        self._snapshot = None
        w_raw, _ = GradSet.of_local(before).local_stats(_norms.L2, counts=False)
        torch._foreach_sub_(before, distributed.local_parts(params))  # before becomes -update
        d_raw, _ = GradSet.of_local(before).local_stats(_norms.L2, counts=False)
        index, _ = self._layers_of(present, w_raw.power_sum.device, before)
        sums = torch.stack([w_raw.power_sum, d_raw.power_sum])
        # weight^2 and update^2 per layer: reduced as sums, square roots on the host
        self._updates[self.steps] = torch.zeros(2, len(self.layers), dtype=torch.float64,
                                                device=index.device).index_add_(1, index, sums)

    # ---- host side -------------------------------------------------------------------------

    def _flush_ring(self) -> None:
        """Start the copy of the buffered rows to the host; process what has arrived."""
        count = len(self._ring_steps)
        if count == 0:
            return
        meta = [(self._ring_steps[i], self._ring_skipped[i], self._ring_numel[i].copy())
                for i in range(count)]
        skips = None  # skip reasons decided on the device, this window
        if self._device_skips:
            skips = self._ring_skip[:count].clone()
            self._ring_skip.zero_()
            self._device_skips = False
        updates = {s: self._updates.pop(s) for s, _, _ in meta if s in self._updates}
        histograms = {s: self._histograms.pop(s) for s, _, _ in meta if s in self._histograms}
        if self.group is not None and histograms:  # counts add up across ranks
            stacked = torch.stack([histograms[s] for s in sorted(histograms)])
            dist.all_reduce(stacked, group=self.group)
            histograms = dict(zip(sorted(histograms), stacked))
        rows = None if self._ring is None else self._layer_rows(count)
        rank_flags = None
        if self.group is not None and rows is not None:
            rows, meta, updates, rank_flags = self._reduce_across_ranks(rows, meta, updates)
        if rows is None:  # no gradient at all so far
            host, ready = torch.zeros(count, len(self.layers), _FIELDS, dtype=torch.float64), None
            update_host = {}
        elif rows.device.type == "cuda":
            host = torch.empty((count, len(self.layers), _FIELDS), dtype=torch.float64,
                               pin_memory=True)
            host.copy_(rows, non_blocking=True)
            update_host = {s: u.to("cpu", non_blocking=True) for s, u in updates.items()}
            histograms = {s: h.to("cpu", non_blocking=True) for s, h in histograms.items()}
            if rank_flags is not None:
                rank_flags = rank_flags.to("cpu", non_blocking=True)
            if skips is not None:
                skips = skips.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            # The ring is rewritten from the next step on; the copy must finish first. Later
            # work on the stream is ordered after it, so no host wait is needed here.
        else:
            host, ready = rows.clone(), None
            update_host = updates
        self._ring_steps, self._ring_skipped, self._ring_index = [], [], []
        self._pending.append((ready, host, meta, update_host, rank_flags, histograms, skips,
                              self.layers))
        self._drain(block=False)

    def _layer_rows(self, count: int) -> torch.Tensor:
        """The first ``count`` slots of the ring reduced to layers: (count, layers, _FIELDS)
        float64 on the ring's device. Runs of slots with the same layer index (the same
        parameters had gradients, the usual case: all of them) are reduced together."""
        rows = torch.zeros(count, _FIELDS, len(self.layers), dtype=torch.float64,
                           device=self._ring.device)
        start = 0
        while start < count:
            index = self._ring_index[start]
            end = start + 1
            while end < count and self._ring_index[end] is index:
                end += 1
            if index is not None:  # None: no gradient that step, its row stays zero
                part = self._ring[start:end, :, :len(index)]
                out = rows[start:end]
                out.index_add_(2, index, part)  # the sums and counts (and maxima, replaced next)
                out[:, 1].zero_().scatter_reduce_(1, index.expand(end - start, -1), part[:, 1],
                                                  "amax")
            start = end
        return rows.transpose(1, 2).contiguous()

    def _reduce_across_ranks(self, rows: torch.Tensor, meta: list, updates: dict):
        """Whole-model rows: sums and counts in one all_reduce, maxima in another. Also which
        ranks held non-finite values at each step."""
        count, n_layers = rows.shape[0], rows.shape[1]
        device, f64 = rows.device, torch.float64
        numel = torch.from_numpy(np.stack([m[2] for m in meta])).to(device, f64)
        flags = torch.zeros(count, self._world, dtype=f64, device=device)
        flags[:, self._rank] = rows[:, :, 2].sum(1)
        steps = sorted(updates)
        update_sq = (torch.stack([updates[s] for s in steps]) if steps
                     else torch.zeros(0, 2, n_layers, dtype=f64, device=device))
        maxima = rows[:, :, 1]
        nan = maxima.isnan()
        parts = [rows[:, :, 0], rows[:, :, 2], rows[:, :, 3], numel, nan.to(f64), flags, update_sq]
        sums = torch.cat([p.reshape(-1) for p in parts])
        maxes = torch.where(nan, torch.zeros_like(maxima), maxima).reshape(-1).clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group)
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
        extra = torch.cat([flags.reshape(count, self._world), numel.reshape(shape)], dim=1)
        return reduced, meta, dict(zip(steps, update_sq)), extra

    def _drain(self, block: bool = True) -> None:
        """Process the copies that have arrived (all of them when ``block``)."""
        while self._pending:
            ready, host, meta, updates, rank_flags, histograms, skips, layers = self._pending[0]
            if ready is not None and not ready.query():
                if not block and len(self._pending) == 1:
                    return  # still in flight: handled at the next log step
                ready.synchronize()
            self._pending.pop(0)
            flags = None if rank_flags is None else rank_flags.numpy()
            if skips is not None:
                meta = [(step, code | int(device_code), numel) for (step, code, numel), device_code
                        in zip(meta, skips.numpy())]
            self._process(host.numpy(), meta, updates, flags, histograms, layers)
        for sink in self._sinks_here():
            sink.flush()

    def _sinks_here(self) -> list[Sink]:
        return self.sinks if self._rank == 0 else []

    def _process(self, rows: np.ndarray, meta: list, updates: dict,
                 rank_flags: np.ndarray | None = None, histograms: dict | None = None,
                 layers: LayerMap | None = None) -> None:
        layers = self.layers if layers is None else layers
        for k, ((step, skipped, numel), row) in enumerate(zip(meta, rows)):
            reason = skip_reason(skipped)
            s = StepStats(step=step, grad_sq=row[:, 0], grad_max=row[:, 1], nonfinite=row[:, 2],
                          zeros=row[:, 3], numel=numel.astype(np.float64),
                          skipped=reason is not None, skip_reason=reason)
            if reason is not None:
                self.skipped_steps += 1
            if rank_flags is not None:  # reduced across the group: flags, then element counts
                s.nonfinite_ranks = [int(r) for r in np.flatnonzero(rank_flags[k, :self._world])]
                s.numel = rank_flags[k, self._world:].copy()
            if histograms and step in histograms:
                s.log2_histogram = histograms[step].numpy()
            if step in updates:
                w_sq, d_sq = updates[step].numpy()
                s.weight_norm = np.sqrt(w_sq)
                with np.errstate(invalid="ignore", divide="ignore"):
                    s.update_ratio = np.sqrt(d_sq) / s.weight_norm
            self.history.append(s)
            if len(self.history) > self.keep_history:
                del self.history[: len(self.history) - self.keep_history]
            for sink in self._sinks_here():
                sink.write(self._record(s, layers))
            for detector in self.detectors:
                for event in detector.observe(s, layers):
                    self.events.append(event)
                    for sink in self._sinks_here():
                        sink.write({"type": "event", **event.as_dict()})

    def _record(self, s: StepStats, layer_map: LayerMap) -> dict:
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
        if s.log2_histogram is not None:
            record["log2_hist_range"] = [HIST_MIN, HIST_MAX]
        return record

