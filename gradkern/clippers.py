"""Gradient clippers with state: fixed norm or value, and the adaptive ones (AGC, AutoClip, ZClip).

Every clipper works alone (``clipper.clip_(model.parameters())`` returns the total gradient norm
before clipping) and inside :class:`gradkern.Monitor`, which hands it the statistics it has
already computed so that clipping costs no extra read pass. State (norm history, running
moments) lives in tensors on the gradients' device and is never read back to the host, so no
clipper forces a host sync. ``state_dict()`` / ``load_state_dict()`` checkpoint it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _engine, distributed
from ._norm_spec import NormKind, NormSpec, parse_norm_type
from ._params import TensorOrTensors, check_bound, split_names
from ._table import WorkSet
from .backends import RawStats

__all__ = ["Clipper", "ClipByNorm", "ClipByValue", "AGC", "AutoClip", "ZClip", "as_clipper"]

_L2 = parse_norm_type(2.0)


@dataclass
class _Grads:
    """Gradients gathered once, with their L2 statistics (shared by the Monitor and clippers).

    With a process group, ``params``/``gathered`` are this rank's (possibly none) and the norms
    are the whole set's across the group.
    """

    params: list[torch.Tensor]  # the parameters whose grads these are, in order
    gathered: _engine.Gathered | None
    raw: RawStats | None  # L2 kind: power_sum holds sum of squares per tensor
    numel: torch.Tensor | None
    group: object = None
    error: BaseException | None = None
    # 1 / GradScaler's scale when the gradients are still scaled (a fused step unscales them
    # in its own kernel); ``raw`` is then already unscaled, a new read pass is not
    inv_scale: torch.Tensor | None = None
    _total: torch.Tensor | None = None

    @classmethod
    def of(cls, parameters: TensorOrTensors, group=None) -> _Grads | None:
        """None when no parameter has a gradient (and there is no group to join)."""
        params, names = split_names(parameters)
        keep = [i for i, p in enumerate(params) if p.grad is not None]
        params = [params[i] for i in keep]
        names = None if names is None else [names[i] for i in keep]
        # DTensor gradients (FSDP2, tensor parallel): the clippers read and write the local
        # shards, and the group makes the norms the whole set's (as in the Monitor)
        grads = [p.grad for p in params]
        if distributed.any_dtensor(grads):
            distributed.refuse_partial(grads, "a clipper")
            if group is None:
                distributed.require_group_for_shards(grads, "a clipper")
            grads = distributed.local_shards(grads)
        if group is None:
            if not params:
                return None
            return cls(params, *_engine.gather_stats(grads, names, _L2))

        g, raw, numel, error = distributed.local_stats(grads, names, _L2)
        return cls(params, g, raw, numel, group, error)

    @property
    def device(self) -> torch.device:
        if self.gathered is not None:
            return self.gathered.device
        return distributed.collective_device(self.group)

    def total_norm(self) -> torch.Tensor:
        """L2 norm of the whole set (reduced across the group once, then reused)."""
        if self._total is None:
            if self.group is None:
                self._total = _engine.total_norm(self.raw, self.numel, _L2)
            else:
                totals = distributed.reduce_totals(self.raw, self.numel, _L2, self.group,
                                                   self.device, self.error)
                self._total = totals.norm(_L2)
        return self._total

    def stats_for(self, spec: NormSpec, per_tensor: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(per-tensor norms or None, total norm) for another norm type or per-tensor clipping;
        one more read pass for a norm other than L2, and the group's collectives."""
        raw, numel = self.raw, self.numel
        reread = spec.kind != NormKind.L2 and self.gathered is not None
        if reread:
            raw, numel = _engine.tensor_stats(self.gathered, spec)
        if self.group is None:
            norms = _engine.per_tensor_norms(raw, numel, spec) if per_tensor else None
            total = _engine.total_norm(raw, numel, spec)
        elif per_tensor:
            raw, numel = distributed.reduce_per_tensor(raw, numel, len(self.params), spec,
                                                       self.group, self.device, self.error)
            norms, total = (_engine.per_tensor_norms(raw, numel, spec),
                            _engine.total_norm(raw, numel, spec))
        else:
            totals = distributed.reduce_totals(raw, numel, spec, self.group, self.device,
                                               self.error)
            norms, total = None, totals.norm(spec)
        if reread and self.inv_scale is not None and spec.p != 0.0:
            # every p-norm but the count of non-zeros scales with the gradients
            norms = None if norms is None else norms * self.inv_scale
            total = total * self.inv_scale
        return norms, total


class Clipper:
    """Base class. A subclass implements :meth:`_global_coefficient` when its whole action is
    one coefficient for every gradient (so that a fused optimizer step can apply it in its own
    kernel, see :class:`gradkern.Monitor`), and otherwise :meth:`_clip`, on gradients already
    gathered with their L2 statistics."""

    group = None  # a torch.distributed process group, set by the constructors' group=

    @torch.no_grad()
    def clip_(self, parameters: TensorOrTensors) -> torch.Tensor:
        """Clip the ``.grad`` of ``parameters`` in place; return their L2 norm before clipping.

        Returns a 0-dim float32 tensor (float64 if a gradient is float64) on the gradients'
        device; ``tensor(0.)`` when no parameter has a gradient. With ``group=`` (given to the
        constructor) the norms are those of the whole set across the group's ranks, and every
        rank clips its part with the same coefficient. DTensor gradients (FSDP2) are read and
        clipped shard by shard, so sharded ones need that group (ValueError without it).
        """
        grads = _Grads.of(parameters, self.group)
        if grads is None:
            return torch.tensor(0.0)
        return self._clip(grads).to(_norm_dtype(grads))

    def _clip(self, grads: _Grads) -> torch.Tensor:
        """Clip in place; return the pre-clip total L2 norm (float64, 0-dim)."""
        found = self._global_coefficient(grads)
        if found is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither _clip nor "
                                      "_global_coefficient")
        total, coef = found
        if grads.gathered is not None:
            _engine.clip_in_place(grads.gathered, coef.reshape(1), float("inf"))
        return total

    def _global_coefficient(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def _norm_dtype(grads: _Grads) -> torch.dtype:
    if grads.gathered is not None and grads.gathered.dtype == torch.float64:
        return torch.float64
    return torch.float32


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

    def _global_coefficient(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.per_tensor:
            return None
        total_l2 = grads.total_norm()
        total = total_l2 if self._spec.kind == NormKind.L2 else \
            grads.stats_for(self._spec, False)[1]
        return total_l2, _engine.clip_coefficient(self.max_norm, total)

    def _clip(self, grads: _Grads) -> torch.Tensor:
        if not self.per_tensor:
            return super()._clip(grads)
        total_l2 = grads.total_norm()
        norms, _ = grads.stats_for(self._spec, True)
        if grads.gathered is not None:
            coef = _engine.clip_coefficient(self.max_norm, norms)
            _engine.clip_in_place(grads.gathered, coef, float("inf"))
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

    def _clip(self, grads: _Grads) -> torch.Tensor:
        total = grads.total_norm()
        if grads.gathered is not None:
            _engine.clip_in_place(grads.gathered, None, self.value)
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

    def _global_coefficient(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor]:
        total = grads.total_norm()
        if self._norms is None or self._norms.device != total.device:
            self._norms = torch.zeros(self.history, dtype=torch.float64, device=total.device)
        self._norms[self._count % self.history] = total
        self._count += 1
        seen = self._norms[: min(self._count, self.history)]
        # A non-finite norm in the history would poison the quantile; keep finite ones out of it.
        finite = torch.where(seen.isfinite(), seen, torch.zeros_like(seen))
        threshold = torch.quantile(finite, self.percentile / 100.0)
        return total, _engine.clip_coefficient(threshold, total)

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

    def _global_coefficient(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor]:
        total = grads.total_norm()
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
        coef = _engine.clip_coefficient(torch.where(finite, limit, total), total)
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
    gradients come from the fused kernels over a table with one entry per unit, not from a
    Python loop over rows. The returned norm is the total L2 norm before clipping, as for every
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

    def _clip(self, grads: _Grads) -> torch.Tensor:
        total = grads.total_norm()
        seen = set(self._exclude)  # and each parameter once: clipping twice would square
        params = [p for p in grads.params if not (id(p) in seen or seen.add(id(p)))]
        if not params:
            return total
        if grads.gathered is not None:
            _engine.check_writable(grads.gathered)  # before the first row is scaled
        # this rank's rows of each weight and gradient (exact for row-sharded DTensors)
        ws = distributed.local_parts([p.detach() for p in params])
        gs = distributed.local_shards([p.grad for p in params])  # (Partial refused in of())
        w_norm = _unit_norms(ws, self._spec)
        g_norm = _unit_norms(gs, self._spec)
        max_norm = w_norm.clamp(min=self.eps) * self.clip_factor
        coef = torch.where(g_norm < max_norm, torch.ones_like(g_norm),
                           max_norm / g_norm.clamp(min=1e-6))
        _scale_units_(gs, coef)
        return total


def _units(t: torch.Tensor) -> int:
    return 1 if t.dim() <= 1 else t.shape[0]


def _unit_table(tensors: list[torch.Tensor]) -> WorkSet | None:
    """One table entry per unit, built with numpy (no Python loop over rows); None when a tensor
    is not contiguous and dense, or the compiled backends are not in use."""
    from ._table import DTYPE_CODES, PLAIN_TENSOR_TYPES

    if any(not t.is_contiguous() or t.layout != torch.strided or t.device.type != "cpu"
           or type(t) not in PLAIN_TENSOR_TYPES for t in tensors):
        return None  # (a subclass may keep its values elsewhere: the torch path handles it)
    units = np.array([_units(t) for t in tensors], dtype=np.int64)
    numel = np.array([t.numel() for t in tensors], dtype=np.int64)
    per_unit = np.where(units > 0, numel // np.maximum(units, 1), 0)
    itemsize = np.array([t.element_size() for t in tensors], dtype=np.uint64)
    base = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)
    owner = np.repeat(np.arange(len(tensors)), units)
    first = np.concatenate([[0], np.cumsum(units)[:-1]])
    row = np.arange(units.sum()) - first[owner]
    addresses = base[owner] + row.astype(np.uint64) * per_unit[owner].astype(np.uint64) * itemsize[owner]
    codes = np.array([DTYPE_CODES[t.dtype] for t in tensors], dtype=np.int8)[owner]
    return WorkSet(work=[], codes=codes, numel=per_unit[owner], addresses=addresses)


def _compiled_backend():
    from .backends import backend_for

    b = backend_for(torch.device("cpu"))
    return b if b.name in ("cpp", "numba") else None


def _unit_norms(tensors: list[torch.Tensor], spec: NormSpec) -> torch.Tensor:
    """float64 norm of every unit of every tensor, concatenated in order."""
    backend = _compiled_backend()
    table = _unit_table(tensors) if backend is not None else None
    if table is not None:
        raw = backend.tensor_stats(table, spec)
        return _engine.per_tensor_norms(raw, torch.from_numpy(table.numel), spec)
    return torch.cat([torch.linalg.vector_norm(t.double().reshape(_units(t), -1), spec.p, dim=1)
                      for t in tensors])


def _scale_units_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    backend = _compiled_backend()
    table = _unit_table(tensors) if backend is not None else None
    if table is not None:
        backend.clip_in_place(table, coef.to(torch.float64), float("inf"))
        return
    start = 0
    for t in tensors:
        n = _units(t)
        c = coef[start:start + n].to(t.dtype)
        t.mul_(c.reshape(()) if t.dim() <= 1 else c.reshape((n,) + (1,) * (t.dim() - 1)))
        start += n


def as_clipper(clip) -> Clipper | None:
    """``None`` -> None; a number -> ClipByNorm(number); a Clipper -> itself."""
    if clip is None or isinstance(clip, Clipper):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return ClipByNorm(float(clip))
    raise TypeError(f"clip must be None, a max norm, or a gradkern clipper; got {clip!r}")

