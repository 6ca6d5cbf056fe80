"""The monitor scenario of ``gradkern bench``: what watching the gradients costs per step.

Three copies of one small transformer (~10M parameters) train side by side, a step of each in
turn, so noise on a shared machine hits all three alike:

* ``none``: the bare training step;
* ``gradkern``: the same step under ``gk.Monitor(log_every=10)`` (default detectors, update
  tracking on log steps);
* ``hooks``: the usual hand-written recipe (what ``wandb.watch``-style logging does): a hook on
  every parameter's gradient that computes its norm, max |g| and NaN/inf count and reads them to
  the host with ``.item()``.

Reported: the median step time of each against ``none`` (noisy on a shared machine), and the
time spent inside the monitoring code per step, measured directly.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from gradkern import Monitor

from .cases import TinyTransformer


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(vocab=8192, d=256, layers=8, ctx=64).to(device)


class Stopwatch:
    """Sums the time spent inside what it times: the functions it wraps, or the optimizer step
    hooks of something registered between its own (:meth:`around_step_hooks`). With ``label``
    set, each timed span of the hooks is also marked for ``torch.profiler``."""

    def __init__(self):
        self.total = 0.0
        self.label: str | None = None
        self._t0 = 0.0
        self._mark = None

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
        return timed

    def _start(self, *_) -> None:
        if self.label is not None:
            self._mark = torch.profiler.record_function(self.label)
            self._mark.__enter__()
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self.total += time.perf_counter() - self._t0
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None

    def around_step_hooks(self, optimizer: torch.optim.Optimizer, make):
        """``make()``, called between a start and a stop hook on each side of ``optimizer``'s
        step (torch runs step hooks in the order they were registered): the time spent in the
        step hooks ``make`` registers, a Monitor's say, is summed."""
        optimizer.register_step_pre_hook(self._start)
        optimizer.register_step_post_hook(self._start)
        made = make()
        optimizer.register_step_pre_hook(self._stop)
        optimizer.register_step_post_hook(self._stop)
        return made


def _hook_recipe(model: nn.Module, watch: Stopwatch) -> list:
    """Per-parameter gradient hooks with host reads, as hand-written logging does it."""
    log: dict[str, tuple] = {}
    handles = []
    for name, p in model.named_parameters():
        def hook(grad, name=name):
            log[name] = (grad.norm().item(), grad.abs().max().item(),
                         (~grad.isfinite()).sum().item())
        handles.append(p.register_hook(watch.wrap(hook)))
    return handles


LOG_EVERY = 10
# Untimed steps first: two log periods, so that what happens once (CUDA loads a kernel at its
# first launch, the allocator's first blocks, the first processing of buffered rows) stays out
# of the per-step times (two warm-up steps leave the first log step's first launches in them).
WARMUP = 2 * LOG_EVERY


def _timed_monitor(model: nn.Module, opt: torch.optim.Optimizer, watch: Stopwatch) -> Monitor:
    return watch.around_step_hooks(opt, lambda: Monitor(model, opt, log_every=LOG_EVERY))


def monitor_overhead(device: str = "cpu", steps: int = 40, batch: int = 8) -> list[dict]:
    base = _model(device)
    n_params = sum(p.numel() for p in base.parameters())
    models = {"none": base, "gradkern": copy.deepcopy(base), "hooks": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    watches = {"gradkern": Stopwatch(), "hooks": Stopwatch()}
    monitor = _timed_monitor(models["gradkern"], opts["gradkern"], watches["gradkern"])
    handles = _hook_recipe(models["hooks"], watches["hooks"])
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in models}

    def step(key: str, tokens: torch.Tensor) -> None:
        model, opt = models[key], opts[key]
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()

    try:
        for i in range(steps + WARMUP):
            tokens = torch.randint(0, 8192, (batch, 65), generator=gen).to(device)
            if i == WARMUP:
                for w in watches.values():
                    w.total = 0.0
            for key in models:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(key, tokens)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= WARMUP:
                    times[key].append(time.perf_counter() - t0)
    finally:
        monitor.close()
        for h in handles:
            h.remove()
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key in ("gradkern", "hooks"):
        inside = watches[key].total / steps  # time spent in the monitoring code per step
        rows.append(dict(op=f"training step + {key}", scenario=f"transformer {n_params / 1e6:.1f}M",
                         base_ms=median["none"] * 1e3, with_ms=median[key] * 1e3,
                         overhead=median[key] / median["none"] - 1.0,
                         inside_ms=inside * 1e3, inside_share=inside / median["none"],
                         steps=steps, device=device))
    return rows


def print_rows(rows: list[dict]) -> None:
    """Median step times, and the time spent inside the monitoring code itself (the steadier
    number on a noisy machine)."""
    print(f"{'monitor overhead':34s} {'scenario':22s} {'bare ms':>9s} {'with ms':>9s} "
          f"{'step +':>7s} {'in-hook ms':>10s} {'share':>6s}")
    for r in rows:
        print(f"{r['op']:34s} {r['scenario']:22s} {r['base_ms']:9.2f} {r['with_ms']:9.2f} "
              f"{100 * r['overhead']:6.1f}% {r['inside_ms']:10.2f} {100 * r['inside_share']:5.1f}%")
    if len(rows) == 2 and rows[0]["inside_ms"] > 0:
        print(f"time in hooks, hand-written / gradkern: "
              f"{rows[1]['inside_ms'] / rows[0]['inside_ms']:.1f}x")
