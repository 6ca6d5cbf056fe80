"""``gradkern demo``: the classic vanishing and exploding cases, diagnosed and fixed.

Four scenarios, all generated in code and run on the CPU with a Monitor attached:

1. vanishing: two moons, a 2-10-10-5-1 sigmoid MLP with uniform(-1, 1) init under RMSprop, then
   the remedies one by one (ReLU, fewer layers, Glorot init, Adam with a smaller learning rate,
   batch norm, He init with ReLU);
2. exploding: a 15-feature regression whose 35-unit ReLU layer starts uniform(4, 5) under SGD,
   then the remedies (clip by value, clip by norm, Glorot init with tanh, L2, a smaller learning
   rate, gradkern's adaptive clippers);
3. depth: a 20-layer tanh chain at weight scales 0.5, 1.0 and 1.5, gradient norm per layer;
4. clip by value against clip by norm on the gradient [0.9, 100].

Every Monitor writes a JSONL file; the report is drawn from those files with the same code as
``gradkern report``.
"""

from __future__ import annotations

import html
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import gradkern as gk

from .cases import two_moons
from .report import (Run, events_table, finish_axes, load_jsonl, new_figure, png_bytes,
                     run_figures, write_html)

__all__ = ["run_demo"]


@dataclass
class Result:
    scenario: str
    remedy: str
    metric: str  # "accuracy 0.93" or "loss 1.2e+02"
    events: list[str]
    verdict: str
    run: Run
    why: str = ""  # for a remedy that does not save its case: why not

    @property
    def saved(self) -> bool:
        return self.verdict in ("healthy", "stable")


# Why a remedy from the literature does not save the demo's case, for the table (shown only
# when it does not). Each names the mechanism, so that the advice stays usable.
WHY_NOT = {
    "Glorot init": "a sigmoid's slope is at most 0.25, so every layer still shrinks the "
                   "gradient; Glorot keeps the forward variance, not the backward flow",
    "Adam, lr 1e-4": "Adam rescales each step, but the gradients still shrink through every "
                     "sigmoid layer; the smaller rate only slows learning",
    "L2 (weight decay 0.1)": "decay pulls weights down a little per step; the uniform(4, 5) "
                             "init explodes within the first steps, before it can act",
    "gk.AutoClip": "it clips to a percentile of the norms seen so far; the norm explodes from "
                   "step 0, so the history, and the threshold, explode with it",
    "gk.ZClip": "its first 5 steps (warm-up) set the baseline; this run already explodes "
                "in them, so the explosion is the baseline",
}

# The remedy in the demo that shows each event kind's first advice working.
FIRST_ADVICE_SHOWN_BY = {"vanishing": ("1 vanishing", "ReLU"),
                         "exploding": ("2 exploding", "clip by norm (1.0)"),
                         "nonfinite": ("2 exploding", "smaller learning rate (1e-5)")}


def _progress(name: str, done: int, total: int) -> None:
    """A bar redrawn in place on a terminal; elsewhere (a log file, CI) a plain line at each
    quarter, so captured output stays one short line per update."""
    if sys.stderr.isatty():
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r  {name:34s} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{total}")
        if done == total:
            sys.stderr.write("\n")
    elif done == total or done * 4 // max(total, 1) > (done - 10) * 4 // max(total, 1):
        sys.stderr.write(f"  {name}: step {done}/{total}\n")
    sys.stderr.flush()


def _train(name: str, model: nn.Module, opt: torch.optim.Optimizer, steps: int,
           step_loss: Callable[[int], torch.Tensor], out_dir: str, **monitor_kwargs) -> Run:
    path = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    monitor_kwargs.setdefault("log_every", 10)
    with gk.Monitor(model, opt, sinks=[gk.sinks.JSONL(path)], **monitor_kwargs):
        for step in range(steps):
            opt.zero_grad()
            step_loss(step).backward()
            opt.step()
            if step % 10 == 9 or step == steps - 1:
                _progress(name, step + 1, steps)
    clip = monitor_kwargs.get("clip")
    run = load_jsonl(path, name)
    run.clip_threshold = getattr(clip, "max_norm", clip if isinstance(clip, float) else None)
    return run


# ---- scenario 1: vanishing ---------------------------------------------------------------

def _moons_model(widths: list[int], act: type[nn.Module], init: str, batch_norm: bool):
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1])
        if init == "uniform":
            nn.init.uniform_(linear.weight, -1.0, 1.0)
            nn.init.uniform_(linear.bias, -1.0, 1.0)
        elif init == "glorot":
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        else:  # he
            nn.init.kaiming_uniform_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(act())
    return nn.Sequential(*layers)


def vanishing(out_dir: str, epochs: int) -> list[Result]:
    runs = [("baseline: sigmoid, uniform(-1,1), RMSprop", [2, 10, 10, 5, 1], nn.Sigmoid,
             "uniform", False, "rmsprop", 1e-3),
            ("ReLU", [2, 10, 10, 5, 1], nn.ReLU, "uniform", False, "rmsprop", 1e-3),
            ("fewer layers (2-10-1)", [2, 10, 1], nn.Sigmoid, "uniform", False, "rmsprop", 1e-3),
            ("Glorot init", [2, 10, 10, 5, 1], nn.Sigmoid, "glorot", False, "rmsprop", 1e-3),
            ("Adam, lr 1e-4", [2, 10, 10, 5, 1], nn.Sigmoid, "uniform", False, "adam", 1e-4),
            ("batch norm", [2, 10, 10, 5, 1], nn.Sigmoid, "uniform", True, "rmsprop", 1e-3),
            ("He init with ReLU", [2, 10, 10, 5, 1], nn.ReLU, "he", False, "rmsprop", 1e-3)]
    results = []
    for i, (remedy, widths, act, init, bn, opt_name, lr) in enumerate(runs):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        x, y = two_moons(3000, 0.25, gen)
        model = _moons_model(widths, act, init, bn)
        opt = (torch.optim.RMSprop if opt_name == "rmsprop" else torch.optim.Adam)(
            model.parameters(), lr=lr)
        order = torch.cat([torch.randperm(3000, generator=gen) for _ in range(epochs)])
        steps = len(order) // 32

        def step_loss(step, model=model, x=x, y=y, order=order):
            idx = order[32 * step:32 * step + 32]
            return nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), y[idx])

        run = _train(f"vanishing_{i}", model, opt, steps, step_loss, out_dir)
        run.key, run.name = run.name, f"vanishing: {remedy}"
        model.eval()
        with torch.no_grad():
            accuracy = ((model(x).squeeze(1) > 0).float() == y).float().mean().item()
        first, last = _layers_of(run)[0], _layers_of(run)[-1]
        ratios = [r["layers"][first]["grad_rms"] / r["layers"][last]["grad_rms"]
                  for r in run.steps if r["layers"][last]["grad_rms"] > 0]
        ratio = float(np.median(ratios)) if ratios else float("nan")
        kinds = sorted({e["event"] for e in run.events})
        run.summary = {"accuracy": accuracy, "first/last gradient RMS": ratio}
        verdict = "vanishing" if "vanishing" in kinds else "healthy"
        why = WHY_NOT.get(remedy, "") if verdict != "healthy" else ""
        results.append(Result("1 vanishing", remedy,
                              f"accuracy {accuracy:.3f}, first/last RMS {ratio:.2g}", kinds,
                              verdict, run, why))
    return results


def _layers_of(run: Run) -> list[str]:
    return list(run.steps[0]["layers"]) if run.steps else []


# ---- scenario 2: exploding -----------------------------------------------------------------

def exploding(out_dir: str, steps: int) -> list[Result]:
    runs = [("baseline: ReLU uniform(4,5), SGD", {}, "relu_uniform", 0.01, 0.0),
            ("clip by value (0.5)", {"clip": gk.ClipByValue(0.5)}, "relu_uniform", 0.01, 0.0),
            ("clip by norm (1.0)", {"clip": 1.0}, "relu_uniform", 0.01, 0.0),
            ("Glorot init with tanh", {}, "tanh_glorot", 0.01, 0.0),
            ("L2 (weight decay 0.1)", {}, "relu_uniform", 0.01, 0.1),
            ("smaller learning rate (1e-5)", {}, "relu_uniform", 1e-5, 0.0),
            ("gk.AutoClip", {"clip": gk.AutoClip(percentile=10)}, "relu_uniform", 0.01, 0.0),
            ("gk.ZClip", {"clip": gk.ZClip(warmup=5)}, "relu_uniform", 0.01, 0.0),
            ("gk.AGC", {"clip": gk.AGC(clip_factor=0.01)}, "relu_uniform", 0.01, 0.0)]
    results = []
    for i, (remedy, kwargs, arch, lr, wd) in enumerate(runs):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(2)
        w_true = torch.randn(15, 1, generator=gen) * 10
        if arch == "relu_uniform":
            model = nn.Sequential(nn.Linear(15, 35), nn.ReLU(), nn.Linear(35, 1))
            nn.init.uniform_(model[0].weight, 4.0, 5.0)
            nn.init.uniform_(model[0].bias, 4.0, 5.0)
        else:
            model = nn.Sequential(nn.Linear(15, 35), nn.Tanh(), nn.Linear(35, 1))
            nn.init.xavier_uniform_(model[0].weight)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        x_test = torch.randn(256, 15, generator=gen)
        y_test = x_test @ w_true

        def step_loss(step, model=model, gen=gen, w_true=w_true):
            x = torch.randn(32, 15, generator=gen)
            return nn.functional.mse_loss(model(x), x @ w_true + 0.1 * torch.randn(32, 1,
                                                                                 generator=gen))

        skip = not kwargs  # the runs without clipping skip non-finite steps, to show it
        run = _train(f"exploding_{i}", model, opt, steps, step_loss, out_dir,
                     skip_nonfinite=skip, **kwargs)
        run.key, run.name = run.name, f"exploding: {remedy}"
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(x_test), y_test).item()
        kinds = sorted({e["event"] for e in run.events})
        skipped = sum(1 for r in run.steps if r.get("skipped"))
        run.summary = {"test loss": loss, "skipped steps": skipped}
        verdict = ("diverged (non-finite gradients)" if "nonfinite" in kinds else
                   "exploding" if "exploding" in kinds else "stable")
        metric = f"test MSE {loss:.3g}" + (f", {skipped} steps skipped" if skipped else "")
        why = WHY_NOT.get(remedy, "") if verdict != "stable" else ""
        results.append(Result("2 exploding", remedy, metric, kinds, verdict, run, why))
    return results


# ---- scenario 3: depth ---------------------------------------------------------------------

def depth_figure():
    """The backward signal through a 20-layer tanh chain: the gradient of the loss with respect
    to each layer's output shrinks (scale 0.5), holds (1.0) or grows (1.5) with depth."""
    fig, ax = new_figure((8, 4.5))
    rows = []
    for scale in (0.5, 1.0, 1.5):
        torch.manual_seed(0)
        layers = []
        for _ in range(20):
            linear = nn.Linear(32, 32)
            nn.init.normal_(linear.weight, 0.0, scale / math.sqrt(32))
            nn.init.zeros_(linear.bias)
            layers.append(linear)
        head = nn.Linear(32, 1)
        h = torch.randn(256, 32, generator=torch.Generator().manual_seed(3))
        outputs = []
        for linear in layers:
            h = torch.tanh(linear(h))
            h.retain_grad()
            outputs.append(h)
        nn.functional.mse_loss(head(h), torch.ones(256, 1)).backward()
        norms = [float(o.grad.norm()) for o in outputs]
        ax.plot(range(1, 21), norms, marker="o", label=f"weight scale {scale}")
        rows.append((scale, norms[0], norms[-1]))
    return finish_axes(fig, ax, "layer (1 = input side, 20 = next to the output)",
                   "norm of d loss / d layer output",
                   "20-layer tanh chain: the gradient on its way back to the input", 9), rows


# ---- scenario 4: clip by value vs clip by norm ----------------------------------------------

def clip_direction_figure():
    g = torch.tensor([0.9, 100.0])
    p_value, p_norm = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    p_value.grad, p_norm.grad = g.clone(), g.clone()
    gk.ClipByValue(1.0).clip_([p_value])
    gk.ClipByNorm(1.0).clip_([p_norm])

    def angle(v):
        return math.degrees(math.atan2(float(v[1]), float(v[0])))

    fig, ax = new_figure((5.5, 5.5))
    for v, label, color, lw in ((g / g.norm(), "original, scaled to length 1", "gray", 6),
                                (p_value.grad, "clip by value 1: [0.9, 1.0]", "tab:red", 2),
                                (p_norm.grad, "clip by norm 1", "tab:green", 2)):
        ax.annotate("", xy=(float(v[0]), float(v[1])), xytext=(0, 0),
                    arrowprops={"arrowstyle": "->", "color": color, "lw": lw})
        ax.plot([], [], color=color, linewidth=lw, label=f"{label} (angle {angle(v):.1f} deg)")
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(-0.1, 1.1)
    ax.set_aspect("equal")
    ax.set_xlabel("gradient component 1")
    ax.set_ylabel("gradient component 2")
    ax.set_title("clipping [0.9, 100]: the direction kept or lost")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig, (g.tolist(), p_value.grad.tolist(), p_norm.grad.tolist())


# ---- the whole demo ------------------------------------------------------------------------

def _table(results: list[Result]) -> str:
    lines = [f"{'scenario':12s} {'remedy':40s} {'result':38s} {'events':28s} verdict"]
    for r in results:
        lines.append(f"{r.scenario:12s} {r.remedy:40s} {r.metric:38s} "
                     f"{', '.join(r.events) or '-':28s} {r.verdict}")
        if r.why:
            lines.append(f"{'':12s}   why not: {r.why}")
    return "\n".join(lines)


def run_demo(out_dir: str = "gradkern-demo", quick: bool = False) -> list[Result]:
    """Run every scenario, print the table, write ``out_dir/report.html`` and the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    print("gradkern demo: the classic vanishing and exploding gradient cases, with gk.Monitor")
    print("scenario 1, vanishing gradients (two moons, sigmoid MLP):")
    results = vanishing(out_dir, epochs=3 if quick else 6)
    print("scenario 2, exploding gradients (regression, ReLU layer initialised uniform(4, 5)):")
    results += exploding(out_dir, steps=60 if quick else 150)
    depth, depth_rows = depth_figure()
    clip_fig, clip_vectors = clip_direction_figure()
    print()
    print(_table(results))

    sections = []
    intro = ("<p>Each run trained with <code>gk.Monitor</code> attached (default detectors, "
             "log every 10 steps). Table:</p><pre>" + html.escape(_table(results)) + "</pre>")
    sections.append(("Summary", intro, {}))
    for r in results:
        text = (f"<p><b>{html.escape(r.scenario)}: {html.escape(r.remedy)}</b>: "
                f"{html.escape(r.metric)}; verdict: {html.escape(r.verdict)}."
                + (f" Why it does not save this case: {html.escape(r.why)}." if r.why else "")
                + "</p>" + events_table(r.run))
        images = {name: png_bytes(fig) for name, fig in run_figures(r.run).items()}
        sections.append((f"{r.scenario}: {r.remedy}", text, images))
    depth_text = "".join(f"<p>scale {s}: first layer {a:.3g}, last layer {b:.3g}</p>"
                         for s, a, b in depth_rows)
    sections.append(("3 depth: 20-layer tanh chain", depth_text, {"depth": png_bytes(depth)}))
    g, by_value, by_norm = clip_vectors
    clip_text = (f"<p>gradient {g}; clipped by value to 1: {by_value} (direction changed); "
                 f"clipped by norm to 1: [{by_norm[0]:.4f}, {by_norm[1]:.4f}] (direction kept)."
                 "</p>")
    sections.append(("4 clip by value vs clip by norm", clip_text,
                     {"clip_direction": png_bytes(clip_fig)}))
    report = os.path.join(out_dir, "report.html")
    write_html(report, "gradkern demo: vanishing and exploding gradients", sections, out_dir)
    print(f"\nwrote {report} and the pictures in {out_dir}/ ({time.perf_counter() - t0:.0f} s)")
    return results
