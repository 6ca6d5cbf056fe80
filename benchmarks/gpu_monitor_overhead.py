"""What gk.Monitor costs a GPU training step: a ~100M-parameter transformer, bf16 autocast, AdamW.

Three copies of the model train on the same batches in alternating blocks of 10 steps: no
monitor, ``Monitor(log_every=1)`` and ``Monitor(log_every=10)`` (default detectors). Each block
runs without host syncs inside it, as a training loop does, so the Monitor's host work overlaps
the GPU's as it would in real training; the time of a block is taken between two
synchronisations. Reported: the median time per step of each, and the overhead against none.

    python benchmarks/gpu_monitor_overhead.py [--rounds 10] [--json FILE]
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

import gradkern as gk
from gradkern.cases import _TinyTransformer

BLOCK = 10  # steps per timed block: one log step at log_every=10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = _TinyTransformer(vocab=32_000, d=768, layers=8, ctx=args.ctx).cuda()
    n_params = sum(p.numel() for p in base.parameters())
    models = {"none": base, "log_every=1": copy.deepcopy(base), "log_every=10": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    monitors = [gk.Monitor(models["log_every=1"], opts["log_every=1"], log_every=1),
                gk.Monitor(models["log_every=10"], opts["log_every=10"], log_every=10)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 32_000, (args.batch, args.ctx + 1), generator=gen, device="cuda")
               for _ in range(BLOCK)]

    def block(key: str) -> float:
        model, opt = models[key], opts[key]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for tokens in batches:
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / BLOCK

    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        for r in range(args.rounds + 1):
            for key in models:
                t = block(key)
                if r:  # round 0 warms up
                    times[key].append(t)
    finally:
        for m in monitors:
            m.close()
    base_ms = statistics.median(times["none"]) * 1e3
    rows = []
    print(f"transformer {n_params / 1e6:.1f}M params, bf16 autocast, batch {args.batch} x "
          f"{args.ctx}, AdamW; median of {args.rounds} blocks of {BLOCK} steps")
    for key, ts in times.items():
        ms = statistics.median(ts) * 1e3
        rows.append(dict(config=key, step_ms=ms, overhead=ms / base_ms - 1.0,
                         all_step_ms=[t * 1e3 for t in ts]))
        print(f"  {key:<14} {ms:8.2f} ms/step  overhead {100 * (ms / base_ms - 1):+6.2f}%")
    if args.json:
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      cuda=torch.version.cuda, params=n_params,
                      command="python " + " ".join(sys.argv), rows=rows)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
