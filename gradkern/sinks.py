"""Where the Monitor's records and events go: JSON Lines, TensorBoard, or any callable.

A sink receives plain dicts. Step records look like ``{"type": "step", "step": 12,
"total_norm": 0.8, "skipped": False, "layers": {"encoder.0": {"grad_norm": ..., ...}}}``;
events look like ``{"type": "event", "event": "exploding", "step": 12, "layers": [...],
"message": ..., "evidence": {...}, "advice": [...]}``. The Monitor calls ``flush()`` after every
log step and ``close()`` once.

The Monitor writes a log step's records together, several steps at a time, after those steps
ran. The tracker sinks (:class:`WandB`, :class:`MLflow`) therefore log each record against the
Monitor's own step (a metric of its own in W&B, the ``step`` argument in MLflow), never against
the tracker's current step. They import their package when made, not when gradkern is imported.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable

__all__ = ["Sink", "JSONL", "TensorBoard", "WandB", "MLflow", "Callback", "as_sink"]

# the per-layer statistics a step record can hold, as the trackers log them
_LAYER_SCALARS = ("grad_norm", "grad_rms", "grad_max", "zero_fraction", "weight_norm",
                  "update_ratio")


class Sink:
    """Where a Monitor's records go. A subclass implements :meth:`write`; :meth:`start`,
    :meth:`flush` and :meth:`close` are optional."""

    def start(self, header: dict) -> None:
        """Called once, before any record, with the Monitor's run header: ``{"type": "run",
        "run_id", "started", "gradkern", "model", "parameters", "layers", "layer_kinds",
        "clip_threshold", "settings"}``. By default nothing is done with it."""

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
    keeps every line written before its last log step, and each line is complete JSON. Each
    Monitor run starts with its header record (``"type": "run"``), so several runs can share a
    file and ``gradkern report --run N`` tells them apart.

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

    def start(self, header: dict) -> None:
        self.write(header)

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

    def start(self, header: dict) -> None:
        self.writer.add_text("gradkern/run", json.dumps(_json_safe(header), indent=1), 0)

    def write(self, record: dict) -> None:
        step = record["step"]
        if record.get("type") == "event":
            self.writer.add_text(f"gradkern/{record['event']}", record["message"], step)
            return
        self.writer.add_scalar("gradkern/total_norm", record["total_norm"], step)
        for layer, stats in record["layers"].items():
            for key in _LAYER_SCALARS:
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


def _optional(package: str, sink: str, extra: str):
    """Import an optional tracker package, or say how to get it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"gk.sinks.{sink} needs the {package} package: pip install {package} "
                          f"(or gradkern[{extra}])") from exc


def step_metrics(record: dict, prefix: str) -> dict[str, float]:
    """A step record as flat metric names: ``<prefix>total_norm``, ``<prefix>skipped`` and
    ``<prefix><statistic>/<layer>`` for every layer that had a gradient."""
    out = {f"{prefix}total_norm": record["total_norm"],
           f"{prefix}skipped": float(record.get("skipped", False))}
    if "clip_factor" in record:
        out[f"{prefix}clip_factor"] = record["clip_factor"]
    for layer, stats in record["layers"].items():
        for key in _LAYER_SCALARS:
            if stats.get(key) is not None:
                out[f"{prefix}{key}/{layer}"] = stats[key]
    return out


_EVENT_COLUMNS = ["step", "event", "layers", "message", "advice"]


def _event_row(record: dict) -> list:
    return [record["step"], record["event"], ", ".join(record["layers"]), record["message"],
            record["advice"][0] if record.get("advice") else ""]


class WandB(Sink):
    """Log to a Weights & Biases run: every step record against the Monitor's step, events as
    a table and a per-kind count.

    The records of a log step arrive after the steps they describe, when the run's own step
    has moved on; W&B drops a value logged for a step behind its current one. So this sink
    declares ``<prefix>step`` as a step metric and every ``<prefix>*`` metric as plotted
    against it (``define_metric``), and logs without W&B's ``step``: nothing is dropped and the
    charts' x axis is the optimizer step. Events are rows of the ``<prefix>events`` table
    (step, kind, layers, message, first advice), logged again at each log step that adds one,
    and ``<prefix>event/<kind>`` is 1 at the step of each.

    Args:
        run: a ``wandb`` run; default: the active one (``wandb.run``).
        prefix: before every metric name. Default ``"gradkern/"``.

    Raises:
        ImportError: ``wandb`` is not installed. RuntimeError: no run is given or active.
    """

    def __init__(self, run=None, prefix: str = "gradkern/"):
        wandb = _optional("wandb", "WandB", "wandb")
        self.run = run if run is not None else wandb.run
        if self.run is None:
            raise RuntimeError("gk.sinks.WandB needs a run: call wandb.init() first, or pass "
                               "run=")
        self.prefix = prefix
        self._table = wandb.Table
        self._events: list[list] = []
        self._new_events = False
        self.run.define_metric(f"{prefix}step")
        self.run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")

    def start(self, header: dict) -> None:
        self.run.config.update({f"{self.prefix}monitor": _json_safe(header)},
                               allow_val_change=True)

    def write(self, record: dict) -> None:
        step_key = f"{self.prefix}step"
        if record.get("type") == "event":
            self._events.append(_event_row(record))
            self._new_events = True
            self.run.log({step_key: record["step"],
                          f"{self.prefix}event/{record['event']}": 1.0})
            return
        self.run.log({step_key: record["step"], **step_metrics(record, self.prefix)})

    def flush(self) -> None:
        if self._new_events:
            self.run.log({f"{self.prefix}events": self._table(columns=_EVENT_COLUMNS,
                                                              data=list(self._events))})
            self._new_events = False


class MLflow(Sink):
    """Log to an MLflow run: every step record as metrics at the Monitor's step (one
    ``log_batch`` per log step), events as a ``<prefix>event/<kind>`` metric and, at
    :meth:`close`, the table of events as the artifact ``gradkern_events.json``.

    Args:
        run_id: the run to log to; default: the active run (``mlflow.active_run()``), or one
            started for the sink (and ended at :meth:`close`) when none is active.
        prefix: before every metric name. Default ``"gradkern/"``.

    Raises:
        ImportError: ``mlflow`` is not installed.
    """

    _BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, run_id: str | None = None, prefix: str = "gradkern/"):
        mlflow = _optional("mlflow", "MLflow", "mlflow")
        self._mlflow = mlflow
        self._client = mlflow.tracking.MlflowClient()
        self._owns_run = False
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                active = mlflow.start_run()
                self._owns_run = True
            run_id = active.info.run_id
        self.run_id = run_id
        self.prefix = prefix
        self._pending: list = []
        self._events: list[list] = []

    def start(self, header: dict) -> None:
        self._client.log_dict(self.run_id, _json_safe(header), "gradkern_run.json")

    def write(self, record: dict) -> None:
        Metric = self._mlflow.entities.Metric
        now = int(time.time() * 1000)
        if record.get("type") == "event":
            self._events.append(_event_row(record))
            self._pending.append(Metric(f"{self.prefix}event/{record['event']}", 1.0, now,
                                        record["step"]))
            return
        for key, value in step_metrics(record, self.prefix).items():
            self._pending.append(Metric(key, float(value), now, record["step"]))

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self._BATCH], self._pending[self._BATCH:]
            self._client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.flush()
        if self._events:
            self._client.log_dict(self.run_id, {"columns": _EVENT_COLUMNS, "data": self._events},
                                  "gradkern_events.json")
        if self._owns_run:
            self._client.set_terminated(self.run_id)
            if (self._mlflow.active_run() is not None
                    and self._mlflow.active_run().info.run_id == self.run_id):
                self._mlflow.end_run()


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
