"""Where the Monitor's records and events go: JSON Lines, TensorBoard, or any callable.

A sink receives plain dicts. Step records look like ``{"type": "step", "step": 12,
"total_norm": 0.8, "skipped": False, "layers": {"encoder.0": {"grad_norm": ..., ...}}}``;
events look like ``{"type": "event", "event": "exploding", "step": 12, "layers": [...],
"message": ..., "evidence": {...}, "advice": [...]}``. The Monitor calls ``flush()`` after every
log step and ``close()`` once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

__all__ = ["Sink", "JSONL", "TensorBoard", "Callback", "as_sink"]


class Sink:
    def write(self, record: dict) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


def _json_safe(value):
    """NaN/inf are not JSON; write them as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class JSONL(Sink):
    """Append one JSON object per line to ``path``.

    The file is opened in append mode and flushed at every log step, so a run that is killed
    keeps every line written before its last log step, and each line is complete JSON.

    Example:
        >>> import gradkern as gk, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "grads.jsonl")
        >>> sink = gk.sinks.JSONL(path); sink.write({"type": "step", "step": 0}); sink.close()
        >>> open(path).read()
        '{"type": "step", "step": 0}\\n'
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(_json_safe(record)) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


class TensorBoard(Sink):
    """Scalars per layer (``grad_norm/<layer>``, ``grad_max/<layer>``, ...) and events as text.

    Args:
        writer_or_logdir: a ``torch.utils.tensorboard.SummaryWriter`` or a log directory
            (then one is created, which needs the optional ``tensorboard`` package).
        histograms: also log, on log steps, each layer's histogram of log2|g| over its
            gradient elements (one bin per power of two; the Monitor computes it on the device
            when a sink asks for it, at the cost of one more read pass on log steps).
            Default False.
    """

    _SCALARS = ("grad_norm", "grad_rms", "grad_max", "zero_fraction", "weight_norm",
                "update_ratio")

    def __init__(self, writer_or_logdir, histograms: bool = False):
        if isinstance(writer_or_logdir, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional dependency
                raise ImportError("gk.sinks.TensorBoard(logdir) needs the tensorboard package "
                                  "(pip install tensorboard), or pass a SummaryWriter") from exc
            self.writer = SummaryWriter(os.fspath(writer_or_logdir))
            self._owns = True
        else:
            self.writer = writer_or_logdir
            self._owns = False
        self.histograms = histograms

    def write(self, record: dict) -> None:
        step = record["step"]
        if record.get("type") == "event":
            self.writer.add_text(f"gradkern/{record['event']}", record["message"], step)
            return
        self.writer.add_scalar("gradkern/total_norm", record["total_norm"], step)
        for layer, stats in record["layers"].items():
            for key in self._SCALARS:
                if stats.get(key) is not None:
                    self.writer.add_scalar(f"{key}/{layer}", stats[key], step)
        if self.histograms and "log2_hist_range" in record:
            low, high = record["log2_hist_range"]
            edges = [float(e) for e in range(low + 1, high + 1)]  # right edge of each bin
            for layer, stats in record["layers"].items():
                counts = stats.get("log2_hist")
                if not counts or not sum(counts):
                    continue
                centres = [low + k + 0.5 for k in range(len(counts))]
                total = float(sum(counts))
                first = next(k for k, c in enumerate(counts) if c)
                last = max(k for k, c in enumerate(counts) if c)
                self.writer.add_histogram_raw(
                    f"log2_abs_grad/{layer}", min=low + first, max=low + last + 1, num=total,
                    sum=sum(c * x for c, x in zip(counts, centres)),
                    sum_squares=sum(c * x * x for c, x in zip(counts, centres)),
                    bucket_limits=edges, bucket_counts=[float(c) for c in counts],
                    global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self._owns:
            self.writer.close()


class Callback(Sink):
    """Any callable taking a dict."""

    def __init__(self, fn: Callable[[dict], object]):
        self.fn = fn

    def write(self, record: dict) -> None:
        self.fn(record)


def as_sink(obj) -> Sink:
    if isinstance(obj, Sink):
        return obj
    if callable(obj):
        return Callback(obj)
    raise TypeError(f"a sink must be a gradkern.sinks.Sink or a callable taking a dict; got {obj!r}")
