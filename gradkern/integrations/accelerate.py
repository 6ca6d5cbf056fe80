"""``use_gradkern(accelerator)``: Accelerate (and the Hugging Face Trainer, which clips through
it) clips with gradkern instead of ``torch.nn.utils``.

Example::

    from accelerate import Accelerator
    from gradkern.integrations.accelerate import use_gradkern

    accelerator = use_gradkern(Accelerator())
    ...
    accelerator.clip_grad_norm_(model.parameters(), 1.0)   # gradkern's one-pass clip

    trainer = transformers.Trainer(...)
    use_gradkern(trainer.accelerator)                        # the Trainer's clip too
"""

from __future__ import annotations

try:
    import accelerate
    from accelerate.utils import DistributedType
except ImportError as exc:  # an optional extra
    raise ImportError("gradkern.integrations.accelerate needs Accelerate: pip install "
                      "accelerate (or gradkern[accelerate])") from exc

from .. import clipping, distributed

__all__ = ["use_gradkern"]

# Where Accelerate's clip is not a clip of the gradients this process holds (DeepSpeed clips
# inside its engine; XLA and FSDP1 reduce or flatten first), its own method stays in charge.
_ITS_OWN = (DistributedType.DEEPSPEED, DistributedType.XLA)


def use_gradkern(accelerator: accelerate.Accelerator) -> accelerate.Accelerator:
    """Make ``accelerator.clip_grad_norm_`` and ``accelerator.clip_grad_value_`` gradkern's.

    Same arguments and results as Accelerate's: the gradients are unscaled first (mixed
    precision), the pre-clip total norm is returned as a plain tensor (DTensor gradients of
    FSDP2 included), and ``max_norm=inf`` only measures. Under DeepSpeed, XLA and FSDP1,
    Accelerate's own methods stay. Calling it again changes nothing.

    Returns:
        ``accelerator``, for chaining.
    """
    if getattr(accelerator, "_gradkern_clips", False):
        return accelerator
    own_norm, own_value = accelerator.clip_grad_norm_, accelerator.clip_grad_value_

    def its_own() -> bool:
        return accelerator.distributed_type in _ITS_OWN or (
            accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2)

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        if its_own():
            return own_norm(parameters, max_norm, norm_type)
        accelerator.unscale_gradients()
        total = clipping.clip_grad_norm_(list(parameters), max_norm, norm_type)
        return total.full_tensor() if distributed.is_dtensor(total) else total

    def clip_grad_value_(parameters, clip_value):
        if its_own():
            return own_value(parameters, clip_value)
        accelerator.unscale_gradients()
        clipping.clip_grad_value_(list(parameters), clip_value)

    clip_grad_norm_.__doc__ = own_norm.__doc__
    clip_grad_value_.__doc__ = own_value.__doc__
    accelerator.clip_grad_norm_ = clip_grad_norm_
    accelerator.clip_grad_value_ = clip_grad_value_
    accelerator._gradkern_clips = True
    return accelerator
