"""How the Monitor takes part in an optimizer step, whatever shape the step has.

The Monitor reaches a step through the optimizer's step hooks and nothing else: a replaced
``optimizer.step`` would break LR schedulers, which wrap that method themselves and warn when it
changes. The hooks see three shapes of step:

* **plain**: the gradients are final when the pre-step hook runs;
* **closure** (``optimizer.step(closure)``: Lightning, LBFGS): the closure computes the gradients
  inside the step, after the pre-step hooks. The pre-step hook hands the optimizer a wrapped
  closure instead, and the Monitor observes right after the closure's first call;
* **fused** (``fused=True`` Adam, AdamW, SGD, Adagrad): the optimizer reads two attributes,
  ``grad_scale`` (divide the gradients by it) and ``found_inf`` (skip the update where it is
  non-zero), inside its own kernel. ``torch.amp.GradScaler`` sets them instead of unscaling, so
  the gradients the Monitor sees are still scaled; the Monitor uses the same two attributes to
  clip (a coefficient folded into ``grad_scale``) and to skip (``found_inf``) without a pass of
  its own and without reading anything back to the host.

A step can also be left out by the optimizer altogether: ``GradScaler.step`` does not call a
non-fused optimizer's ``step`` when the gradients hold inf/NaN. Only the scaler knows, so the
Monitor watches ``scaler.step`` when it is given the scaler.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

_UNWRAP_DEPTH = 8  # wrappers around wrappers (a LightningOptimizer around Accelerate's, ...)


def resolve_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that does the work: ``optimizer`` itself, or the one a wrapper holds
    as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), whose step hooks fire on every real update.

    Raises:
        TypeError: for anything else (no step hooks to attach to).
    """
    current = optimizer
    for _ in range(_UNWRAP_DEPTH):
        # A wrapper may subclass Optimizer without running its __init__ (Accelerate's does), so
        # the test is for the hook registry itself, in the instance's own attributes (a wrapper
        # that forwards attribute lookups must not pass for the optimizer it wraps).
        if isinstance(current, torch.optim.Optimizer) and \
                "_optimizer_step_pre_hooks" in vars(current):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    raise TypeError(
        f"the Monitor attaches to a torch.optim.Optimizer (or a wrapper that holds one as "
        f"`.optimizer`, as Accelerate and Lightning do); got {type(optimizer).__name__}")


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` applies ``grad_scale`` and ``found_inf`` in its own kernel:
    torch's fused optimizers, every parameter group fused. (Optimizers that take a
    ``grad_scaler`` argument instead follow an older contract and are treated as plain.)"""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if "grad_scaler" in _step_parameters(type(optimizer)):
        return False
    return all(group.get("fused") for group in optimizer.param_groups)


_STEP_PARAMETERS: dict[type, frozenset[str]] = {}


def _step_parameters(cls: type) -> frozenset[str]:
    names = _STEP_PARAMETERS.get(cls)
    if names is None:
        names = frozenset(inspect.signature(cls.step).parameters)
        _STEP_PARAMETERS[cls] = names
    return names


# ---- closures ------------------------------------------------------------------------------

def closure_of(args: tuple, kwargs: dict) -> Callable | None:
    """The closure a step was called with, if any. ``args`` are the hook's: the optimizer
    first, then what the caller passed."""
    closure = kwargs.get("closure")
    if closure is None and len(args) > 1:
        closure = args[1]
    return closure if callable(closure) else None


def with_closure(args: tuple, kwargs: dict, closure: Callable) -> tuple[tuple, dict]:
    """The step's arguments with its closure replaced by ``closure``."""
    if kwargs.get("closure") is not None:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs


# ---- fused steps ---------------------------------------------------------------------------

class FusedStep:
    """The ``grad_scale`` / ``found_inf`` attributes of one fused step.

    ``scale`` is GradScaler's scale when the gradients are still scaled (None when they are
    not: no GradScaler, or ``scaler.unscale_`` already ran). ``found_inf`` is GradScaler's flag
    (None without one). Attributes the Monitor adds are removed after the step; those
    GradScaler set are replaced, and GradScaler deletes them itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        own = vars(optimizer)
        self.scale: torch.Tensor | None = own.get("grad_scale")
        self.found_inf: torch.Tensor | None = own.get("found_inf")
        self._added: dict[str, object] = {}

    def _set(self, name: str, value) -> None:
        if name not in vars(self.optimizer):
            self._added[name] = value
        setattr(self.optimizer, name, value)

    def fold(self, coef: torch.Tensor) -> None:
        """Multiply the gradients by ``coef`` (0-dim) inside the optimizer's kernel.

        A kernel given ``grad_scale`` also writes the divided gradients back, a pass over them
        of its own; on the CPU, where reading ``coef`` costs nothing, a coefficient of 1 or
        more (nothing to clip) spares it. (On a GPU that read would stall the host.)"""
        if self.scale is None and coef.device.type == "cpu" and bool(coef >= 1.0):
            return
        scale = 1.0 if self.scale is None else self.scale.to(coef.device, torch.float64)
        self._set("grad_scale", (scale / coef).to(torch.float32))

    def unscaled(self) -> None:
        """The gradients were unscaled in place: the kernel must not divide them again."""
        self._set("grad_scale", None)
        self.scale = None

    def skip_if(self, flag: torch.Tensor) -> torch.Tensor:
        """Skip the update where ``flag`` (0-dim, on the device) is non-zero, as well as where
        GradScaler's own flag is; returns the flag the optimizer will read."""
        flag = flag.to(torch.float32)
        if self.found_inf is not None:
            flag = torch.maximum(self.found_inf.to(flag.device, torch.float32), flag)
        self._set("found_inf", flag)
        return flag

    def final_found_inf(self) -> torch.Tensor | None:
        return vars(self.optimizer).get("found_inf")

    def remove_added(self) -> None:
        """After the step (or at the next one, if the step raised): remove what the Monitor
        added, unless someone has set the attribute since."""
        own = vars(self.optimizer)
        for name, value in self._added.items():
            if own.get(name, None) is value:
                del own[name]
        self._added = {}


def first_fused_sgd_step(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Make a fused SGD first step safe to skip; returns the parameters whose new momentum
    buffers must be dropped if the step turns out skipped.

    On its first step fused SGD allocates its momentum buffers uninitialised and lets the
    kernel fill them, so a first step skipped through ``found_inf`` leaves garbage in them (and
    the next step diverges). Without dampening, a zero buffer gives the first step's result
    exactly (``momentum * 0 + grad``), so each parameter gets one beforehand and a skip leaves
    zeros. With dampening it does not, so those parameters are returned, for the caller to
    drop their buffers after a skipped step (a host read, on that first step only).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return []
    to_check: list[torch.Tensor] = []
    state = optimizer.state
    for group in optimizer.param_groups:
        if group["momentum"] == 0 or not group.get("fused"):
            continue
        params = [p for p in group["params"] if p.grad is not None]
        if not params or state.get(params[0], {}).get("momentum_buffer") is not None:
            continue  # after the first step (the usual case: one lookup)
        if any(state.get(p, {}).get("momentum_buffer") is not None for p in params):
            continue  # not torch's first step either
        if group["dampening"] == 0:
            for p in params:
                state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        else:
            to_check.extend(params)
    return to_check


def drop_momentum_buffers(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    for p in params:
        optimizer.state.get(p, {}).pop("momentum_buffer", None)


# ---- plain steps skipped on the host --------------------------------------------------------

def hold_grads(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Take every gradient of the optimizer's parameters away for the length of one step:
    torch's optimizers leave a parameter without a gradient (and its state) untouched. The
    caller puts them back with :func:`give_back` after the step."""
    held = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                held.append((p, p.grad))
                p.grad = None
    return held


def give_back(held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, grad in held:
        p.grad = grad
