"""Norm arithmetic, in one place: what a ``norm_type`` asks the kernels to accumulate, how their
per-tensor results become norms, torch's clip coefficient, the dtypes results come back in, and
the errors about norms.

The kernels return, per tensor, a power sum (what :class:`NormKind` says: sum |g|, sum g^2,
sum |g|^p, or min |g|), max |g|, and the non-finite and zero counts, all float64 or int64. A
norm is then a root of a sum, a minimum, a maximum or a count; :func:`root` is the one place
where a power sum becomes a norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING

import torch

from ._constants import DTYPES_BY_CODE, NormKind

if TYPE_CHECKING:
    from .backends import RawStats

__all__ = ["NormKind", "NormSpec", "parse_norm_type", "L2", "CLIP_EPS", "clip_coefficient",
           "root", "per_tensor_norms", "total_norm", "result_dtype", "result_dtype_of_mask",
           "stats_dtype", "nonfinite_norm_error", "undefined_norm_error"]


@dataclass(frozen=True)
class NormSpec:
    """A parsed ``norm_type``: its order ``p`` and what the kernels accumulate for it."""

    p: float
    kind: NormKind


def parse_norm_type(norm_type: float | int | str) -> NormSpec:
    """Validate ``norm_type`` the way torch reads it (``float(norm_type)``, so ``'inf'`` works).

    Raises:
        ValueError: for NaN or anything ``float()`` cannot read.
    """
    if type(norm_type) is float or type(norm_type) is int:  # not a tensor: those can change
        common = _COMMON.get(norm_type)
        if common is not None:
            return common
    return _parse(norm_type)


def _parse(norm_type: float | int | str) -> NormSpec:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(p):
        raise ValueError("norm_type must not be NaN")
    if p == math.inf or p == 0.0:
        kind = NormKind.NONE
    elif p == -math.inf:
        kind = NormKind.MIN_ABS
    elif p == 1.0:
        kind = NormKind.L1
    elif p == 2.0:
        kind = NormKind.L2
    else:
        kind = NormKind.POWER
    return NormSpec(p, kind)


# The norm types nearly every call uses, parsed once: right after a backward pass even this
# little Python runs out of cache, at several microseconds a call.
_COMMON = {p: _parse(p) for p in (2.0, 1.0, math.inf, -math.inf, 0.0)}
L2 = _COMMON[2.0]  # what the clippers and the Monitor measure

CLIP_EPS = 1e-6  # torch's guard in max_norm / (norm + eps)


def clip_coefficient(max_norm: float | torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """torch's clip coefficient, ``min(max_norm / (norm + 1e-6), 1)``, in float64 (per entry
    of ``norm``). NaN stays NaN: a NaN norm poisons the gradients, as in torch."""
    return (max_norm / (norm.to(torch.float64) + CLIP_EPS)).clamp(max=1.0)


def root(power: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """The norm from the kernels' accumulator (summed over tensors, or per tensor) for a kind
    that has one: sqrt of sum g^2, sum |g| itself, (sum |g|^p)^(1/p), min |g| itself."""
    if spec.kind == NormKind.L2:
        return power.sqrt()
    if spec.kind == NormKind.POWER:
        return power.pow(1.0 / spec.p)
    return power  # L1, MIN_ABS


def per_tensor_norms(raw: RawStats, numel: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """float64 norm of each tensor."""
    if spec.kind != NormKind.NONE:
        return root(raw.power_sum, spec)
    if spec.p == 0.0:
        return (numel - raw.zeros).to(torch.float64)
    return raw.max_abs


def total_norm(raw: RawStats, numel: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """float64 norm of all tensors viewed as one vector (0-dim)."""
    if spec.kind == NormKind.MIN_ABS:
        return raw.power_sum.min()
    if spec.kind != NormKind.NONE:
        return root(raw.power_sum.sum(), spec)
    if spec.p == 0.0:
        return (numel - raw.zeros).sum().to(torch.float64)
    return raw.max_abs.max()


def result_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype torch's norm functions return over tensors of these dtypes (type promotion),
    which the drop-ins return too."""
    return reduce(torch.promote_types, sorted(dtypes, key=str))


# result_dtype of every non-empty set of the four dtypes, indexed by its mask of codes (bit c for
# code c, as the C table readers report it): a lookup instead of promotions on every call.
_RESULT_DTYPE_BY_MASK: tuple[torch.dtype | None, ...] = (None,) + tuple(
    result_dtype({dtype for code, dtype in enumerate(DTYPES_BY_CODE) if mask >> code & 1})
    for mask in range(1, 1 << len(DTYPES_BY_CODE)))


def result_dtype_of_mask(dtype_mask: int) -> torch.dtype:
    """:func:`result_dtype` of the dtypes whose codes are the bits set in a C reader's mask."""
    return _RESULT_DTYPE_BY_MASK[dtype_mask]


def stats_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of :class:`gradkern.GradStats` fields and of a clipper's returned norm, given
    the gradients' :func:`result_dtype` (None: no gradients): float64 when a gradient is
    float64, else float32. Statistics are kept at least at float32 so that a norm of fp16 or
    bf16 gradients does not lose its digits (or overflow) on the way back."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nonfinite_norm_error(spec: NormSpec, detail: str = "") -> RuntimeError:
    """What ``error_if_nonfinite=True`` raises, with torch's wording and ``detail`` (which
    gradients, or why) after it."""
    where = f" {detail}" if detail else ""
    return RuntimeError(
        f"The total norm of order {spec.p} for gradients from `parameters` is non-finite, so it "
        f"cannot be clipped.{where} To disable this error and scale the gradients by the "
        f"non-finite norm anyway, set `error_if_nonfinite=False`")


def undefined_norm_error(spec: NormSpec) -> RuntimeError:
    """A negative order over zero elements: the minimum, or a sum of |g|^p, over nothing has no
    value (torch raises for it too)."""
    return RuntimeError(f"the norm of order {spec.p} of zero elements is undefined (it has no "
                        "identity value); torch raises for it too")
