"""Gradient clipping: drop-in replacements for ``torch.nn.utils`` and :func:`clip_`.

Each function validates all of its arguments and every gradient before it writes anything.
"""

from __future__ import annotations

import torch

from . import _norms, distributed
from ._grad_set import GradSet, Intent
from ._norms import NormSpec, parse_norm_type
from ._params import TensorOrTensors, check_bound, grads_of, split_names

__all__ = ["get_total_norm", "clip_grads_with_norm_", "clip_grad_norm_", "clip_grad_value_",
           "clip_"]



def _norms_of(gradients: GradSet, spec: NormSpec, error_if_nonfinite: bool,
              per_tensor: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(per-tensor norms or None, total norm)``, float64, with the drop-ins' checks: a
    negative order over nothing, and ``error_if_nonfinite``. Raises before any write."""
    norms, total = gradients.norms(spec, per_tensor=per_tensor, may_sync=error_if_nonfinite)
    gradients.check_defined(spec)
    if error_if_nonfinite:
        gradients.check_finite(total, spec)
    return norms, total


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
    gradients = GradSet.of(items, names, group=group)
    _, total = _norms_of(gradients, spec, error_if_nonfinite)
    return gradients.returned(total)


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
    gradients = GradSet.of(grads, names, intent=Intent.SCALE)
    total = torch.as_tensor(total_norm, device=grads[0].device)
    gradients.write(_norms.clip_coefficient(max_norm, total).reshape(1))


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
    gradients = GradSet.of(grads, names, group=group, intent=Intent.SCALE)
    _, total = _norms_of(gradients, spec, error_if_nonfinite)
    gradients.write(_norms.clip_coefficient(max_norm, total).reshape(1))
    return gradients.returned(total)


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
    # elementwise, so a DTensor's local shard is clamped where it lives
    GradSet.of(grads, names, intent=Intent.CLAMP, what="clip_grad_value_").write(None, clip_value)


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
    intent = (Intent.CLAMP if value is not None else
              Intent.SCALE if max_norm is not None else Intent.READ)
    gradients = GradSet.of(grads, names, group=group, intent=intent)
    norms, total = _norms_of(gradients, spec, error_if_nonfinite,
                             per_tensor=per_tensor and max_norm is not None)
    coef = None
    if max_norm is not None:
        coef = _norms.clip_coefficient(max_norm, norms if per_tensor else total.reshape(1))
    if coef is not None or value is not None:
        gradients.write(coef, value_bound)
    return gradients.returned(total)
