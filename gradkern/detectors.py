"""Rules that turn per-layer gradient statistics into events.

Detectors run on the host, on the statistics the Monitor copies back every ``log_every`` steps,
one step at a time and in step order. Each keeps a little state (moving averages, streaks) and
returns the events of that step. Every threshold is a constructor argument; the defaults are
calibrated on the classic cases in :mod:`gradkern.tools.cases` (which must fire) and on healthy
networks (which must stay silent); see tests/test_detectors.py.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .events import Event
from .layers import LayerMap

__all__ = ["StepStats", "Detector", "NonFinite", "Exploding", "Spike", "Vanishing", "Stalled",
           "Dead", "default_detectors"]


@dataclass
class StepStats:
    """One optimizer step, on the host. Arrays have one entry per layer (LayerMap order).

    Treat it as read-only: ``total_norm`` and ``grad_rms`` are computed once, when first read.
    """

    step: int
    grad_sq: np.ndarray  # sum of squared gradient elements
    grad_max: np.ndarray  # max |g|
    nonfinite: np.ndarray  # count of NaN/inf elements
    zeros: np.ndarray  # count of exact zeros
    numel: np.ndarray  # elements that had a gradient this step (0: no gradient)
    skipped: bool = False
    skip_reason: str | None = None  # "nonfinite" (skip_nonfinite) or "grad_scaler"
    weight_norm: np.ndarray | None = None  # on log steps with update tracking
    update_ratio: np.ndarray | None = None  # ||w_after - w_before|| / ||w_before||
    nonfinite_ranks: list[int] | None = None  # with a process group: ranks that held NaN/inf
    log2_histogram: np.ndarray | None = None  # (layers, bins): counts of log2|g|, log steps
    clip_factor: float | None = None  # with a clipper: the smallest factor it scaled by (1: none)

    @cached_property
    def total_norm(self) -> float:
        return math.sqrt(float(self.grad_sq.sum()))

    @cached_property
    def grad_rms(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.grad_sq / self.numel)


class Detector:
    """Base class. ``cooldown``: steps during which the same detector stays quiet after firing."""

    kind = ""

    def __init__(self, cooldown: int = 50):
        self.cooldown = int(cooldown)
        self._quiet_until = -1

    def observe(self, s: StepStats, layers: LayerMap) -> list[Event]:
        if s.step < self._quiet_until:
            self._update(s, layers)
            return []
        event = self._check(s, layers)
        if event is None:
            return []
        self._quiet_until = s.step + self.cooldown
        return [event]

    def _update(self, s: StepStats, layers: LayerMap) -> None:
        """Keep state current during the cooldown (default: run the check, drop the result)."""
        self._check(s, layers)

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class NonFinite(Detector):
    """NaN/inf in the gradients: which layers, the first in backward order (output side first,
    where the bad values appeared), at which step. Fires when a run of non-finite steps starts,
    and on every step the Monitor skipped.

    Steps that ``torch.amp.GradScaler`` skipped are its normal way of finding a loss scale (an
    overflow, then a smaller scale), so they fire only when ``scaler_patience`` of them come in
    a row: then no scale helps, and the loss itself is likely non-finite.
    """

    kind = "nonfinite"

    def __init__(self, scaler_patience: int = 8):
        super().__init__(cooldown=0)
        self.scaler_patience = int(scaler_patience)
        self._previous_bad = False
        self._scaler_streak = 0

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        bad = s.nonfinite > 0
        any_bad = bool(bad.any())
        by_scaler = s.skip_reason == "grad_scaler"
        self._scaler_streak = self._scaler_streak + 1 if by_scaler else 0
        fire = (self._scaler_streak % self.scaler_patience == 0 if by_scaler else
                any_bad and (not self._previous_bad or s.skipped))
        self._previous_bad = any_bad
        if not fire:
            return None
        order = [i for i in reversed(range(len(layers))) if bad[i]]
        names = [layers.names[i] for i in order]
        if s.skip_reason == "grad_scaler":
            message = (f"GradScaler skipped {self._scaler_streak} steps in a row: the gradients "
                       "hold inf/NaN at every loss scale it tried"
                       + (f", first in backward order: {names[0]}." if names else "."))
        else:
            action = " The step was skipped." if s.skipped else ""
            message = (f"non-finite gradients in {len(names)} layer(s), first in backward "
                       f"order: {names[0]}.{action}")
        return Event(self.kind, s.step, names, message,
                     {"nonfinite": {layers.names[i]: int(s.nonfinite[i]) for i in order},
                      "skipped": s.skipped, "skip_reason": s.skip_reason,
                      "ranks": s.nonfinite_ranks})


class Exploding(Detector):
    """Sustained growth of the total gradient norm: at least ``growth`` times per step for
    ``steps`` consecutive steps, ending at least ``rise`` times above the median of the
    ``window`` norms before (so a recovery from a dip does not count); or above ``limit`` when
    one is given. Meant to fire while the norm is still finite, before the NaN.

    The default ``rise`` leaves room for noise: a converged classifier's gradient norm is small
    and jumpy, and in healthy runs two steps of 3x growth reached up to ~25x the median. An
    explosion passes 100x within its first steps (the uniform(4, 5) ReLU regression in
    :mod:`gradkern.tools.cases`: 1e5x at its third step, two steps before the first NaN)."""

    kind = "exploding"

    def __init__(self, growth: float = 3.0, steps: int = 2, rise: float = 100.0,
                 window: int = 20, limit: float | None = None, cooldown: int = 50):
        super().__init__(cooldown)
        self.growth, self.steps, self.rise, self.window = float(growth), int(steps), float(rise), int(window)
        self.limit = limit
        self._norms: list[float] = []  # finite norms before the current streak
        self._streak: list[float] = []

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        norm = s.total_norm
        if not math.isfinite(norm):
            self._norms, self._streak = [], []
            return None
        previous = self._streak[-1] if self._streak else (self._norms[-1] if self._norms else None)
        if previous and norm >= self.growth * previous:
            self._streak.append(norm)
        else:
            self._norms = (self._norms + self._streak + [norm])[-self.window:]
            self._streak = []
        baseline = statistics.median(self._norms) if self._norms else norm
        growing = len(self._streak) >= self.steps and norm >= self.rise * baseline
        over_limit = self.limit is not None and norm > self.limit
        if not (growing or over_limit):
            return None
        top = int(np.argmax(s.grad_sq))
        message = (f"total gradient norm grew {norm / baseline:.3g}x over {len(self._streak)} "
                   f"steps (x{self.growth:g} or more each), to {norm:.3g}" if growing else
                   f"total gradient norm {norm:.3g} is above the limit {self.limit:.3g}")
        evidence = {"total_norm": norm, "baseline_norm": baseline,
                    "streak_norms": list(self._streak), "largest_layer": layers.names[top]}
        self._norms, self._streak = self._norms + self._streak, []
        return Event(self.kind, s.step, [layers.names[top]], message, evidence)


class Spike(Detector):
    """An isolated jump of the total norm: at least ``factor`` times its exponential moving
    average (on log scale, factor ``alpha``) and a z-score above ``z_thresh``, after ``warmup``
    steps."""

    kind = "spike"

    def __init__(self, factor: float = 5.0, z_thresh: float = 6.0, alpha: float = 0.95,
                 warmup: int = 20, cooldown: int = 20):
        super().__init__(cooldown)
        self.factor = float(factor)
        self.z_thresh, self.alpha, self.warmup = float(z_thresh), float(alpha), int(warmup)
        self._n = 0
        self._mean = 0.0
        self._var = 0.0

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        norm = s.total_norm
        if not (math.isfinite(norm) and norm > 0):
            return None
        x = math.log(norm)
        z = (x - self._mean) / math.sqrt(self._var + 1e-12) if self._n >= self.warmup else 0.0
        fire = z > self.z_thresh and x - self._mean > math.log(self.factor)
        if not fire:  # spikes do not move the baseline
            if self._n == 0:
                self._mean = x
            delta = x - self._mean
            self._mean += (1 - self.alpha) * delta
            self._var = self.alpha * (self._var + (1 - self.alpha) * delta * delta)
            self._n += 1
        if not fire:
            return None
        return Event(self.kind, s.step, [layers.names[int(np.argmax(s.grad_sq))]],
                     f"total gradient norm {norm:.3g} is {math.exp(x - self._mean):.3g}x its "
                     f"moving average (z = {z:.1f} on log scale)",
                     {"total_norm": norm, "z": z, "moving_average": math.exp(self._mean)})


class Vanishing(Detector):
    """Early layers' gradients far below later layers' (depth decay), or below an absolute floor,
    for ``patience`` consecutive steps.

    The gradient RMS of the first ``depth_fraction`` of the layers (input side) is compared
    with that of the last ``depth_fraction`` (output side), as geometric means; the rule fires
    when the ratio stays below ``ratio``. Embedding layers are left out (their gradient lives on
    the few rows a batch looks up), and so are layers without a gradient this step; networks
    with fewer than ``min_layers`` such layers are not judged (a 2-layer net's input and output
    layers differ in scale for reasons other than depth).
    """

    kind = "vanishing"

    def __init__(self, ratio: float = 0.1, floor: float = 1e-10, patience: int = 20,
                 depth_fraction: float = 0.25, min_layers: int = 3, cooldown: int = 100):
        super().__init__(cooldown)
        self.ratio, self.floor, self.patience = float(ratio), float(floor), int(patience)
        self.depth_fraction, self.min_layers = float(depth_fraction), int(min_layers)
        self._streak = 0

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        rms = s.grad_rms
        usable = np.flatnonzero((s.numel > 0) & ~layers.embedding_mask & np.isfinite(rms))
        if len(usable) < self.min_layers:  # depth decay needs depth
            self._streak = 0
            return None
        k = max(1, int(round(len(usable) * self.depth_fraction)))
        early, late = usable[:k], usable[-k:]
        with np.errstate(divide="ignore"):
            log_rms = np.log(np.maximum(rms, 1e-300))
        late_log_rms = float(log_rms[late].sum()) / k  # sum / k: np.mean's value, faster
        depth_ratio = math.exp(float(log_rms[early].sum()) / k - late_log_rms)
        below_floor = usable[(rms[usable] > 0) & (rms[usable] < self.floor)]
        bad = depth_ratio < self.ratio or len(below_floor) > 0
        self._streak = self._streak + 1 if bad else 0
        if self._streak < self.patience:
            return None
        self._streak = 0
        weak = (below_floor if len(below_floor) else
                early[rms[early] < self.ratio * math.exp(late_log_rms)])
        names = [layers.names[i] for i in (weak if len(weak) else early)]
        return Event(self.kind, s.step, names,
                     f"early layers' gradient RMS is {depth_ratio:.2g}x the last layers' for "
                     f"{self.patience} steps" if depth_ratio < self.ratio else
                     f"gradient RMS below {self.floor:g} in {len(below_floor)} layer(s)",
                     {"depth_ratio": depth_ratio,
                      "grad_rms": {layers.names[i]: float(rms[i]) for i in usable}})


class _Streaks:
    """Per-layer counts of consecutive observations that met a rule, kept by layer name (the
    layers' positions move when a model gains parameters)."""

    def __init__(self, patience: int):
        self.patience = patience
        self._count: dict[str, int] = {}

    def persistent(self, hits: list[int], layers: LayerMap) -> list[int]:
        """Record this observation's hits (layer positions); return those at ``patience`` (and
        restart them)."""
        names = layers.names
        self._count = {names[i]: self._count.get(names[i], 0) + 1 for i in hits}
        done = [i for i in hits if self._count[names[i]] >= self.patience]
        for i in done:
            self._count[names[i]] = 0
        return done


class Stalled(Detector):
    """Weights that do not move: update/weight norm ratio below ``min_ratio`` in a layer on
    ``patience`` consecutive log steps (needs the Monitor's update tracking)."""

    kind = "stalled"

    def __init__(self, min_ratio: float = 1e-6, patience: int = 3, cooldown: int = 100):
        super().__init__(cooldown)
        self.min_ratio, self.patience = float(min_ratio), int(patience)
        self._streaks = _Streaks(self.patience)

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        if s.update_ratio is None or s.skipped:
            return None
        ratio = s.update_ratio
        stalled = np.flatnonzero((s.numel > 0) & (ratio < self.min_ratio))  # NaN compares False
        persistent = self._streaks.persistent(stalled.tolist(), layers)
        if not persistent:
            return None
        names = [layers.names[i] for i in persistent]
        return Event(self.kind, s.step, names,
                     f"{len(names)} layer(s) barely move: update/weight ratio below "
                     f"{self.min_ratio:g} on {self.patience} log steps",
                     {"update_ratio": {layers.names[i]: float(s.update_ratio[i])
                                       for i in persistent}})


class Dead(Detector):
    """Layers whose gradients are mostly exact zeros (dying ReLU): a zero fraction of at least
    ``zero_fraction`` for ``patience`` consecutive steps. Embedding layers are left out."""

    kind = "dead"

    def __init__(self, zero_fraction: float = 0.9, patience: int = 10, cooldown: int = 100):
        super().__init__(cooldown)
        self.zero_fraction, self.patience = float(zero_fraction), int(patience)
        self._streaks = _Streaks(self.patience)

    def _check(self, s: StepStats, layers: LayerMap) -> Event | None:
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = s.zeros / s.numel
        dead = np.flatnonzero((s.numel > 0) & ~layers.embedding_mask
                               & (frac >= self.zero_fraction))  # NaN compares False
        persistent = self._streaks.persistent(dead.tolist(), layers)
        if not persistent:
            return None
        names = [layers.names[i] for i in persistent]
        return Event(self.kind, s.step, names,
                     f"{len(names)} layer(s) have >= {self.zero_fraction:.0%} zero gradients "
                     f"for {self.patience} steps",
                     {"zero_fraction": {layers.names[i]: float(frac[i]) for i in persistent}})


def default_detectors() -> list[Detector]:
    """A fresh set of every detector with its default thresholds."""
    return [NonFinite(), Exploding(), Spike(), Vanishing(), Stalled(), Dead()]
