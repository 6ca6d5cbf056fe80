"""What the framework callbacks share: taking over the framework's own clipping setting."""

from __future__ import annotations

from ..clippers import ClipByNorm, ClipByValue


def clip_taken_over(monitor_kwargs: dict, max_norm: float | None,
                    algorithm: str = "norm") -> bool:
    """Give the Monitor the framework's clipping (``max_norm`` by ``algorithm``) unless the
    caller chose a ``clip`` of their own; True when it was taken (the framework's own setting
    must then be turned off for the fit, so the gradients are clipped once, by the Monitor,
    after it recorded them)."""
    if not max_norm or max_norm <= 0 or monitor_kwargs.get("clip") is not None:
        return False
    monitor_kwargs["clip"] = (ClipByValue(float(max_norm)) if algorithm == "value"
                              else ClipByNorm(float(max_norm)))
    return True
