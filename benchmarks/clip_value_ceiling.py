"""How fast clip-by-value can be against torch's, on this machine, right now.

    python benchmarks/clip_value_ceiling.py [--rounds 15] [--device cpu] [--json FILE]

torch's ``clip_grad_value_`` makes two in-place passes (``clamp_min_``, then ``clamp_max_``),
each reading and writing every value. gradkern makes one read pass and writes only what changes.
So gradkern's speed-up can be no larger than torch's two passes over one read pass, and how far
that is above 2x depends on how much the machine charges for the writes.

Each round times, on the bench's GPT-2-small gradients and in turn (best of 3 each, gradients
restored before every call):

- ``read``: gradkern's clip with a bound no value reaches (reads everything, writes nothing);
- ``clip``: gradkern's clip at 2.6 (0.93% of N(0, 1) values clamped);
- ``torch_one``: torch's ``_foreach_clamp_min_`` alone, one read-and-write pass;
- ``torch_clip``: torch's ``clip_grad_value_`` at 2.6;

and reports per round torch_one / read (what a write costs here) and torch_clip / read (the
ceiling), with the median and range over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import gradkern as gk
from gradkern.tools.bench import CLAMP_AT, NOTHING_CLAMPED, device_name, best_times
from gradkern.tools.scenarios import make_grads, scenarios


def measure(rounds: int, device: str) -> list[dict]:
    spec = next(s for name, s in scenarios(False, device).items() if name.startswith("GPT-2"))
    params = make_grads(spec, device)
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore():
        for g, s in zip(grads, saved):
            g.copy_(s)

    results = []
    for _ in range(rounds):
        read, gk_clip, torch_one, torch_clip = best_times(
            [lambda: gk.clip_grad_value_(params, NOTHING_CLAMPED),
             lambda: gk.clip_grad_value_(params, CLAMP_AT),
             lambda: torch._foreach_clamp_min_(grads, -CLAMP_AT),
             lambda: torch.nn.utils.clip_grad_value_(params, CLAMP_AT)],
            3, device, restore)
        results.append(dict(read_ms=read * 1e3, clip_ms=gk_clip * 1e3,
                            torch_one_ms=torch_one * 1e3, torch_clip_ms=torch_clip * 1e3))
        r = results[-1]
        print(f"read {r['read_ms']:6.2f}  clip {r['clip_ms']:6.2f}  torch one pass "
              f"{r['torch_one_ms']:6.2f}  torch clip {r['torch_clip_ms']:6.2f} ms   "
              f"one pass / read {torch_one / read:.2f}   ceiling {torch_clip / read:.2f}x   "
              f"gradkern {torch_clip / gk_clip:.2f}x", flush=True)
    return results


def summarize(results: list[dict]) -> dict[str, tuple[float, float, float]]:
    """(median, min, max) over the rounds of each per-round ratio."""
    ratios = {
        "torch one pass / gradkern read": [r["torch_one_ms"] / r["read_ms"] for r in results],
        "ceiling: torch clip / gradkern read": [r["torch_clip_ms"] / r["read_ms"] for r in results],
        "gradkern speed-up: torch clip / gradkern clip":
            [r["torch_clip_ms"] / r["clip_ms"] for r in results],
        "gradkern clip / gradkern read": [r["clip_ms"] / r["read_ms"] for r in results],
    }
    return {k: (statistics.median(v), min(v), max(v)) for k, v in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rounds and the summary here")
    args = parser.parse_args(argv)
    results = measure(args.rounds, args.device)
    summary = summarize(results)
    for name, (median, low, high) in summary.items():
        print(f"{name:48s} median {median:.2f}  range {low:.2f}-{high:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/clip_value_ceiling.py "
                       f"--rounds {args.rounds} --device {args.device}",
                       "device": device_name(args.device), "torch": torch.__version__,
                       "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                       "rounds": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
