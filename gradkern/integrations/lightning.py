"""``GradkernCallback``: :class:`gradkern.Monitor` in a Lightning ``Trainer.fit``.

Example::

    import lightning as L
    from gradkern.integrations.lightning import GradkernCallback

    trainer = L.Trainer(max_epochs=3, callbacks=[GradkernCallback(clip=1.0, log_every=10)])
    trainer.fit(model, train_dataloader)   # records in the Trainer's loggers as gradkern/...
"""

from __future__ import annotations

import logging

try:
    import lightning.pytorch as pl
except ImportError as exc:  # an optional extra
    raise ImportError("gradkern.integrations.lightning needs Lightning: pip install lightning "
                      "(or gradkern[lightning])") from exc

from ..monitor import Monitor
from ..sinks import Sink, step_metrics
from ._framework import clip_taken_over

__all__ = ["GradkernCallback"]

log = logging.getLogger("gradkern")


class _TrainerLoggers(Sink):
    """Step records to the Trainer's loggers (``<prefix>total_norm``,
    ``<prefix>grad_norm/<layer>``, ... at the optimizer step they describe), events to them as
    ``<prefix>event/<kind>`` = 1 and to the ``gradkern`` Python logger as warnings."""

    def __init__(self, trainer: pl.Trainer, prefix: str):
        self.trainer = trainer
        self.prefix = prefix

    def write(self, record: dict) -> None:
        if record.get("type") == "event":
            metrics = {f"{self.prefix}event/{record['event']}": 1.0}
            log.warning("gradkern %s at step %d: %s", record["event"], record["step"],
                        record["message"])
        else:
            metrics = step_metrics(record, self.prefix)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])


class GradkernCallback(pl.Callback):
    """Run a :class:`gradkern.Monitor` over every optimizer step of ``Trainer.fit``.

    The Monitor sees the gradients Lightning is about to apply: after the closure ran (Lightning
    steps through ``optimizer.step(closure)``), accumulated over ``accumulate_grad_batches``,
    after the AMP unscale (with ``precision="16-mixed"`` it also watches the GradScaler, so the
    steps it skips are recorded). Its records and events go to the Trainer's loggers, events also
    to the ``gradkern`` Python logger, and it is closed when the fit ends (or fails).

    Clipping is the Monitor's: give ``clip=``. A ``Trainer(gradient_clip_val=...)`` is taken
    over when no ``clip`` is given (by norm, or by value with
    ``gradient_clip_algorithm="value"``): Lightning would clip before the Monitor records, so
    for the fit the Trainer's own setting is off and the Monitor clips after recording.

    Args:
        log_prefix: before the metric names in the Trainer's loggers. Default
            ``"gradkern/"``. ``None``: do not log to them.
        **monitor_kwargs: for :class:`gradkern.Monitor` (``log_every``, ``clip``,
            ``skip_nonfinite``, ``detectors``, ``sinks``, ...).

    Attributes:
        monitor: the Monitor of the current (or last) fit.
    """

    def __init__(self, log_prefix: str | None = "gradkern/", **monitor_kwargs):
        super().__init__()
        self.log_prefix = log_prefix
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._taken_clip = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradkernCallback watches one optimizer; this fit has "
                             f"{len(trainer.optimizers)}")
        kwargs = dict(self.monitor_kwargs)
        if clip_taken_over(kwargs, trainer.gradient_clip_val,
                           str(getattr(trainer.gradient_clip_algorithm, "value", "norm"))):
            self._taken_clip = trainer.gradient_clip_val
            trainer.gradient_clip_val = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            kwargs.setdefault("scaler", scaler)
        if self.log_prefix is not None:
            kwargs["sinks"] = [*kwargs.get("sinks", ()), _TrainerLoggers(trainer,
                                                                          self.log_prefix)]
        self.monitor = Monitor(pl_module, trainer.optimizers[0], **kwargs)

    def _finish(self, trainer: pl.Trainer) -> None:
        if self.monitor is not None:
            self.monitor.close()
        if self._taken_clip is not None:
            trainer.gradient_clip_val, self._taken_clip = self._taken_clip, None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._finish(trainer)
