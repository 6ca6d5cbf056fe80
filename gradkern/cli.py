"""The ``gradkern`` command: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the build and the backends")
    bench = sub.add_parser("bench", help="time gradkern against torch's built-ins")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--quick", action="store_true", help="smaller scenarios, fewer repeats")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--backend", default=None,
                       help="gradkern backend to time (default: every usable one)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import print_info

        print_info()
        return 0
    from .bench import run_bench

    return run_bench(device=args.device, quick=args.quick, json_path=args.json,
                     backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
