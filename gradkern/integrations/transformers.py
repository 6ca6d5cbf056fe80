"""``GradkernCallback``: :class:`gradkern.Monitor` in a Hugging Face ``Trainer``.

Example::

    from transformers import Trainer, TrainingArguments
    from gradkern.integrations.accelerate import use_gradkern
    from gradkern.integrations.transformers import GradkernCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0),
                      train_dataset=dataset, callbacks=[GradkernCallback(log_every=10)])
    use_gradkern(trainer.accelerator)   # optional: the Trainer's grad_norm pass is gradkern's too
    trainer.train()
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # an optional extra
    raise ImportError("gradkern.integrations.transformers needs transformers: pip install "
                      "transformers (or gradkern[transformers])") from exc

from ..monitor import Monitor
from ._framework import clip_taken_over

__all__ = ["GradkernCallback"]


class GradkernCallback(TrainerCallback):
    """Run a :class:`gradkern.Monitor` over every optimizer step of ``Trainer.train``.

    The Monitor attaches to the Trainer's model and to its optimizer (Accelerate's wrapper is
    looked through), and is closed when training ends.

    Clipping is the Monitor's. The Trainer clips by ``args.max_grad_norm`` before the optimizer
    steps, which is before the Monitor records; so, unless ``clip=`` is given, the callback
    takes that setting over for the run: the Trainer then only measures the norm it logs as
    ``grad_norm`` (the same pre-clip norm the Monitor records for that step), and the Monitor
    clips, folding its coefficient into a fused optimizer's step. ``args.max_grad_norm`` is
    restored when training ends.

    Args:
        **monitor_kwargs: for :class:`gradkern.Monitor` (``log_every``, ``clip``,
            ``skip_nonfinite``, ``detectors``, ``sinks``, ...).

    Attributes:
        monitor: the Monitor of the current (or last) run.
    """

    def __init__(self, **monitor_kwargs):
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._taken_clip = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("GradkernCallback needs the Trainer's model and optimizer")
        monitor_kwargs = dict(self.monitor_kwargs)
        if clip_taken_over(monitor_kwargs, args.max_grad_norm):
            self._taken_clip, args.max_grad_norm = args.max_grad_norm, 0.0
        self.monitor = Monitor(model, optimizer, **monitor_kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        if self._taken_clip is not None:
            args.max_grad_norm, self._taken_clip = self._taken_clip, None
