"""The host time gk.Monitor adds to a training step, with the kernels' own work taken away.

A transformer with ~100 parameter tensors of a few hundred elements each trains with SGD; the
Monitor's optimizer hooks are timed from the inside. The tensors are so small that the stats
pass and the ring updates cost next to nothing on the device, so what is left is the host's
share: the Python bookkeeping, the table read, the kernel launches and, on log steps, the
detectors, the records and the update tracking. That share is what a host-bound GPU step pays
in full (on a GPU the hooks never wait for the device, so the time measured is host time).

The configurations train side by side, a step of each in turn. Reported per configuration: the
median in-hook time of an ordinary step and of a log step, and the mean over all steps.

    python benchmarks/monitor_host_cost.py [--device cpu|cuda] [--steps 400] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

import gradkern as gk
from gradkern.tools.bench_monitor import Stopwatch
from gradkern.tools.cases import TinyTransformer

LOG_EVERY = 10
CONFIGS = {  # name -> Monitor keyword arguments
    "defaults": {},
    "no detectors": {"detectors": None},
    "no update tracking": {"track_updates": False},
    "clip=1.0": {"clip": 1.0},
}


class _Run:
    """One configuration: its own model, optimizer and Monitor, with the Monitor's hooks timed
    by hooks of the stopwatch registered before and after them."""

    def __init__(self, device: str, **monitor_kwargs):
        torch.manual_seed(0)
        self.model = TinyTransformer(vocab=64, d=16, layers=8, ctx=8).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.watch = Stopwatch()
        self.mon = self.watch.around_step_hooks(
            self.opt, lambda: gk.Monitor(self.model, self.opt, log_every=LOG_EVERY,
                                         **monitor_kwargs))
        self.spent: list[float] = []

    def step(self, tokens: torch.Tensor, keep: bool) -> None:
        self.opt.zero_grad()
        self.model(tokens[:, :-1]).float().sum().backward()
        self.watch.total = 0.0
        self.opt.step()
        if keep:
            self.spent.append(self.watch.total)

    def summary(self) -> dict:
        self.mon.close()
        log = self.spent[LOG_EVERY - 1::LOG_EVERY]
        plain = [t for i, t in enumerate(self.spent) if i % LOG_EVERY != LOG_EVERY - 1]
        return {"params": len(self.mon.layers.params),
                "plain_step_us": statistics.median(plain) * 1e6,
                "log_step_us": statistics.median(log) * 1e6,
                "mean_us": statistics.fmean(self.spent) * 1e6}


def measure(device: str, steps: int) -> dict[str, dict]:
    """Every configuration, a step of each in turn (so a slow moment of a shared machine hits
    them alike); ``steps`` timed steps each after a warm-up of five log periods."""
    runs = {name: _Run(device, **kwargs) for name, kwargs in CONFIGS.items()}
    tokens = torch.randint(0, 64, (2, 9), device=device)
    for step in range(steps + 5 * LOG_EVERY):
        for run in runs.values():
            run.step(tokens, keep=step >= 5 * LOG_EVERY)
    if device == "cuda":
        torch.cuda.synchronize()
    return {name: run.summary() for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = measure(args.device, args.steps)
    print(f"gk.Monitor(log_every={LOG_EVERY}) host time inside its hooks, per step, "
          f"on {args.device} ({args.steps} steps)")
    print(f"{'config':<22}{'plain step us':>15}{'log step us':>13}{'mean us':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['plain_step_us']:>15.1f}{r['log_step_us']:>13.1f}"
              f"{r['mean_us']:>10.1f}")
    if args.json:
        meta = {"device": args.device, "torch": torch.__version__,
                "cuda": torch.version.cuda, "python": platform.python_version(),
                "machine": platform.machine(), "params": rows["defaults"]["params"],
                "command": "python benchmarks/monitor_host_cost.py "
                           f"--device {args.device} --steps {args.steps}"}
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
