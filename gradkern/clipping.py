"""Gradient clipping: drop-in replacements for ``torch.nn.utils`` and :func:`clip_`.

Each function validates all of its arguments and every gradient before it writes anything.
"""

from __future__ import annotations

import torch

from . import _engine, distributed
from ._norm_spec import NormSpec, parse_norm_type
from ._table import result_dtype
from ._params import TensorOrTensors, check_bound, grads_of, split_names

__all__ = ["get_total_norm", "clip_grads_with_norm_", "clip_grad_norm_", "clip_grad_value_",
           "clip_"]



def _check_finite(total: torch.Tensor, g, raw, spec: NormSpec, across_ranks: bool) -> None:
    """``error_if_nonfinite``: RuntimeError unless the norm as torch returns it (in the
    gradients' dtype, where a large finite norm can overflow) is finite. The message names the
    non-finite gradients where this rank knows them. Syncs with the device, as torch does."""
    dtype = _result_dtype(g)
    if bool(torch.isfinite(total.to(dtype))):
        return
    names = (_engine.nonfinite_names(g, raw.nonfinite)
             if isinstance(g, _engine.Gathered) and raw is not None else [])
    if names:
        where = f" Non-finite gradients: {', '.join(names)}."
    elif bool(torch.isfinite(total)):
        where = (f" The gradients are finite, but their norm ({float(total):.6g}) overflows "
                 f"{dtype}.")
    elif across_ranks and raw is not None or g is None:
        where = " The non-finite gradients are on another rank."
    else:
        where = ""
    raise RuntimeError(
        f"The total norm of order {spec.p} for gradients from `parameters` is non-finite, so it "
        f"cannot be clipped.{where} To disable this error and scale the gradients by the "
        f"non-finite norm anyway, set `error_if_nonfinite=False`")


def _check_defined(g, spec: NormSpec) -> None:
    """A negative order has no value over zero elements (torch raises for an empty tensor):
    the minimum, or a sum of |g|^p, over nothing."""
    if spec.p >= 0:
        return
    sets = g if isinstance(g, list) else ([] if g is None else [g])
    if not any(int(group.work.numel.sum()) for one in sets for group in one.groups):
        raise RuntimeError(f"the norm of order {spec.p} of zero elements is undefined (it has "
                           "no identity value); torch raises for it too")


def _norms(
    tensors: list[torch.Tensor], names, spec: NormSpec, error_if_nonfinite: bool,
    group=None, per_tensor: bool = False, write: str | None = None,
) -> tuple[_engine.Gathered | None, torch.Tensor | None, torch.Tensor]:
    """(gathered, per-tensor norms, total norm), float64. Raises before any write. The
    per-tensor norms are None unless ``per_tensor`` asks for them. ``write`` says what the
    caller will do to the gathered tensors: None (nothing), ``"scale"`` or ``"clamp"``; it
    matters only for Partial DTensors (see :func:`_dtensor_norms`).

    With ``group``, the statistics are those of the whole set across the ranks (see
    :mod:`gradkern.distributed`); the gathered tensors are this rank's (None when it has none).
    """
    fused = _engine.fused_stats(tensors, names, spec) if group is None else None
    if fused is None and distributed.any_dtensor(tensors):
        return _dtensor_norms(tensors, names, spec, error_if_nonfinite, group, per_tensor,
                              write)
    if group is None:
        g, raw, numel = fused or _engine.gather_stats(tensors, names, spec, fused_failed=True)
        _check_defined(g, spec)
        total = _engine.total_norm(raw, numel, spec)
        if error_if_nonfinite:
            _check_finite(total, g, raw, spec, across_ranks=False)
        return g, _engine.per_tensor_norms(raw, numel, spec) if per_tensor else None, total

    g, raw, numel, error = distributed.local_stats(tensors, names, spec)
    device = distributed.collective_device(group, None if g is None else g.device)
    if per_tensor:
        raw_all, numel_all = distributed.reduce_per_tensor(raw, numel, len(tensors), spec, group,
                                                           device, error, error_if_nonfinite)
        norms = _engine.per_tensor_norms(raw_all, numel_all, spec)
        total = _engine.total_norm(raw_all, numel_all, spec)
    else:
        totals = distributed.reduce_totals(raw, numel, spec, group, device, error,
                                           error_if_nonfinite)
        norms, total = None, totals.norm(spec)
    if error_if_nonfinite:
        _check_finite(total, g, raw, spec, across_ranks=True)
    return g, norms, total


def _dtensor_norms(tensors, names, spec: NormSpec, error_if_nonfinite: bool, group,
                   per_tensor: bool, write: str | None):
    """Norms of a list holding DTensor gradients (FSDP2, tensor parallel): each set of DTensors
    with the same mesh and placements is reduced over the mesh dimensions that shard it;
    plain tensors over ``group`` (or not at all). Returns a list of gathered local shards (one
    per set) and, with ``per_tensor``, a list of whole-tensor norms (one tensor per set).

    A Partial DTensor's statistics are those of its sum (its terms are reduced into a new
    tensor), so the set gathered for ``write`` is its own local term: scaling each term scales
    the sum; clamping does not, and ``write="clamp"`` raises TypeError before anything runs.
    """
    if write == "clamp":
        distributed.refuse_partial(tensors, "clip_")
    parts, gathered, set_norms = [], [], []
    work = distributed.reduction_sets(tensors, group)
    for idx, groups in work:
        subset = [tensors[i] for i in idx]
        sub_names = None if names is None else [names[i] for i in idx]
        items = distributed.local_parts(subset)
        g, raw, numel, error = distributed.local_stats(items, sub_names, spec)
        if write is not None and g is not None and distributed.has_partial(subset):
            # the parts read above include reduced copies; the writes go to the terms
            g = _engine.gather(distributed.local_shards(subset), sub_names)
        device = g.device if g is not None else items[0].device
        if per_tensor:  # whole-tensor norms of this set, entry-wise over its sharding groups
            raw_all, numel_all = distributed.reduce_per_tensor(raw, numel, len(idx), spec,
                                                               groups, device, error,
                                                               error_if_nonfinite)
            set_norms.append(_engine.per_tensor_norms(raw_all, numel_all, spec))
        parts.append(distributed.reduce_totals(raw, numel, spec, groups, device, error,
                                               error_if_nonfinite))
        if g is not None:
            gathered.append(g)
    total = distributed.combine_totals(parts).norm(spec)
    if error_if_nonfinite:
        _check_finite(total, gathered, None, spec, across_ranks=True)
    return gathered, (set_norms if per_tensor else None), total


def _clip_each(g, coef, value: float) -> None:
    """clip_in_place over one gathered set, a list of them (DTensor sets), or none. ``coef``
    is one tensor for all, or (per-tensor clipping of DTensor sets) a list, one per set."""
    sets = g if isinstance(g, list) else ([] if g is None else [g])
    coefs = coef if isinstance(coef, list) else [coef] * len(sets)
    for one in sets:  # every set, before the first is written
        _engine.check_writable(one)
    for one, c in zip(sets, coefs):
        _engine.clip_in_place(one, c, value)


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group=None,
) -> torch.Tensor:
    r"""Norm of ``tensors`` viewed as one vector (the tensors themselves, not their ``.grad``).

    Same signature and result dtype as :func:`torch.nn.utils.get_total_norm`, computed in one
    fused read pass with float64 accumulation. Differences from torch, all on inputs where torch
    fails: an empty tensor in the list is fine for ``norm_type=inf``; sparse COO tensors work;
    ``norm_type=0`` counts the non-zero elements of the whole vector, as documented (torch
    counts the tensors that hold a non-zero).

    Args:
        tensors: a tensor, an iterable of tensors, or ``(name, tensor)`` pairs (names then appear
            in error messages).
        norm_type: p of the p-norm: any float, ``inf``, ``-inf``, or ``'inf'``. Default: 2.0.
        error_if_nonfinite: raise RuntimeError, naming the non-finite tensors, if the norm is NaN
            or inf. Default: False.
            It reads the norm on the host, so inside ``torch.compile`` the graph breaks
            there (``fullgraph=True`` raises and says so).
        foreach: accepted for compatibility and ignored (every gradkern op is multi-tensor).
        group: a ``torch.distributed`` process group whose ranks each hold a disjoint part
            of the gradients: the result is then the whole set's (two packed collectives, see
            :mod:`gradkern.distributed`). Default: None (this process only).

    Returns:
        A 0-dim tensor on the first tensor's device, with torch's promoted dtype of the inputs
        (a norm too large for that dtype is ``inf``, as in torch). An empty list gives
        ``tensor(0.)``. For DTensor inputs (FSDP2, tensor parallel), a replicated DTensor, as
        torch returns: ``.full_tensor()`` is the norm.

    Raises:
        ValueError: an unknown ``norm_type``. TypeError: an unsupported dtype (complex,
            integer) or a list mixing tensors and ``(name, tensor)`` pairs. RuntimeError: with
            ``error_if_nonfinite``, a non-finite norm; a negative ``norm_type`` over zero
            elements (it has no value).

    Example:
        >>> import torch, gradkern as gk
        >>> gk.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        return _compiled.get_total_norm(get_total_norm, tensors, norm_type, error_if_nonfinite,
                                        group)
    spec = parse_norm_type(norm_type)
    items, names = split_names(tensors)
    if not items and group is None:
        return torch.tensor(0.0)
    g, _, total = _norms(items, names, spec, error_if_nonfinite, group)
    return _returned(total, g, items)


def _returned(total: torch.Tensor, g, tensors: list) -> torch.Tensor:
    """The norm as torch returns it: in the gradients' promoted dtype, and for DTensor
    gradients (FSDP2, tensor parallel) a DTensor, replicated, whose ``full_tensor()`` is it."""
    value = total.to(_result_dtype(g))
    if isinstance(g, list):  # the DTensor path of _norms
        return distributed.replicated_like(value, tensors)
    return value


def _result_dtype(g) -> torch.dtype:
    """torch's promoted dtype of the gradients; the default dtype for a rank that has none."""
    if isinstance(g, list):
        return result_dtype({one.dtype for one in g}) if g else torch.get_default_dtype()
    return torch.get_default_dtype() if g is None else g.dtype


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    r"""Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)`` in place.

    Like :func:`torch.nn.utils.clip_grads_with_norm_`, but a coefficient >= 1 writes nothing (one
    pass at most, none when no clipping is needed). A NaN ``total_norm`` turns the gradients to
    NaN, as in torch.

    Args:
        parameters: tensors whose ``.grad`` is scaled (or ``(name, tensor)`` pairs).
        max_norm: the norm to clip to; must be >= 0.
        total_norm: the norm the gradients have, e.g. from :func:`get_total_norm`.
        foreach: accepted for compatibility and ignored.

    Raises:
        ValueError: ``max_norm`` is negative or NaN; ``total_norm`` is not one number, or is
            negative (checked for numbers and CPU tensors; a GPU tensor is not read, so as not
            to stall the host). TypeError: a gradient has an unsupported dtype or layout.
            Nothing is modified in any case.

    Example:
        >>> import torch, gradkern as gk
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> gk.clip_grads_with_norm_([p], 1.0, gk.get_total_norm([p.grad]))
        >>> p.grad
        tensor([0.6000, 0.8000])
    """
    max_norm = check_bound(max_norm, "max_norm")
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        return _compiled.clip_grads_with_norm_(clip_grads_with_norm_, parameters, max_norm,
                                               total_norm)
    if distributed.is_dtensor(total_norm):  # torch's get_total_norm over DTensor gradients
        total_norm = total_norm.full_tensor()
    _check_total_norm(total_norm)
    grads, names = grads_of(parameters)
    if not grads:
        return
    # scaling is linear, so each DTensor's local tensor is scaled where it lives, Partial too
    g = _engine.gather(distributed.local_shards(grads), names)
    total = torch.as_tensor(total_norm, device=g.device)
    _engine.clip_in_place(g, _engine.clip_coefficient(max_norm, total).reshape(1),
                          float("inf"))


def _check_total_norm(total_norm) -> None:
    """A norm is one number, and not negative (torch would flip the gradients' signs). The
    sign is checked where reading it costs nothing: a Python number or a CPU tensor (a GPU
    tensor would stall the host)."""
    if isinstance(total_norm, torch.Tensor):
        if total_norm.numel() != 1:
            raise ValueError(f"total_norm must hold one number, got a tensor of shape "
                             f"{tuple(total_norm.shape)}")
        if total_norm.device.type != "cpu":
            return
    try:
        value = float(total_norm)
    except (TypeError, ValueError):
        raise ValueError(f"total_norm must be a number or a one-element tensor, got "
                         f"{total_norm!r}") from None
    if value < 0:
        raise ValueError(f"total_norm must be >= 0 (a norm), got {value}")


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group=None,
) -> torch.Tensor:
    r"""Clip the norm of the gradients (viewed as one vector) to ``max_norm``, in place.

    A drop-in for :func:`torch.nn.utils.clip_grad_norm_`: same arguments, return value and dtype,
    NaN/inf behaviour. One fused read pass computes the norm; the scaling pass is skipped
    entirely when no clipping is needed.

    Args:
        parameters: a tensor, an iterable of tensors, or ``named_parameters()`` pairs (names then
            appear in error messages). Parameters whose ``.grad`` is None are skipped.
        max_norm: the largest norm allowed; must be >= 0.
        norm_type: p of the p-norm (any float, ``inf``, ``-inf``, ``'inf'``). Default: 2.0.
        error_if_nonfinite: raise RuntimeError naming the parameters whose gradients hold
            NaN/inf when the total norm is non-finite; nothing is modified then. Default: False.
            It reads the norm on the host, so inside ``torch.compile`` the graph breaks
            there (``fullgraph=True`` raises and says so).
        foreach: accepted for compatibility and ignored.
        group: a ``torch.distributed`` process group whose ranks each hold a disjoint part
            of the gradients: the result is then the whole set's (two packed collectives, see
            :mod:`gradkern.distributed`). Default: None (this process only).

    Returns:
        The total norm before clipping, 0-dim, on the gradients' device, in their promoted
        dtype; a replicated DTensor for DTensor gradients, as torch returns.

    Raises:
        ValueError: bad ``max_norm`` or ``norm_type``. TypeError: gradients that are not
            floating point (complex included), or a list mixing tensors and ``(name, tensor)``
            pairs. RuntimeError: with ``error_if_nonfinite``, a non-finite norm (a finite one
            that overflows the gradients' dtype included); two gradients that overlap in
            memory. Nothing is modified in any case.

    A gradient listed more than once counts once per appearance in the norm and is scaled once
    per appearance, as torch's in-place sequence leaves it.

    Example:
        >>> import torch, gradkern as gk
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> norm = gk.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> bool(gk.get_total_norm([p.grad for p in model.parameters()]) <= 1.0 + 1e-5)
        True
    """
    max_norm = check_bound(max_norm, "max_norm")
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        return _compiled.clip_(clip_, parameters, max_norm, None, norm_type, False,
                               error_if_nonfinite, group)
    spec = parse_norm_type(norm_type)
    grads, names = grads_of(parameters, warn_empty_generator=True)
    if not grads and group is None:
        return torch.tensor(0.0)
    g, _, total = _norms(grads, names, spec, error_if_nonfinite, group, write="scale")
    _clip_each(g, _engine.clip_coefficient(max_norm, total).reshape(1), float("inf"))
    return _returned(total, g, grads)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    r"""Clamp every gradient element to ``[-clip_value, clip_value]``, in place.

    A drop-in for :func:`torch.nn.utils.clip_grad_value_` that makes one read pass and writes
    only the elements that change (torch makes two full read-write passes). NaN stays NaN.

    Args:
        parameters: a tensor, an iterable of tensors, or ``named_parameters()`` pairs.
        clip_value: the bound; must be >= 0 (``inf`` clamps nothing).
        foreach: accepted for compatibility and ignored.

    DTensor gradients (FSDP2, tensor parallel) are clamped shard by shard where they live.

    Raises:
        ValueError: ``clip_value`` negative or NaN (torch would silently flip signs).
        TypeError: an unsupported dtype or layout, or a DTensor with a Partial placement
            (clamping its terms would not clamp their sum). Nothing is modified.

    Example:
        >>> import torch, gradkern as gk
        >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([-5.0, 0.5, 5.0])
        >>> gk.clip_grad_value_([p], 1.0); p.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    clip_value = check_bound(clip_value, "clip_value")
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        return _compiled.clip_grad_value_(clip_grad_value_, parameters, clip_value)
    grads, names = grads_of(parameters)
    if not grads:
        return
    # Elementwise, so a DTensor's local shard is clamped where it lives. (any_dtensor checks
    # each distinct type once: a per-tensor check costs ~1.5 ms over 10,000 cold gradients.)
    if distributed.any_dtensor(grads):
        distributed.refuse_partial(grads, "clip_grad_value_")
        grads = distributed.local_shards(grads)
    _engine.clip_in_place(_engine.gather(grads, names), None, clip_value)


@torch.no_grad()
def clip_(
    parameters: TensorOrTensors,
    max_norm: float | None = None,
    *,
    value: float | None = None,
    norm_type: float = 2.0,
    per_tensor: bool = False,
    error_if_nonfinite: bool = False,
    group=None,
) -> torch.Tensor:
    r"""The one clipping call for training loops: norm clipping, then value clipping.

    One read pass gathers the norms; one more pass, only over tensors that change, scales and
    clamps them together.

    Args:
        parameters: a tensor, an iterable of tensors, or ``named_parameters()`` pairs.
        max_norm: clip the global norm to this (``None``: no norm clipping). With
            ``per_tensor=True`` each gradient's own norm is clipped to it (Keras ``clipnorm``).
        value: then clamp every element to ``[-value, value]`` (``None``: no value clipping).
        norm_type: p of the p-norm. Default: 2.0.
        per_tensor: clip each tensor's norm separately. Default: False.
        error_if_nonfinite: raise RuntimeError naming the non-finite gradients if the total norm
            is NaN/inf; nothing is modified then. Default: False.
            It reads the norm on the host, so inside ``torch.compile`` the graph breaks
            there (``fullgraph=True`` raises and says so).
        group: a ``torch.distributed`` process group whose ranks each hold a disjoint part
            of the gradients: the result is then the whole set's (two packed collectives, see
            :mod:`gradkern.distributed`). Default: None (this process only).
            With ``per_tensor=True`` every rank must pass the same number of gradients
            (entry i of each rank is a shard of the same tensor).

    Returns:
        The total norm of all gradients *before* clipping, 0-dim, on the gradients' device (a
        replicated DTensor for DTensor gradients, as :func:`clip_grad_norm_` returns).

    Raises:
        ValueError: a negative or NaN ``max_norm``/``value``, or an unknown ``norm_type``.
        TypeError: an integer (or other unsupported) gradient. In every case no gradient changes.

    Example:
        >>> import torch, gradkern as gk
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> norm = gk.clip_(model.named_parameters(), max_norm=1.0, value=0.5)
        >>> norm.shape
        torch.Size([])
    """
    max_norm = None if max_norm is None else check_bound(max_norm, "max_norm")
    value_bound = float("inf") if value is None else check_bound(value, "value")
    if torch.compiler.is_compiling():
        from . import _compiled  # loaded with Dynamo, not by import gradkern
        return _compiled.clip_(clip_, parameters, max_norm, value, norm_type, per_tensor,
                               error_if_nonfinite, group)
    spec = parse_norm_type(norm_type)
    grads, names = grads_of(parameters)
    if not grads and group is None:
        return torch.tensor(0.0)
    g, norms, total = _norms(grads, names, spec, error_if_nonfinite, group,
                             per_tensor=per_tensor and max_norm is not None,
                             write="clamp" if value is not None else
                             "scale" if max_norm is not None else None)
    coef = None
    if max_norm is not None and per_tensor and isinstance(norms, list):  # DTensor sets
        coef = [_engine.clip_coefficient(max_norm, n) for n in norms]
    elif max_norm is not None:
        coef = _engine.clip_coefficient(max_norm, norms if per_tensor else total.reshape(1))
    if coef is not None or value is not None:
        _clip_each(g, coef, value_bound)
    return _returned(total, g, grads)
