"""Gradient clippers with state: fixed norm or value, and the adaptive ones (AGC, AutoClip, ZClip).

Every clipper works alone (``clipper.clip_(model.parameters())`` returns the total gradient norm
before clipping) and inside :class:`gradkern.Monitor`, which hands it the statistics it has
already computed so that clipping costs no extra read pass. State (norm history, running
moments) lives in tensors on the gradients' device and is never read back to the host, so no
clipper forces a host sync. ``state_dict()`` / ``load_state_dict()`` checkpoint it.
"""

from __future__ import annotations

import torch

from . import _engine, _norms, distributed
from ._grad_set import GradSet, Intent
from ._norms import NormKind, NormSpec, parse_norm_type
from ._params import TensorOrTensors, check_bound, split_names

__all__ = ["Clipper", "ClipByNorm", "ClipByValue", "AGC", "AutoClip", "ZClip", "as_clipper"]


def gradients_of(parameters: TensorOrTensors, group=None) -> GradSet | None:
    """The gradients of ``parameters`` as a clipper reads and writes them: DTensors by their
    local tensors (a Partial one refused), the whole set's norms over ``group``. None when no
    parameter has a gradient and there is no group to join.

    Raises:
        TypeError: a Partial DTensor gradient. ValueError: a DTensor sharded across ranks
            without ``group`` (its norms would be this rank's part alone).
    """
    params, names = split_names(parameters)
    keep = [i for i, p in enumerate(params) if p.grad is not None]
    params = [params[i] for i in keep]
    names = None if names is None else [names[i] for i in keep]
    if group is None and not params:
        return None
    grads = [p.grad for p in params]
    gradients = GradSet.of_local(grads, names, group=group, intent=Intent.CLAMP,
                                 what="a clipper", params=params)
    if group is None and gradients.tensors is not grads:  # DTensors were replaced by locals
        distributed.require_group_for_shards(grads, "a clipper")
    return gradients


class Clipper:
    """Base class. A subclass implements :meth:`global_coefficient` when its whole action is
    one coefficient for every gradient (so that a fused optimizer step can apply it in its own
    kernel, see :class:`gradkern.Monitor`), and otherwise :meth:`apply`. Both take a gradient
    set whose L2 statistics have been read once (by :meth:`clip_`, or by the Monitor, which
    shares its own read pass), so clipping costs no further read pass for L2."""

    group = None  # a torch.distributed process group, set by the constructors' group=
    # The smallest factor the last clip scaled a gradient (or a unit, or an element) by: a
    # 0-dim float64 tensor on the gradients' device, 1 when nothing changed; None before the
    # first clip. Read it when needed (it is never copied to the host by gradkern).
    last_factor: torch.Tensor | None = None

    @torch.no_grad()
    def clip_(self, parameters: TensorOrTensors) -> torch.Tensor:
        """Clip the ``.grad`` of ``parameters`` in place; return their L2 norm before clipping.

        Returns a 0-dim float32 tensor (float64 if a gradient is float64) on the gradients'
        device; ``tensor(0.)`` when no parameter has a gradient. With ``group=`` (given to the
        constructor) the norms are those of the whole set across the group's ranks, and every
        rank clips its part with the same coefficient. DTensor gradients (FSDP2) are read and
        clipped shard by shard, so sharded ones need that group (ValueError without it).
        """
        gradients = gradients_of(parameters, self.group)
        if gradients is None:
            return torch.tensor(0.0)
        return self.apply(gradients).to(_norms.stats_dtype(gradients.dtype))

    def apply(self, gradients: GradSet) -> torch.Tensor:
        """Clip ``gradients`` in place; return their total L2 norm before clipping (float64,
        0-dim). The default scales by :meth:`global_coefficient`."""
        found = self.global_coefficient(gradients)
        if found is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither apply nor "
                                      "global_coefficient")
        total, coef = found
        gradients.write(coef.reshape(1))
        self.last_factor = coef
        return total

    def global_coefficient(self, gradients: GradSet) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(pre-clip total L2 norm, coefficient <= 1)`` for a clipper that scales every
        gradient by one coefficient, computed without writing anything (and updating the
        clipper's state as a clip would); None for one that does more."""
        return None

    _STATE_KEYS: frozenset[str] = frozenset()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: ``state`` is not a state of this kind of clipper; nothing changes.
        """
        missing = self._STATE_KEYS - set(state)
        if missing:
            raise ValueError(
                f"not a {type(self).__name__} state: it lacks {sorted(missing)} (it has "
                f"{sorted(state)}); load a state that a {type(self).__name__} saved")
        self._load(state)

    def _load(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class ClipByNorm(Clipper):
    """Clip the global gradient norm to ``max_norm`` (or each tensor's, with ``per_tensor``).

    The same rule as :func:`torch.nn.utils.clip_grad_norm_` (and Keras ``clipnorm`` with
    ``per_tensor=True``): scale by ``max_norm / (norm + 1e-6)`` when that is below 1.

    Example:
        >>> import torch, gradkern as gk
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> gk.ClipByNorm(1.0).clip_([p]), p.grad
        (tensor(5.), tensor([0.6000, 0.8000]))
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0, per_tensor: bool = False, *,
                 group=None):
        self.max_norm = check_bound(max_norm, "max_norm")
        self.norm_type = norm_type
        self.per_tensor = bool(per_tensor)
        self.group = group
        self._spec: NormSpec = parse_norm_type(norm_type)

    def global_coefficient(self, grads: GradSet) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.per_tensor:
            return None
        total_l2 = grads.total_l2()
        total = total_l2 if self._spec.kind == NormKind.L2 else grads.norms(self._spec)[1]
        return total_l2, _norms.clip_coefficient(self.max_norm, total)

    def apply(self, grads: GradSet) -> torch.Tensor:
        if not self.per_tensor:
            return super().apply(grads)
        total_l2 = grads.total_l2()
        norms, _ = grads.norms(self._spec, per_tensor=True)
        coef = _norms.clip_coefficient(self.max_norm, norms)
        grads.write(coef)
        self.last_factor = _smallest(coef, total_l2)
        return total_l2


class ClipByValue(Clipper):
    """Clamp every gradient element to ``[-value, value]``, writing only the ones that change.

    Example:
        >>> import torch, gradkern as gk
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, -0.5])
        >>> _ = gk.ClipByValue(1.0).clip_([p]); p.grad
        tensor([ 1.0000, -0.5000])
    """

    def __init__(self, value: float, *, group=None):
        self.value = check_bound(value, "value")
        self.group = group

    def apply(self, grads: GradSet) -> torch.Tensor:
        total = grads.total_l2()
        largest = grads.local_max_abs()  # from the statistics already read: no extra pass
        grads.write(None, self.value)
        self.last_factor = torch.where(largest > self.value, self.value / largest,
                                       torch.ones_like(largest))
        return total


class AutoClip(Clipper):
    """AutoClip (Seetharaman et al., 2020): clip to a percentile of the norms seen so far.

    Each call records the current total norm (before clipping) in a bounded history of the last
    ``history`` norms and clips the global norm to the ``percentile``-th percentile of that
    history (current norm included), so the threshold follows the run instead of being tuned.

    Args:
        percentile: in [0, 100]. Default: 10, the paper's recommendation.
        history: how many past norms to keep (the paper keeps all; a bound keeps memory and
            the quantile cost fixed). Default: 1000.

    Example:
        >>> import torch, gradkern as gk
        >>> clipper = gk.AutoClip(percentile=50, history=3)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> for g in (1.0, 3.0, 100.0):
        ...     p.grad = torch.tensor([g]); _ = clipper.clip_([p])
        >>> p.grad   # clipped to the median of (1, 3, 100)
        tensor([3.])
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000, *, group=None):
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if int(history) < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.percentile = float(percentile)
        self.history = int(history)
        self.group = group
        self._norms: torch.Tensor | None = None
        self._count = 0  # a host counter: the same on every rank and never read from the device

    _STATE_KEYS = frozenset({"norms", "count"})

    def global_coefficient(self, grads: GradSet) -> tuple[torch.Tensor, torch.Tensor]:
        total = grads.total_l2()
        if self._norms is None or self._norms.device != total.device:
            self._norms = torch.zeros(self.history, dtype=torch.float64, device=total.device)
        self._norms[self._count % self.history] = total
        self._count += 1
        seen = self._norms[: min(self._count, self.history)]
        # A non-finite norm in the history would poison the quantile; keep finite ones out of it.
        finite = torch.where(seen.isfinite(), seen, torch.zeros_like(seen))
        threshold = torch.quantile(finite, self.percentile / 100.0)
        return total, _norms.clip_coefficient(threshold, total)

    def state_dict(self) -> dict:
        return {"norms": None if self._norms is None else self._norms.clone(), "count": self._count}

    def _load(self, state: dict) -> None:
        self._norms = None if state["norms"] is None else state["norms"].clone()
        self._count = int(state["count"])


class ZClip(Clipper):
    """ZClip (Kumar et al., 2025): clip norms whose z-score against running moments is too high.

    The first ``warmup`` calls only collect norms; their mean and variance start the running
    moments. After that, with mean ``mu`` and std ``sigma`` of the norm, a norm ``g`` whose
    z-score ``z = (g - mu) / sigma`` exceeds ``z_thresh`` is clipped to ``mu + (z_thresh / z) *
    sigma`` (the paper's reciprocal rule: the larger the spike, the harder the clip). The moments
    then follow the clipped norm with an EMA of factor ``alpha``. Non-finite norms do not update
    the moments.

    Example:
        >>> import torch, gradkern as gk
        >>> z = gk.ZClip(warmup=3)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> for g in (1.0, 1.1, 0.9, 50.0):
        ...     p.grad = torch.tensor([g]); _ = z.clip_([p])
        >>> bool(p.grad.abs() < 2.0)
        True
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 eps: float = 1e-6, *, group=None):
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not float(z_thresh) > 0.0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if int(warmup) < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.alpha, self.z_thresh = float(alpha), float(z_thresh)
        self.warmup, self.eps = int(warmup), float(eps)
        self.group = group
        self._warm: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None
        self._var: torch.Tensor | None = None
        self._count = 0

    _STATE_KEYS = frozenset({"warm", "mean", "var", "count"})

    def global_coefficient(self, grads: GradSet) -> tuple[torch.Tensor, torch.Tensor]:
        total = grads.total_l2()
        finite = total.isfinite()
        if self._count < self.warmup:
            if self._warm is None:
                self._warm = torch.zeros(self.warmup, dtype=torch.float64, device=total.device)
            self._warm[self._count] = total
            self._count += 1
            if self._count == self.warmup:
                w = self._warm[self._warm.isfinite()]
                self._mean, self._var = w.mean(), w.var(unbiased=False)
            return total, torch.ones_like(total)
        mean, std = self._mean, (self._var + self.eps).sqrt()
        z = (total - mean) / std
        limit = torch.where(z > self.z_thresh, mean + (self.z_thresh / z) * std, total)
        coef = _norms.clip_coefficient(torch.where(finite, limit, total), total)
        clipped = torch.where(finite, torch.minimum(total, limit), mean)
        new_mean = self.alpha * mean + (1 - self.alpha) * clipped
        new_var = self.alpha * self._var + (1 - self.alpha) * (clipped - new_mean) ** 2
        self._mean = torch.where(finite, new_mean, mean)
        self._var = torch.where(finite, new_var, self._var)
        self._count += 1
        return total, coef

    def state_dict(self) -> dict:
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {"warm": clone(self._warm), "mean": clone(self._mean), "var": clone(self._var),
                "count": self._count}

    def _load(self, state: dict) -> None:
        self._warm, self._mean, self._var = state["warm"], state["mean"], state["var"]
        self._count = int(state["count"])


class AGC(Clipper):
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets).

    For every unit (a row of a weight: all dims but the first; a whole bias or gain vector), the
    gradient norm is capped at ``clip_factor * max(||w_unit||, eps)``: a unit's step stays small
    relative to its weights. Matches ``timm.utils.adaptive_clip_grad``, ``norm_type`` included;
    a parameter listed twice (tied weights) is clipped once. The unit norms of weights and
    gradients come from the fused kernels of whichever backend serves the device (CPU or GPU)
    over a table with one entry per unit, not from a Python loop over rows. The returned norm is the total L2 norm before clipping, as for every
    clipper.

    Args:
        clip_factor: lambda of the paper. Default: 0.01.
        eps: floor on weight norms, so zero-initialised units can still move. Default: 1e-3.
        exclude: parameters left unclipped (the paper leaves the final classifier alone):
            pass e.g. ``model.head.parameters()``.
        norm_type: p of the unit norms (any p that :func:`gradkern.get_total_norm` takes).
            Default: 2.0.
        group: with a process group the returned norm is the whole set's; the unit-wise rule
            itself is local, which is exact when every unit (row) lives on one rank (replicated
            or row-sharded parameters).

    Example:
        >>> import torch, gradkern as gk
        >>> w = torch.nn.Parameter(torch.ones(2, 2)); w.grad = torch.tensor([[10.0, 0.0], [0.01, 0.0]])
        >>> _ = gk.AGC(clip_factor=0.1).clip_([w]); w.grad   # row 0 capped at 0.1 * sqrt(2)
        tensor([[0.1414, 0.0000],
                [0.0100, 0.0000]])
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude=(), *,
                 norm_type: float = 2.0, group=None):
        self.clip_factor = check_bound(clip_factor, "clip_factor")
        self.eps = check_bound(eps, "eps")
        self.norm_type = norm_type
        self.group = group
        self._spec = parse_norm_type(norm_type)
        self._exclude = {id(p) for p in exclude}

    def apply(self, grads: GradSet) -> torch.Tensor:
        total = grads.total_l2()
        seen = set(self._exclude)  # and each parameter once: clipping twice would square
        params = [p for p in grads.params if not (id(p) in seen or seen.add(id(p)))]
        if not params:
            self.last_factor = torch.ones_like(total)
            return total
        grads.check_writable()  # before the first row is scaled
        # this rank's rows of each weight and gradient (exact for row-sharded DTensors)
        ws = distributed.local_to_read([p.detach() for p in params])
        gs = distributed.local_to_write([p.grad for p in params])  # (Partial refused already)
        w_norm = _engine.unit_norms(ws, self._spec)
        g_norm = _engine.unit_norms(gs, self._spec)
        max_norm = w_norm.clamp(min=self.eps) * self.clip_factor
        coef = torch.where(g_norm < max_norm, torch.ones_like(g_norm),
                           max_norm / g_norm.clamp(min=1e-6))
        _engine.scale_units_(gs, coef)
        self.last_factor = _smallest(coef, total)
        return total


def _smallest(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The smallest of per-tensor (or per-unit) factors, 1 when there are none."""
    return coef.min().clamp(max=1.0) if coef.numel() else torch.ones_like(like)


def as_clipper(clip) -> Clipper | None:
    """``None`` -> None; a number -> ClipByNorm(number); a Clipper -> itself."""
    if clip is None or isinstance(clip, Clipper):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return ClipByNorm(float(clip))
    raise TypeError(f"clip must be None, a max norm, or a gradkern clipper; got {clip!r}")

