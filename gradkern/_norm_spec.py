"""What a ``norm_type`` asks the kernels to accumulate, and how per-tensor results combine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class NormKind(IntEnum):
    """Accumulator codes shared with ``cpp/include/gradkern/ops.h``. Do not renumber."""

    NONE = 0  # inf-norm and 0-"norm": answered by max |g| and the zero count
    L1 = 1
    L2 = 2
    MIN_ABS = 3  # the -inf "norm"
    POWER = 4  # any other p


@dataclass(frozen=True)
class NormSpec:
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
