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
from dataclasses import dataclass, field

from matplotlib import colormaps
from matplotlib.figure import Figure

__all__ = ["Run", "load_jsonl", "run_figures", "write_html", "main_report", "new_figure",
           "finish_axes", "png_bytes"]


@dataclass
class Run:
    """One logged run: its step records and events, as the sinks wrote them."""

    name: str
    steps: list[dict]
    events: list[dict]
    clip_threshold: float | None = None
    summary: dict = field(default_factory=dict)  # what the demo's table shows for it
    key: str = ""  # file-name stem of its pictures (default: from the name)

    def file_key(self) -> str:
        return self.key or "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)


def load_jsonl(path: str, name: str | None = None) -> Run:
    """Read a ``gk.sinks.JSONL`` file (a torn last line from a killed run is skipped)."""
    steps, events = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            (events if record.get("type") == "event" else steps).append(record)
    return Run(name or os.path.splitext(os.path.basename(path))[0], steps, events)


def _layers(run: Run) -> list[str]:
    names: list[str] = []
    for record in run.steps:
        for layer in record["layers"]:
            if layer not in names:
                names.append(layer)
    return names


def _positive(v) -> float:
    """A value for a log axis; float() also reads the "nan"/"inf" strings the JSONL sink writes."""
    v = float(v)
    return v if v > 0 and math.isfinite(v) else float("nan")


def new_figure(size: tuple[float, float]):
    """``(figure, axes)`` of one plot. A bare :class:`~matplotlib.figure.Figure` renders to
    files without pyplot, so drawing here never changes the caller's matplotlib backend."""
    fig = Figure(figsize=size)
    return fig, fig.subplots()


def finish_axes(fig, ax, xlabel: str, ylabel: str, title: str, legend_size: int = 7):
    """Log y axis, labels, legend, grid: the frame every picture here shares."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def layer_norms_figure(run: Run):
    fig, ax = new_figure((8, 4.5))
    steps = [r["step"] for r in run.steps]
    layers = _layers(run)
    cmap = colormaps["viridis"].resampled(max(len(layers), 2))
    for k, layer in enumerate(layers):
        values = [_positive(float(r["layers"].get(layer, {}).get("grad_norm", "nan")))
                  for r in run.steps]
        ax.plot(steps, values, color=cmap(k), label=layer, linewidth=1.2)
    return finish_axes(fig, ax, "optimizer step", "gradient L2 norm of the layer",
                   f"{run.name}: gradient norm per layer\n(input side dark, output side light)")


def gradient_flow_figure(run: Run, at: list[int] | None = None):
    layers = _layers(run)
    if at is None:
        n = len(run.steps)
        at = sorted({0, n // 2, n - 1}) if n else []
    fig, ax = new_figure((8, 4.5))
    x = list(range(len(layers)))
    for k in at:
        record = run.steps[k]
        rms = [_positive(float(record["layers"].get(l, {}).get("grad_rms", "nan"))) for l in layers]
        mx = [_positive(float(record["layers"].get(l, {}).get("grad_max", "nan"))) for l in layers]
        line, = ax.plot(x, rms, marker="o", label=f"RMS |g|, step {record['step']}")
        ax.plot(x, mx, marker="^", linestyle="--", color=line.get_color(),
                label=f"max |g|, step {record['step']}")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    return finish_axes(fig, ax, "layer (input -> output)", "|gradient| (log scale)",
                   f"{run.name}: gradient flow across layers")


def total_norm_figure(run: Run):
    fig, ax = new_figure((8, 4.5))
    steps = [r["step"] for r in run.steps]
    totals = [_positive(float(r["total_norm"])) for r in run.steps]
    ax.plot(steps, totals, color="black", linewidth=1.2, label="total gradient norm")
    skipped = [r["step"] for r in run.steps if r.get("skipped")]
    if run.clip_threshold is not None:
        ax.axhline(run.clip_threshold, color="tab:green", linestyle="--",
                   label=f"clip threshold {run.clip_threshold:g}")
    colors = {"nonfinite": "tab:red", "exploding": "tab:orange", "spike": "tab:purple",
              "vanishing": "tab:blue", "stalled": "tab:cyan", "dead": "tab:gray"}
    seen = set()
    for e in run.events:
        kind = e["event"]
        if kind == "nonfinite" and kind in seen and e.get("evidence", {}).get("skipped"):
            continue  # every skipped step is an event; the x markers show them
        ax.axvline(e["step"], color=colors.get(kind, "tab:gray"), alpha=0.8,
                   label=None if kind in seen else f"event: {kind}")
        seen.add(kind)
    if skipped:
        ax.scatter(skipped, [min(t for t in totals if t == t) if any(t == t for t in totals)
                             else 1.0] * len(skipped), marker="x", color="tab:red",
                   label="skipped step (non-finite)")
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


def events_table(run: Run) -> str:
    if not run.events:
        return "<p>No events.</p>"
    rows = "".join(f"<tr><td>{e['step']}</td><td>{html.escape(e['event'])}</td>"
                   f"<td>{html.escape(', '.join(e['layers'][:4]))}</td>"
                   f"<td>{html.escape(e['message'])}</td>"
                   f"<td>{html.escape(e['advice'][0] if e['advice'] else '')}</td></tr>"
                   for e in run.events)
    return ("<table><tr><th>step</th><th>event</th><th>layers</th><th>message</th>"
            f"<th>first advice</th></tr>{rows}</table>")


def main_report(jsonl: str, out: str) -> int:
    """``gradkern report RUN.jsonl -o report.html``: the pictures of one logged run."""
    run = load_jsonl(jsonl)
    if not run.steps:
        raise SystemExit(f"{jsonl}: no step records (is it a gk.sinks.JSONL file?)")
    images = {name: png_bytes(fig) for name, fig in run_figures(run).items()}
    png_dir = os.path.dirname(os.path.abspath(out))
    write_html(out, f"gradkern report: {run.name}",
               [(run.name, f"<p>{len(run.steps)} steps, {len(run.events)} events.</p>"
                 + events_table(run), images)], png_dir)
    print(f"wrote {out} ({len(images)} pictures)")
    return 0
