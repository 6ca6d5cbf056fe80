"""Pictures and a self-contained HTML report from Monitor records (``gk.sinks.JSONL`` files).

``gradkern report RUN.jsonl -o report.html`` draws, for any run a Monitor logged: the gradient
norm of every layer over the steps (log scale), the gradient flow across layers (RMS and max
|g| per layer) at a few steps, and the total norm with the clip threshold and the events
marked. ``gradkern demo`` uses the same functions for its runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["Run", "load_jsonl", "run_figures", "write_html", "main_report", "new_figure",
           "finish_axes", "png_bytes"]


class ReportError(Exception):
    """Input the report cannot draw: the message is one line naming the file and the problem."""


@dataclass
class Run:
    """One logged run: its header, step records and events, as the sinks wrote them."""

    name: str
    steps: list[dict]
    events: list[dict]
    clip_threshold: float | None = None
    summary: dict = field(default_factory=dict)  # what the demo's table shows for it
    key: str = ""  # file-name stem of its pictures (default: from the name)
    header: dict = field(default_factory=dict)  # the Monitor's "run" record, when there is one
    skipped_lines: int = 0  # lines of its file that were not gradkern records

    def file_key(self) -> str:
        return self.key or "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)

    def layer_label(self, layer: str) -> str:
        """A layer as the pictures name it: its name and what it is, e.g. ``2 Linear(12->8)``."""
        kind = self.header.get("layer_kinds", {}).get(layer)
        return f"{layer} {kind}" if kind else layer


def _is_step(record: dict) -> bool:
    return (isinstance(record.get("step"), int) and isinstance(record.get("layers"), dict)
            and "total_norm" in record)


def _is_event(record: dict) -> bool:
    return (isinstance(record.get("step"), int) and isinstance(record.get("event"), str)
            and isinstance(record.get("layers"), list))


def load_runs(path: str) -> list[Run]:
    """Every run in a ``gk.sinks.JSONL`` file, in order. A run starts at a Monitor's header
    record or, in a file without them, where the step count goes back. Lines that are not
    gradkern records (a torn last line from a killed run, text from elsewhere) are skipped and
    counted in ``Run.skipped_lines``.

    Raises:
        ReportError: the file cannot be read, is not text, or holds no gradkern record.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory, not a JSONL file") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file (gk.sinks.JSONL writes UTF-8 JSON "
                          "lines)") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    runs: list[Run] = []
    skipped = 0

    def start(header: dict) -> Run:
        runs.append(Run(stem, [], [], header=header))
        return runs[-1]

    current: Run | None = None
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        kind = record.get("type") if isinstance(record, dict) else None
        if kind == "run":
            current = start(record)
        elif kind == "step" and _is_step(record):
            if current is None or (current.steps and record["step"] <= current.steps[-1]["step"]
                                   and not current.header):
                current = start({})
            current.steps.append(record)
        elif kind == "event" and _is_event(record):
            if current is None:
                current = start({})
            current.events.append(record)
        else:
            skipped += 1
    if not runs or not any(r.steps for r in runs):
        what = "no gradkern step records" if runs else "no gradkern records"
        raise ReportError(f"{path}: {what} (is it a file gk.sinks.JSONL wrote?)")
    for k, run in enumerate(runs):
        run.skipped_lines = skipped
        if len(runs) > 1:
            run.name = f"{stem} (run {k + 1} of {len(runs)})"
            run.key = f"{stem}_run{k + 1}"
        threshold = run.header.get("clip_threshold")
        run.clip_threshold = threshold if isinstance(threshold, (int, float)) else None
    return runs


def load_jsonl(path: str, name: str | None = None, run: int = -1) -> Run:
    """One run of a ``gk.sinks.JSONL`` file (the last one by default; ``run`` counts from 1,
    or from the end when negative). See :func:`load_runs`.

    Raises:
        ReportError: see :func:`load_runs`; also a ``run`` the file does not have.
    """
    chosen = _pick(load_runs(path), path, run)
    if name is not None:
        chosen.name = name
    return chosen


def _pick(runs: list[Run], path: str, run: int) -> Run:
    if run == 0 or not -len(runs) <= run <= len(runs):
        raise ReportError(f"{path}: has {len(runs)} run(s); --run {run} is not one of them "
                          f"(1 to {len(runs)}, or -1 for the last)")
    return runs[run - 1 if run > 0 else run]


def _layers(run: Run) -> list[str]:
    names: list[str] = []
    for record in run.steps:
        for layer in record["layers"]:
            if layer not in names:
                names.append(layer)
    return names


def _positive(v) -> float:
    """A value for a log axis; float() also reads the "nan"/"inf" strings the JSONL sink writes."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v if v > 0 and math.isfinite(v) else float("nan")


def new_figure(size: tuple[float, float]):
    """``(figure, axes)`` of one plot. A bare :class:`~matplotlib.figure.Figure` renders to
    files without pyplot, so drawing here never changes the caller's matplotlib backend."""
    fig = Figure(figsize=size)
    return fig, fig.subplots()


# Above this many layers the per-layer norms are a heatmap (layer x step): one line and one
# legend entry per layer stop being readable well before that.
HEATMAP_LAYERS = 24


def finish_axes(fig, ax, xlabel: str, ylabel: str, title: str, legend_size: int = 7,
                steps_on_x: bool = True):
    """Labels, legend, grid (and integer ticks when x counts steps) on a log y axis (a linear
    one, with a note, when nothing is finite and positive: a run that was non-finite from its
    first step)."""
    if _has_positive(ax):
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite value to draw: every value is NaN, inf or 0",
                transform=ax.transAxes, ha="center", va="center", color="tab:red")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # a long run name must not push the title past the figure's edge
    ax.set_title("\n".join(textwrap.fill(line, 80) for line in title.split("\n")))
    if steps_on_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def _has_positive(ax) -> bool:
    """Whether a line of ``ax`` has a value a log axis can show (vertical marker lines, whose
    y runs over the axes and not the data, do not count)."""
    for line in ax.get_lines():
        if line.get_transform() == ax.get_xaxis_transform():
            continue
        y = np.asarray(line.get_ydata(), dtype=float)
        if np.any(np.isfinite(y) & (y > 0)):
            return True
    return False


def _all_steps(ax, steps: list[int]) -> None:
    """Show every step of the run, those with nothing finite to draw included (a run that
    diverged: its skipped steps are marked on the band)."""
    if len(steps) > 1:
        ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)


def _norm_of(record: dict, layer: str, field_name: str = "grad_norm") -> float:
    return _positive(record["layers"].get(layer, {}).get(field_name, "nan"))


def layer_norms_figure(run: Run):
    """The gradient norm of every layer over the steps: a line per layer, or for runs with
    more than :data:`HEATMAP_LAYERS` layers a heatmap with the first and last layers named."""
    steps = [r["step"] for r in run.steps]
    layers = _layers(run)
    title = f"{run.name}: gradient norm per layer"
    if len(layers) > HEATMAP_LAYERS:
        return _layer_heatmap(run, steps, layers, title)
    fig, ax = new_figure((8, 4.5))
    cmap = colormaps["viridis"].resampled(max(len(layers), 2))
    for k, layer in enumerate(layers):
        ax.plot(steps, [_norm_of(r, layer) for r in run.steps], color=cmap(k),
                label=run.layer_label(layer), linewidth=1.2)
    _all_steps(ax, steps)
    return finish_axes(fig, ax, "optimizer step", "gradient L2 norm of the layer",
                       f"{title}\n(input side dark, output side light)")


def _layer_heatmap(run: Run, steps: list[int], layers: list[str], title: str):
    grid = np.array([[_norm_of(r, layer) for r in run.steps] for layer in layers])
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(grid)
    fig, ax = new_figure((8, 6))
    finite = np.isfinite(logs)
    if finite.any():
        image = ax.imshow(np.where(finite, logs, np.nan), aspect="auto", origin="lower",
                          interpolation="nearest", cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5))
        fig.colorbar(image, ax=ax, label="log10 gradient L2 norm")
    else:
        ax.text(0.5, 0.5, "no finite value to draw: every value is NaN, inf or 0",
                transform=ax.transAxes, ha="center", va="center", color="tab:red")
    shown = sorted({0, len(layers) // 2, len(layers) - 1})
    ax.set_yticks(shown)
    ax.set_yticklabels([run.layer_label(layers[i]) for i in shown], fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"layer (input side at the bottom; {len(layers)} layers)")
    ax.set_title(f"{title} (blank: NaN, inf or 0)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def gradient_flow_figure(run: Run, at: list[int] | None = None):
    """RMS and max |g| of every layer, input to output, at a few steps."""
    layers = _layers(run)
    if at is None:
        n = len(run.steps)
        at = sorted({0, n // 2, n - 1}) if n else []
    fig, ax = new_figure((8, 4.5))
    x = list(range(len(layers)))
    for k in at:
        record = run.steps[k]
        rms = [_norm_of(record, layer, "grad_rms") for layer in layers]
        mx = [_norm_of(record, layer, "grad_max") for layer in layers]
        line, = ax.plot(x, rms, marker="o" if len(layers) <= 60 else None,
                        label=f"RMS |g|, step {record['step']}")
        ax.plot(x, mx, marker="^" if len(layers) <= 60 else None, linestyle="--",
                color=line.get_color(), label=f"max |g|, step {record['step']}")
    if len(layers) <= HEATMAP_LAYERS:
        ax.set_xticks(x)
        ax.set_xticklabels([run.layer_label(layer) for layer in layers], rotation=45,
                           ha="right", fontsize=7)
    else:  # name a few, as in the heatmap
        shown = sorted({0, len(layers) // 2, len(layers) - 1})
        ax.set_xticks(shown)
        ax.set_xticklabels([run.layer_label(layers[i]) for i in shown], fontsize=7)
    return finish_axes(fig, ax, f"layer (input -> output; {len(layers)} layers)",
                       "|gradient| (log scale)", f"{run.name}: gradient flow across layers",
                       steps_on_x=False)


def total_norm_figure(run: Run):
    """The total gradient norm over the steps, with the clip threshold, the events, and the
    skipped steps on a band of their own at the bottom."""
    fig, ax = new_figure((8, 4.5))
    steps = [r["step"] for r in run.steps]
    totals = [_positive(r["total_norm"]) for r in run.steps]
    ax.plot(steps, totals, color="black", linewidth=1.2, label="total gradient norm")
    if run.clip_threshold is not None:
        ax.axhline(run.clip_threshold, color="tab:green", linestyle="--",
                   label=f"clip threshold {run.clip_threshold:g}")
    clipped = [r["step"] for r in run.steps if r.get("clipped") is True]
    if clipped:
        ax.scatter(clipped, [0.08] * len(clipped), transform=ax.get_xaxis_transform(),
                   marker="|", color="tab:green", label="clipped step", clip_on=False)
    colors = {"nonfinite": "tab:red", "exploding": "tab:orange", "spike": "tab:purple",
              "vanishing": "tab:blue", "stalled": "tab:cyan", "dead": "tab:gray"}
    seen = set()
    for e in run.events:
        kind = e["event"]
        if kind == "nonfinite" and kind in seen and e.get("evidence", {}).get("skipped"):
            continue  # every skipped step is an event; the band shows them
        ax.axvline(e["step"], color=colors.get(kind, "tab:gray"), alpha=0.8,
                   label=None if kind in seen else f"event: {kind}")
        seen.add(kind)
    skipped = [r["step"] for r in run.steps if r.get("skipped")]
    if skipped:
        ax.scatter(skipped, [0.03] * len(skipped), transform=ax.get_xaxis_transform(),
                   marker="x", color="tab:red", label="skipped step", clip_on=False)
    _all_steps(ax, steps)
    return finish_axes(fig, ax, "optimizer step", "L2 norm of all gradients",
                       f"{run.name}: total gradient norm, events marked")


def run_figures(run: Run) -> dict[str, object]:
    """The three pictures of one run, by a file-name-safe key."""
    safe = run.file_key()
    return {f"{safe}_layer_norms": layer_norms_figure(run),
            f"{safe}_gradient_flow": gradient_flow_figure(run),
            f"{safe}_total_norm": total_norm_figure(run)}


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (drawn by the Agg renderer; no window, no global backend)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_html(path: str, title: str, sections: list[tuple[str, str, dict[str, bytes]]],
               png_dir: str | None = None) -> None:
    """One HTML file with every image embedded. ``sections``: (heading, html text, {name: png})."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
             "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, text, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{text}")
        for name, png in images.items():
            if png_dir is not None:
                with open(os.path.join(png_dir, f"{name}.png"), "wb") as f:
                    f.write(png)
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                         "</p>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def collapsed_events(events: list[dict]) -> list[dict]:
    """Events with runs of the same kind on the same layers (one per step, as a run that stays
    non-finite gives) merged into one entry with ``count`` and ``last_step``."""
    out: list[dict] = []
    for e in events:
        last = out[-1] if out else None
        if last is not None and last["event"] == e["event"] and last["layers"] == e["layers"]:
            last["count"] += 1
            last["last_step"] = e["step"]
        else:
            out.append({**e, "count": 1, "last_step": e["step"]})
    return out


def events_table(run: Run) -> str:
    """The run's events as an HTML table, repeated events in one row with their step range."""
    if not run.events:
        return "<p>No events.</p>"
    rows = []
    for e in collapsed_events(run.events):
        steps = (str(e["step"]) if e["count"] == 1 else
                 f"{e['step']}-{e['last_step']} ({e['count']} times)")
        layers = ", ".join(run.layer_label(layer) for layer in e["layers"][:4])
        if len(e["layers"]) > 4:
            layers += f" and {len(e['layers']) - 4} more"
        advice = e.get("advice") or [""]
        rows.append(f"<tr><td>{html.escape(steps)}</td><td>{html.escape(e['event'])}</td>"
                    f"<td>{html.escape(layers)}</td>"
                    f"<td>{html.escape(str(e.get('message', '')))}</td>"
                    f"<td>{html.escape(str(advice[0]))}</td></tr>")
    return ("<table><tr><th>step</th><th>event</th><th>layers</th><th>message</th>"
            f"<th>first advice</th></tr>{''.join(rows)}</table>")


def main_report(jsonl: str, out: str, run: int = -1) -> int:
    """``gradkern report RUN.jsonl -o report.html [--run N]``: the pictures of one logged run
    (the last in the file by default). Input it cannot draw gives one line on stderr, naming
    the file and the problem, and exit status 2."""
    try:
        return _report(jsonl, out, run)
    except ReportError as exc:
        print(f"gradkern report: {exc}", file=sys.stderr)
        return 2


def _report(jsonl: str, out: str, run_number: int) -> int:
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ReportError(f"{out}: its folder {out_dir} does not exist")
    runs = load_runs(jsonl)
    run = _pick(runs, jsonl, run_number)
    images = {name: png_bytes(fig) for name, fig in run_figures(run).items()}
    notes = [f"{len(run.steps)} steps, {len(run.events)} events"]
    if len(runs) > 1:
        notes.append(f"run {runs.index(run) + 1} of {len(runs)} in the file (choose with --run)")
    if run.skipped_lines:
        notes.append(f"{run.skipped_lines} line(s) of the file were not gradkern records and "
                     "were skipped")
    try:
        write_html(out, f"gradkern report: {run.name}",
                   [(run.name, f"<p>{html.escape('; '.join(notes))}.</p>" + events_table(run),
                     images)], out_dir)
    except OSError as exc:
        raise ReportError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    print(f"wrote {out} ({len(images)} pictures; {'; '.join(notes)})")
    return 0
