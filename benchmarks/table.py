"""A ``gradkern bench --json`` run as the README's table: one line naming the hardware, versions
and command, then the rows that time gradkern against torch, in plain columns, and the
contention rows (median and 90th percentile of single calls with busy processes beside the
loop, and where recorded the share of calls that lost the core) where the run has them; a run
of the contention rows alone gives those only.

    python benchmarks/table.py benchmarks/results/cpu-2core-2026-12-07d-run3.json

Rows that compare gradkern with itself (grad_stats against gradkern's total norm, Numba against
C++, the clip-by-value ceiling), with a goal rather than torch (the fused step's goal rows), and
the Monitor's rows stay in the JSON and in ``gradkern bench``'s own output;
``benchmarks/README.md`` discusses them.
"""

from __future__ import annotations

import argparse
import json

NOT_AGAINST_TORCH = ("grad_stats vs gradkern total norm", "nothing clamped", "vs gradkern",
                     "the goal")


def _hardware(run: dict) -> str:
    build = run.get("build", {})
    torch_version = build.get("torch") or run.get("torch", "?")
    cpu = build.get("cpu_build") or {}
    threads = cpu.get("max_threads")
    where = run.get("device", "?")
    parts = [where, f"torch {torch_version}"]
    if threads and "cuda" not in str(run.get("command", "")):
        parts.append(f"{threads} threads")
    return ", ".join(parts)


def markdown(run: dict, hardware: str | None = None, path: str | None = None) -> str:
    command = run.get("command", "gradkern bench") + (f" --json {path}" if path else "")
    if not run["rows"]:  # the contention rows alone (python -m gradkern.tools.bench_contention)
        lines = [f"{hardware or _hardware(run)}; `{command}`"]
    else:
        lines = [f"{hardware or _hardware(run)}; `{command}`; best of 7, torch and gradkern "
                 "timed in turn", "",
                 "| op | set | torch ms | gradkern ms | speed-up |", "|---|---|---:|---:|---:|"]
    for row in run["rows"]:
        op = row["op"].strip()
        if any(word in op for word in NOT_AGAINST_TORCH):
            continue
        op = op.replace("grad_stats vs per-tensor torch", "grad_stats (torch: a norm, max, "
                        "NaN and zero count per tensor)")
        lines.append(f"| {op} | {row['scenario']} | {row['torch_ms']:.2f} | "
                     f"{row['gradkern_ms']:.2f} | {row['speedup']:.2f}x |")
    contended = run.get("contention_rows", [])
    if contended:
        with_read = all("read_median_ms" in row for row in contended)
        with_lost = all("torch_lost_core" in row for row in contended)
        busy = contended[0]["busy"]
        lines += ["", f"With {busy} busy process{'es' if busy != 1 else ''} beside the loop "
                  f"({contended[0]['calls']} single calls each, a 256 x 256 matmul before every "
                  "call): median / 90th percentile"
                  + ("; read pass: torch summing a flat buffer of the set's size in the same "
                     "turns, and torch's time over it, the speed-up within reach" if with_read
                     else "")
                  + ("; lost the core: the share of calls in which the calling thread waited 1 "
                     "ms or more for a core, torch / gradkern" if with_lost else ""), "",
                  "| op | set | torch ms | gradkern ms | speed-up |"
                  + (" read pass ms | within reach |" if with_read else "")
                  + (" lost the core |" if with_lost else ""),
                  "|---|---|---:|---:|---:|" + ("---:|---:|" if with_read else "")
                  + ("---:|" if with_lost else "")]
        for row in contended:
            t, g = (row["torch_median_ms"], row["torch_p90_ms"]), (row["gradkern_median_ms"],
                                                                    row["gradkern_p90_ms"])
            line = (f"| {row['op']} | {row['scenario']} | {t[0]:.2f} / {t[1]:.2f} | "
                    f"{g[0]:.2f} / {g[1]:.2f} | {t[0] / g[0]:.2f}x / {t[1] / g[1]:.2f}x |")
            if with_read:
                r = row["read_median_ms"], row["read_p90_ms"]
                line += (f" {r[0]:.2f} / {r[1]:.2f} | {t[0] / r[0]:.2f}x / "
                         f"{t[1] / r[1]:.2f}x |")
            if with_lost:
                line += f" {row['torch_lost_core']:.0%} / {row['gradkern_lost_core']:.0%} |"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a file gradkern bench --json wrote")
    parser.add_argument("--hardware", help="the first line's description of the machine "
                        "(default: what the JSON records)")
    args = parser.parse_args()
    with open(args.json, encoding="utf-8") as f:
        print(markdown(json.load(f), args.hardware, args.json))


if __name__ == "__main__":
    main()
