"""Collectives, bytes and time per call with group= on 2 and 4 gloo ranks (CPU).

    python benchmarks/distributed_collectives.py [--json benchmarks/results/distributed-gloo.json]

For each op: how many all_reduce calls it makes, how many bytes they carry, and the wall time
per call with the group against the same call on the rank's tensors alone.
"""

import argparse
import json
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradkern as gk


class Holder:
    def __init__(self, grad):
        self.grad = grad


def _time(fn, repeats=20):
    for _ in range(3):
        fn()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    group = dist.group.WORLD
    rows = []
    for n in (10, 1000):
        grads = [torch.randn(1000) for _ in range(n)]
        holders = [Holder(g) for g in grads]
        ops = {"get_total_norm": (lambda: gk.get_total_norm(grads, group=group),
                                  lambda: gk.get_total_norm(grads)),
               "grad_stats": (lambda: gk.grad_stats(holders, group=group),
                              lambda: gk.grad_stats(holders))}
        for name, (with_group, alone) in ops.items():
            sizes = []
            original = dist.all_reduce

            def counting(t, *a, **k):
                sizes.append(t.numel() * t.element_size())
                return original(t, *a, **k)

            dist.all_reduce = counting
            with_group()
            dist.all_reduce = original
            rows.append(dict(world=world, op=name, tensors_per_rank=n, collectives=len(sizes),
                             bytes=sum(sizes), group_ms=_time(with_group) * 1e3,
                             alone_ms=_time(alone) * 1e3))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for world in (2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = f"/tmp/gradkern-dist-{world}.json"
        mp.spawn(worker, args=(world, port, out), nprocs=world, join=True)
        with open(out) as f:
            rows += json.load(f)
    print(f"{'ranks':>5s} {'op':16s} {'tensors/rank':>12s} {'collectives':>11s} {'bytes':>7s} "
          f"{'with group ms':>13s} {'alone ms':>9s}")
    for r in rows:
        print(f"{r['world']:5d} {r['op']:16s} {r['tensors_per_rank']:12d} {r['collectives']:11d} "
              f"{r['bytes']:7d} {r['group_ms']:13.2f} {r['alone_ms']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/distributed_collectives.py",
                       "torch": torch.__version__, "backend": "gloo", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
