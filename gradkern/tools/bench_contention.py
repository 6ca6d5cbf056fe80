"""The contention scenario of ``gradkern bench``: the cores shared with busy processes.

Training machines are rarely quiet: DataLoader workers, a tokenizer or a second job share the
cores. Here ``n_busy`` processes that spin on the CPU (started and stopped by the bench) run
beside the loop, and before every timed call a 256 x 256 matmul stands in for the training
step's own work (it also leaves torch's threads just used, as a step does). torch and gradkern
are timed in turn, call by call; reported are the median and the 90th percentile of each, on
many small tensors and on GPT-2-small shapes. A single call's time is what a training step
pays, so the tail matters as much as the median.

A third contender takes the same turns: torch summing one flat fp32 buffer of the set's size,
the cheapest pass over as many bytes that was measured under this load (one parallel region, no
per-tensor work; benchmarks/NOTES.md). torch's time over it is the speed-up within reach: over
GPT-2-small shapes, where the op is one long read, a ceiling no implementation passes by much. (Summing the gradients tensor by
tensor is no floor here: each of torch's calls waits at its own region's end for a team member
the scheduler may not be running.)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

import gradkern as gk

from .scenarios import gpt2_small_shapes, make_grads

SETS = {
    "many-small 1,000 x 1,000": lambda: [((1000,), torch.float32)] * 1000,
    "GPT-2-small shapes (12 layers)": lambda: [(s, torch.float32) for s in gpt2_small_shapes()],
}
OPS = {
    "total norm": (lambda params: torch.nn.utils.get_total_norm([p.grad for p in params]),
                   lambda params: gk.get_total_norm([p.grad for p in params])),
    "clip_grad_norm_, no clipping": (
        lambda params: torch.nn.utils.clip_grad_norm_(params, 1e30),
        lambda params: gk.clip_grad_norm_(params, 1e30)),
}


@contextmanager
def busy_processes(n: int):
    """``n`` processes that keep a core busy each, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(n)]
    try:
        time.sleep(0.3)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def contention_times(n_busy: int = 3, calls: int = 60) -> list[dict]:
    """Per set and op: the median and p90 (ms) of torch's and gradkern's call times, and of one
    read pass over the set's bytes, with ``n_busy`` busy processes beside the loop."""
    a = torch.randn(256, 256)
    rows = []
    with busy_processes(n_busy):
        for set_name, spec in SETS.items():
            params = make_grads(spec())
            flat = torch.ones(sum(p.grad.numel() * p.grad.element_size() for p in params) // 4)
            for op_name, (torch_op, gk_op) in OPS.items():
                contenders = (("torch", torch_op), ("gradkern", gk_op),
                              ("read", lambda _: flat.sum()))
                times: dict[str, list[float]] = {who: [] for who, _ in contenders}
                for k in range(calls + 2):
                    for who, fn in contenders:
                        a @ a  # the step's own work, just before
                        t0 = time.perf_counter()
                        fn(params)
                        elapsed = time.perf_counter() - t0
                        if k >= 2:  # two warm-up calls
                            times[who].append(elapsed * 1e3)
                row = {"op": op_name, "scenario": set_name, "busy": n_busy, "calls": calls}
                for who in times:
                    row[f"{who}_median_ms"] = statistics.median(times[who])
                    row[f"{who}_p90_ms"] = _p90(times[who])
                rows.append(row)
            del params, flat
    return rows


def print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    busy = rows[0]["busy"]
    print(f"\ncontention: {busy} busy process{'es' if busy != 1 else ''} beside the loop, "
          f"{rows[0]['calls']} calls each, a 256x256 matmul before every call; read: one read "
          "pass over a flat buffer of the set's size (a torch sum), taking the same turns; within "
          "reach: torch / read")
    print(f"{'op':30s} {'scenario':31s} {'torch median':>12s} {'p90':>6s} "
          f"{'gk median':>9s} {'p90':>6s} {'read median':>11s} {'p90':>6s} "
          f"{'speed-up median':>15s} {'p90':>6s} {'within reach':>12s} {'p90':>6s}")
    for r in rows:
        print(f"{r['op']:30s} {r['scenario']:31s} {r['torch_median_ms']:12.2f} "
              f"{r['torch_p90_ms']:6.2f} {r['gradkern_median_ms']:9.2f} "
              f"{r['gradkern_p90_ms']:6.2f} {r['read_median_ms']:11.2f} {r['read_p90_ms']:6.2f} "
              f"{r['torch_median_ms'] / r['gradkern_median_ms']:14.2f}x "
              f"{r['torch_p90_ms'] / r['gradkern_p90_ms']:5.2f}x "
              f"{r['torch_median_ms'] / r['read_median_ms']:11.2f}x "
              f"{r['torch_p90_ms'] / r['read_p90_ms']:5.2f}x")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print_rows(contention_times(n))
