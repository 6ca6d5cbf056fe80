"""The contention scenario of ``gradkern bench``: the cores shared with busy processes.

Training machines are rarely quiet: DataLoader workers, a tokenizer or a second job share the
cores. Here ``n_busy`` processes that spin on the CPU (started and stopped by the bench) run
beside the loop, and before every timed call a 256 x 256 matmul stands in for the training
step's own work (it also leaves torch's threads just used, as a step does). torch and gradkern
are timed in turn, call by call, each turn starting with the next of them; reported are the
median and the 90th percentile of each, on many small tensors and on GPT-2-small shapes. A
single call's time is what a training step pays, so the tail matters as much as the median.

A third contender takes the same turns: torch summing one flat fp32 buffer of the set's size,
the cheapest pass over as many bytes that was measured under this load (one parallel region, no
per-tensor work; benchmarks/NOTES.md). torch's time over it is the speed-up within reach: over
GPT-2-small shapes, where the op is one long read, a ceiling no implementation passes by much.
(Summing the gradients tensor by tensor is no floor here: each of torch's calls waits at its own
region's end for a team member the scheduler may not be running.)

Under this load a call is slow mostly when the calling thread loses its core mid-call to a busy
process and waits out the process's slice. Where Linux's scheduler statistics can be read, each
row also gives, per contender, the share of calls in which that happened (the thread waited
``LOST_CORE_MS`` or more for a core) and the median of the calls that kept their core: the op's
own time under the load, apart from the scheduler's draw. A median sits on one side or the other
of that line depending on whether more than half the calls lost the core, so it can move between
runs by a factor of two while the op's own time stays put (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

import gradkern as gk
from gradkern.backends._cpu_share import thread_times

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


# A wait this long for a core during one call means another process took the core mid-call: it
# spans a scheduler slice (0.75-3 ms) and more than a wake-up's latency.
LOST_CORE_MS = 1.0


def _p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _timed(fn, params) -> tuple[float, float | None]:
    """One call's wall time and the calling thread's wait for a core during it, both in ms (the
    wait None where it cannot be read)."""
    before = thread_times()
    t0 = time.perf_counter()
    fn(params)
    elapsed = time.perf_counter() - t0
    after = thread_times()
    waited = None if before is None or after is None else (after[1] - before[1]) / 1e6
    return elapsed * 1e3, waited


def _summary(who: str, calls: list[tuple[float, float | None]]) -> dict:
    """The row's columns for one contender: median and p90 of its call times, and where the waits
    were read, the share of calls that lost the core and the median of those that kept it."""
    times = [t for t, _ in calls]
    out = {f"{who}_median_ms": statistics.median(times), f"{who}_p90_ms": _p90(times)}
    if all(w is not None for _, w in calls):
        kept = [t for t, w in calls if w < LOST_CORE_MS]
        out[f"{who}_lost_core"] = 1 - len(kept) / len(calls)
        out[f"{who}_kept_median_ms"] = statistics.median(kept) if kept else None
    return out


def contention_times(n_busy: int = 3, calls: int = 60) -> list[dict]:
    """Per set and op: the median and p90 (ms) of torch's and gradkern's call times, and of one
    read pass over the set's bytes, with ``n_busy`` busy processes beside the loop; where the
    scheduler's statistics can be read, also each one's share of calls that lost the core and
    the median of the calls that kept it (``*_lost_core``, ``*_kept_median_ms``)."""
    a = torch.randn(256, 256)
    rows = []
    with busy_processes(n_busy):
        for set_name, spec in SETS.items():
            params = make_grads(spec())
            flat = torch.ones(sum(p.grad.numel() * p.grad.element_size() for p in params) // 4)
            for op_name, (torch_op, gk_op) in OPS.items():
                contenders = (("torch", torch_op), ("gradkern", gk_op),
                              ("read", lambda _: flat.sum()))
                timed: dict[str, list[tuple[float, float | None]]] = {
                    who: [] for who, _ in contenders}
                for k in range(calls + 2):
                    # Each turn starts with the next contender, so each is timed after each of
                    # the others equally often: what ran just before a call has used up part of
                    # the thread's scheduler slice, which sets how likely the call is to lose
                    # the core before it ends.
                    first = k % len(contenders)
                    for who, fn in contenders[first:] + contenders[:first]:
                        a @ a  # the step's own work, just before
                        call = _timed(fn, params)
                        if k >= 2:  # two warm-up calls
                            timed[who].append(call)
                row = {"op": op_name, "scenario": set_name, "busy": n_busy, "calls": calls}
                for who, calls_of in timed.items():
                    row.update(_summary(who, calls_of))
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
    _print_lost_core(rows)


def _print_lost_core(rows: list[dict]) -> None:
    """The share of calls that lost the core, and the medians of those that kept it."""
    rows = [r for r in rows if "torch_lost_core" in r]
    if not rows:
        return
    print(f"\nlost the core: the share of calls in which the calling thread waited >= "
          f"{LOST_CORE_MS:g} ms for a core; kept: the median of the other calls (ms)")
    print(f"{'op':30s} {'scenario':31s} {'lost: torch':>11s} {'gk':>5s} {'read':>5s} "
          f"{'kept: torch':>11s} {'gk':>6s} {'read':>6s} {'speed-up kept':>13s}")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        kept = (r["torch_kept_median_ms"], r["gradkern_kept_median_ms"])
        ratio = "-" if None in kept else f"{kept[0] / kept[1]:.2f}x"
        print(f"{r['op']:30s} {r['scenario']:31s} {r['torch_lost_core']:11.0%} "
              f"{r['gradkern_lost_core']:5.0%} {r['read_lost_core']:5.0%} "
              f"{ms(kept[0]):>11s} {ms(kept[1]):>6s} {ms(r['read_kept_median_ms']):>6s} "
              f"{ratio:>13s}")


def main(argv: list[str] | None = None) -> int:
    """``python -m gradkern.tools.bench_contention [N] [--json FILE]``: the contention rows
    alone, saved in the layout of ``gradkern bench --json`` (its other rows empty)."""
    parser = argparse.ArgumentParser(description="The contention rows of gradkern bench.")
    parser.add_argument("busy", nargs="?", type=int, default=3,
                        help="busy processes beside the loop (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = contention_times(args.busy)
    print_rows(rows)
    if args.json:
        from .bench import write_run  # bench imports this module

        write_run(args.json, "cpu", f"python -m gradkern.tools.bench_contention {args.busy}",
                  contention_rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
