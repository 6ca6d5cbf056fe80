"""What the monitor reports: an event, with the evidence that fired it and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("nonfinite", "exploding", "spike", "vanishing", "stalled", "dead")

# Remedies from the literature on vanishing and exploding gradients, by the kind of event.
ADVICE: dict[str, tuple[str, ...]] = {
    "nonfinite": (
        "lower the learning rate",
        "clip gradients by norm (gk.clip_ / Monitor(clip=...)) or by value",
        "check the loss and inputs for log(0), division by zero or overflow in fp16",
        "use Monitor(skip_nonfinite=True) to drop the bad steps while you investigate",
    ),
    "exploding": (
        "clip gradients by norm (Monitor(clip=1.0)), by value, or unit-wise (gk.AGC)",
        "lower the learning rate",
        "use a smaller initial weight scale (Glorot/He/LeCun init matched to the activation)",
        "once training is stable, adaptive clipping (gk.ZClip, gk.AutoClip) absorbs later "
        "spikes; it learns its threshold from the norms it has seen, so it cannot catch a run "
        "that explodes from its first steps",
        "add normalisation (batch norm / layer norm) and L2 weight decay",
    ),
    "spike": (
        "clip gradients adaptively (gk.ZClip or gk.AutoClip) to absorb isolated spikes",
        "lower the learning rate or lengthen warm-up",
        "look for outlier batches",
    ),
    "vanishing": (
        "use a non-saturating activation (ReLU, leaky ReLU, GELU) instead of sigmoid/tanh",
        "initialise for the activation (He for ReLU-like, Glorot/LeCun for tanh/sigmoid)",
        "add batch/layer normalisation",
        "add residual (skip) connections or use fewer layers",
    ),
    "stalled": (
        "raise the learning rate for the stalled layers (per-group learning rates)",
        "initialise for the activation (He/Glorot) so early layers receive gradient",
        "use a non-saturating activation and normalisation",
    ),
    "dead": (
        "use leaky ReLU / GELU instead of ReLU",
        "lower the learning rate (large steps knock units into the dead zone)",
        "initialise with He init and small positive biases",
    ),
}


@dataclass
class Event:
    """One finding of a detector.

    Attributes:
        kind: one of ``KINDS``.
        step: the optimizer step (0-based) the evidence belongs to.
        layers: the layers involved; for ``"nonfinite"`` the layers whose gradients hold NaN/inf,
            in backward order (the first one is where the bad values appeared).
        message: one line for humans.
        evidence: the numbers that fired the rule.
        advice: remedies that fit this kind of problem.

    Example:
        >>> e = Event("dead", 12, ["net.3"], "90% zeros", {"zero_fraction": 0.9})
        >>> e.advice[0]
        'use leaky ReLU / GELU instead of ReLU'
    """

    kind: str
    step: int
    layers: list[str]
    message: str
    evidence: dict = field(default_factory=dict)
    advice: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {KINDS}")
        if not self.advice:
            self.advice = ADVICE[self.kind]

    def as_dict(self) -> dict:
        return {"event": self.kind, "step": self.step, "layers": list(self.layers),
                "message": self.message, "evidence": self.evidence,
                "advice": list(self.advice)}
