"""The ``gradkern`` command: ``demo``, ``report``, ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the build and the backends")
    demo = sub.add_parser("demo", help="the classic vanishing/exploding cases, diagnosed and "
                                       "fixed, with an HTML report")
    demo.add_argument("--out", default="gradkern-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="shorter runs")
    report = sub.add_parser("report", help="pictures and HTML from a gk.sinks.JSONL file")
    report.add_argument("jsonl", help="the JSONL file a Monitor wrote")
    report.add_argument("-o", "--out", default="report.html",
                        help="HTML file (default: %(default)s)")
    report.add_argument("--run", type=int, default=-1,
                        help="which run of the file: 1 for the first, -1 for the last (default)")
    bench = sub.add_parser("bench", help="time gradkern against torch's built-ins")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--quick", action="store_true", help="smaller scenarios, fewer repeats")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--backend", default=None,
                       help="gradkern backend to time (default: every usable one)")
    bench.add_argument("--contention", type=int, default=None, metavar="N",
                       help="busy processes beside the loop for the contention rows (default: "
                            "3 in a full CPU run, 0 with --quick or on a GPU)")
    args = parser.parse_args(argv)
    problem = _cannot_run(args)
    if problem:
        print(f"gradkern {args.command}: {problem}", file=sys.stderr)
        return 2
    if args.command == "info":
        from .info import print_info

        print_info()
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, quick=args.quick)
        return 0
    if args.command == "report":
        from .report import main_report

        return main_report(args.jsonl, args.out, args.run)
    from .bench import run_bench

    return run_bench(device=args.device, quick=args.quick, json_path=args.json,
                     backend=args.backend, contention=args.contention)


def _cannot_run(args) -> str | None:
    """Why the command cannot run here, in one line (None when it can): a device this machine
    lacks, or a backend forced by name or by GRADKERN_BACKEND that is not usable."""
    if args.command in ("info", "report"):
        return None
    import torch

    import gradkern as gk

    forced = getattr(args, "backend", None) or gk.get_backend()
    if forced is not None:
        info = gk.backends().get(forced)
        if info is None:
            return f"unknown backend {forced!r}; choose from {', '.join(gk.backends())}"
        if not info.usable:
            how = "--backend" if getattr(args, "backend", None) else "GRADKERN_BACKEND"
            return f"{how}={forced}: that backend is not usable here ({info.reason})"
    device = getattr(args, "device", "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"--device {device}: not a device (use cpu or cuda)"
    if kind not in ("cpu", "cuda"):
        return f"--device {device}: gradkern bench runs on cpu or cuda"
    if kind == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device here (torch.cuda.is_available() is False)"
    return None


if __name__ == "__main__":
    sys.exit(main())
