"""What gk.Monitor costs a GPU training step: a ~100M-parameter transformer, bf16 autocast, AdamW.

Three copies of the model train on the same batches in blocks of 10 steps: no monitor,
``Monitor(log_every=1)`` and ``Monitor(log_every=10)`` (default detectors and update tracking).
Each round runs one block of each, in an order that rotates from round to round. A block runs
without host syncs inside it, as a training loop does, so the Monitor's host work overlaps the
GPU's as it would in real training; its time is taken between two synchronisations.

Reported for each monitored copy:

* ``overhead``: the median over rounds of (its block time / the bare block time of the same
  round) - 1. Pairing within a round cancels the slow drifts of a shared machine; the
  interquartile range of the per-round ratios says how far to trust the median.
* ``host``: the time spent inside the Monitor's hooks per step (host time; the hooks never wait
  for the device), as a share of the bare step.
* ``device``: the GPU time of the kernels the Monitor's hooks launch per step (torch profiler,
  a separate profiled run), as a share of the bare step's GPU time.

A step overlaps host and device work, so its overhead is about the larger of the last two when
the GPU is the bottleneck, and their sum at worst.

    python benchmarks/gpu_monitor_overhead.py [--rounds 30] [--batch 16] [--ctx 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn
from torch.autograd import DeviceType

import gradkern as gk
from gradkern.tools.bench_monitor import Stopwatch
from gradkern.tools.cases import TinyTransformer

BLOCK = 10  # steps per timed block: one log step at log_every=10
MONITORED = {"log_every=1": 1, "log_every=10": 10}


def _device_us(events, name: str) -> float:
    """Total GPU time (us) of the kernels under the profiler ranges called ``name``."""
    for e in events:
        if e.key == name:
            return e.device_time_total
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--d", type=int, default=768, help="model width")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    parser.add_argument("--json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = TinyTransformer(vocab=32_000, d=args.d, layers=args.layers, ctx=args.ctx).to(dev)
    n_params = sum(p.numel() for p in base.parameters())
    models = {"none": base, **{k: copy.deepcopy(base) for k in MONITORED}}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    watches = {k: Stopwatch() for k in MONITORED}
    monitors = {k: watches[k].around_step_hooks(
                    opts[k], lambda k=k, every=every: gk.Monitor(models[k], opts[k],
                                                               log_every=every))
                for k, every in MONITORED.items()}
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randint(0, 32_000, (args.batch, args.ctx + 1), generator=gen, device=dev)
               for _ in range(BLOCK)]

    def train(key: str) -> None:
        model, opt = models[key], opts[key]
        for tokens in batches:
            opt.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()

    def block(key: str) -> float:
        sync()
        t0 = time.perf_counter()
        train(key)
        sync()
        return (time.perf_counter() - t0) / BLOCK

    keys = list(models)
    times: dict[str, list[float]] = {k: [] for k in keys}
    host: dict[str, list[float]] = {k: [] for k in MONITORED}
    try:
        for r in range(args.rounds + 1):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                if key in watches:
                    watches[key].total = 0.0
                t = block(key)
                if r:  # round 0 warms up
                    times[key].append(t)
                    if key in watches:
                        host[key].append(watches[key].total / BLOCK)
        # GPU time of the Monitor's kernels: a profiled block of each monitored copy, its hooks
        # marked, against the GPU time of a profiled bare block.
        device_share = {}
        for key in MONITORED:  # the stopwatches' spans now mark the hooks for the profiler
            watches[key].label = "gradkern.monitor"
        for key in keys:
            sync()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                train(key)
                sync()
            events = prof.key_averages()
            # the kernels themselves (an op's own device time would count them twice)
            kernels = sum(e.self_device_time_total for e in events
                          if e.device_type == DeviceType.CUDA)
            device_share[key] = (_device_us(events, "gradkern.monitor"), kernels)
    finally:
        for m in monitors.values():
            m.close()

    bare = statistics.median(times["none"])
    bare_gpu = max(device_share["none"][1], 1e-9)  # no GPU time on a CPU try-out
    print(f"transformer {n_params / 1e6:.1f}M params, bf16 autocast, batch {args.batch} x "
          f"{args.ctx}, AdamW; {args.rounds} rounds of one {BLOCK}-step block each")
    print(f"  {'config':<14}{'ms/step':>9}{'overhead':>10}{'IQR of rounds':>20}"
          f"{'host in hooks':>15}{'GPU in hooks':>14}")
    print(f"  {'none':<14}{bare * 1e3:>9.2f}{'':>10}{'':>20}{'':>15}"
          f"{'(' + format(bare_gpu / BLOCK / 1e3, '.2f') + ' ms GPU)':>14}")
    rows = [dict(config="none", step_ms=bare * 1e3, all_step_ms=[t * 1e3 for t in times["none"]],
                 gpu_ms_per_step=bare_gpu / BLOCK / 1e3)]
    for key in MONITORED:
        ratios = sorted(t / b - 1.0 for t, b in zip(times[key], times["none"]))
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        host_us = statistics.fmean(host[key]) * 1e6
        gpu_us = device_share[key][0] / BLOCK
        print(f"  {key:<14}{statistics.median(times[key]) * 1e3:>9.2f}{100 * med:>+9.2f}%"
              f"{f'{100 * q1:+.2f}% .. {100 * q3:+.2f}%':>20}"
              f"{100 * host_us / (bare * 1e6):>14.2f}%{100 * gpu_us * BLOCK / bare_gpu:>13.2f}%")
        rows.append(dict(config=key, step_ms=statistics.median(times[key]) * 1e3,
                         overhead=med, overhead_q1=q1, overhead_q3=q3,
                         host_us_per_step=host_us, gpu_us_per_step=gpu_us,
                         all_step_ms=[t * 1e3 for t in times[key]]))
    if args.json:
        result = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                      cuda=torch.version.cuda, params=n_params, batch=args.batch, ctx=args.ctx,
                      command="python benchmarks/gpu_monitor_overhead.py " + " ".join(sys.argv[1:]),
                      rows=rows)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
