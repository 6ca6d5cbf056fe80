"""The CPU targets, read from saved ``gradkern bench --json`` runs.

    python benchmarks/cpu_targets.py benchmarks/results/cpu-2core-*-run*.json

prints one line per target: its value in each run, and in how many runs it was met. Where a run
has the ``clip_grad_value_, nothing clamped`` row, the clip-by-value line also
gives that run's ceiling: torch's time over a gradkern pass that reads every value and writes
none, the largest speed-up any one-read-pass clip could show in that run. Each contention line
is followed by the speed-up within reach in that run: torch's time over torch summing a flat
buffer of the set's size, timed in the same turns under the same load. Where a run recorded
which calls lost their core mid-call (a busy process took it), a median line also gives the
share of torch's calls that did and the speed-up over the calls that kept it, and a p90 line
the share of gradkern's calls that did: those shares, not the kernels, move these lines between
runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MANY = "many-small 10,000 x 1,000"
GPT2 = "GPT-2-small shapes (12 layers)"
HUGE = "huge 4 x 64M"


@dataclass(frozen=True)
class Target:
    name: str
    read: Callable[[dict], float | None]  # the run's value, None where the run lacks the row
    met: Callable[[float], bool]
    unit: str  # how the value prints: "x" speed-up, "%" share, "t" time ratio
    # What explains the value, each printed on a line of its own under it: (name, read, unit)
    context: tuple[tuple[str, Callable[[dict], float | None], str], ...] = ()


def _row(run: dict, op: str, scenario: str | None = None) -> list[dict]:
    return [r for r in run["rows"] if r["op"] == op and (scenario is None or r["scenario"] == scenario)]


def _speedup(op: str, scenario: str) -> Callable[[dict], float | None]:
    def read(run: dict) -> float | None:
        rows = _row(run, op, scenario)
        return rows[0]["speedup"] if rows else None
    return read


def _stats_time_ratio(run: dict) -> float | None:
    # The bench's speed-up column here is total-norm time / grad_stats time; the target is its
    # inverse, the worst scenario counting.
    rows = _row(run, "grad_stats vs gradkern total norm")
    return max(1 / r["speedup"] for r in rows) if rows else None


def _stats_vs_per_tensor(run: dict) -> float | None:
    rows = _row(run, "grad_stats vs per-tensor torch")
    return min(r["speedup"] for r in rows) if rows else None


def _huge_share(run: dict) -> float | None:
    rows = _row(run, "total norm", HUGE)
    return rows[0]["limit_share"] if rows else None


def _numba_over_cpp(run: dict) -> float | None:
    # That row's "torch" column is Numba's time, so its speed-up is Numba time / C++ time.
    rows = _row(run, "total norm: numba vs gradkern", HUGE)
    return 1 / rows[0]["speedup"] if rows else None


def _monitor_vs_hooks(run: dict) -> float | None:
    inside = {r["op"]: r["inside_ms"] for r in run.get("monitor_rows", [])}
    if "training step + hooks" not in inside:
        return None
    return inside["training step + hooks"] / inside["training step + gradkern"]


def _contention_row(run: dict, op: str, scenario: str, *keys: str) -> dict | None:
    """The contention row with 3 busy processes for ``op`` on ``scenario``, if it has ``keys``
    (older runs lack the newer columns) and none of them is None."""
    for r in run.get("contention_rows", []):
        if (r["op"] == op and r["scenario"] == scenario and r["busy"] == 3
                and all(r.get(k) is not None for k in keys)):
            return r
    return None


def _contended(op: str, scenario: str, stat: str,
               over: str = "gradkern") -> Callable[[dict], float | None]:
    """torch's time over ``over``'s (gradkern, or the read pass) in a contention row with 3
    busy processes: ``stat`` is "median", "p90" or "kept_median" (the median of the calls that
    kept their core). None where the run lacks it."""
    def read(run: dict) -> float | None:
        r = _contention_row(run, op, scenario, f"torch_{stat}_ms", f"{over}_{stat}_ms")
        return None if r is None else r[f"torch_{stat}_ms"] / r[f"{over}_{stat}_ms"]
    return read


def _lost_core(op: str, scenario: str, who: str) -> Callable[[dict], float | None]:
    """The share of ``who``'s calls that lost the core mid-call, in that contention row."""
    def read(run: dict) -> float | None:
        r = _contention_row(run, op, scenario, f"{who}_lost_core")
        return None if r is None else r[f"{who}_lost_core"]
    return read


def _contention_context(op: str, scenario: str, stat: str) -> tuple:
    """Under a contention target: the speed-up within reach, then what the statistic rests on.
    A median is torch's fast or slow time by whether more than half its calls lost the core, so
    it comes with that share and with the speed-up of the calls that kept it; a p90 is
    gradkern's slow time once more than a tenth of its calls lost it."""
    within = ("  within reach (torch / one read pass, same load)",
              _contended(op, scenario, stat, over="read"), "x")
    if stat == "median":
        return (within,
                ("  torch's calls that lost the core mid-call",
                 _lost_core(op, scenario, "torch"), "%"),
                ("  calls that kept the core (torch / gradkern medians)",
                 _contended(op, scenario, "kept_median"), "x"))
    return (within,
            ("  gradkern's calls that lost the core mid-call",
             _lost_core(op, scenario, "gradkern"), "%"))


SMALL = "many-small 1,000 x 1,000"
CONTENDED_OPS = ("total norm", "clip_grad_norm_, no clipping")

TARGETS = [
    Target("total norm, 10,000 x 1,000, >= 10x", _speedup("total norm", MANY),
           lambda v: v >= 10, "x"),
    Target("clip_grad_norm_, 10,000 x 1,000, >= 10x",
           _speedup("clip_grad_norm_, no clipping", MANY), lambda v: v >= 10, "x"),
    Target("clip_grad_norm_, GPT-2, no clipping, >= 1.8x",
           _speedup("clip_grad_norm_, no clipping", GPT2), lambda v: v >= 1.8, "x"),
    Target("clip_grad_norm_, GPT-2, clipping, >= 1.0x",
           _speedup("clip_grad_norm_, clipping", GPT2), lambda v: v >= 1.0, "x"),
    Target("clip_grad_value_, GPT-2, < 1% clamped, >= 2.5x",
           _speedup("clip_grad_value_, <1% clamped", GPT2), lambda v: v >= 2.5, "x",
           context=(("  its ceiling (torch / gradkern reading, writing nothing)",
                     _speedup("clip_grad_value_, nothing clamped", GPT2), "x"),)),
    Target("grad_stats vs total norm alone, <= 1.15x the time", _stats_time_ratio,
           lambda v: v <= 1.15, "t"),
    Target("grad_stats vs per-tensor torch calls, >= 5x", _stats_vs_per_tensor,
           lambda v: v >= 5, "x"),
    Target("total norm, 4 x 64M, >= 85% of read bandwidth", _huge_share,
           lambda v: v >= 0.85, "%"),
    Target("Numba vs C++, 4 x 64M, >= 0.5x", _numba_over_cpp, lambda v: v >= 0.5, "x"),
    Target("Monitor vs per-parameter hooks, >= 10x less time in hooks", _monitor_vs_hooks,
           lambda v: v >= 10, "x"),
] + [
    Target(f"3 busy: {op.split(',')[0]}, {short}, {stat} >= {bound:g}x",
           _contended(op, scenario, stat), lambda v, bound=bound: v >= bound, "x",
           context=_contention_context(op, scenario, stat))
    for scenario, short in ((SMALL, "1,000 x 1,000"), (GPT2, "GPT-2"))
    for op in CONTENDED_OPS
    for stat, bound in (("median", 5.0), ("p90", 2.0))
]

def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.0f}%"
    return f"{value:.2f}x"


def report(runs: list[dict]) -> list[str]:
    """One line per target: the value in each run, then how many of the runs met it."""
    lines = []
    for target in TARGETS:
        values = [target.read(run) for run in runs]
        present = [v for v in values if v is not None]
        met = sum(target.met(v) for v in present)
        lines.append(f"{target.name:58s} {' '.join(f'{_fmt(v, target.unit):>7s}' for v in values)}"
                     f"   met in {met} of {len(present)}")
        for name, read, unit in target.context:
            lines.append(f"{name:58s} "
                         f"{' '.join(f'{_fmt(read(run), unit):>7s}' for run in runs)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files from gradkern bench --json")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    quick = [str(path) for path, run in zip(args.runs, runs) if run.get("quick")]
    if quick:
        parser.error(f"--quick runs use smaller sets than the targets name: {', '.join(quick)}")
    print(f"{'target':58s} " + " ".join(f"{'run ' + str(i + 1):>7s}" for i in range(len(runs))))
    print("\n".join(report(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
