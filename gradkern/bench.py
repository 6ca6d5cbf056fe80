"""``gradkern bench``: gradkern against torch's built-ins, side by side in one run.

Each row times torch and gradkern on the same gradients in the same process (best of N). The
read bandwidth is measured in the same run as one read pass (a sum) over a flat buffer of the
same size, so "% of read BW" says how close a pass comes to the machine's limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_
from torch.nn.utils import clip_grad_value_ as torch_clip_grad_value_
from torch.nn.utils import get_total_norm as torch_get_total_norm

from . import clip, stats
from .backends import backends, set_backend
from .bench_monitor import monitor_overhead
from .bench_monitor import print_rows as print_monitor_rows
from .info import build_report
from .scenarios import make_grads, scenarios


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeats: int, device: str,
              setup: Callable[[], object] | None = None) -> float:
    """Best wall time of ``fn`` in seconds over ``repeats`` runs (after one warm-up)."""
    return best_times([fn], repeats, device, setup)[0]


def best_times(fns: list[Callable[[], object]], repeats: int, device: str,
               setup: Callable[[], object] | None = None) -> list[float]:
    """Best wall time of each of ``fns``, run in turn within every repeat.

    Interleaving means a burst of noise from other tenants of a shared machine slows both sides
    of a comparison, instead of deciding it.
    """
    best = [float("inf")] * len(fns)
    for i in range(repeats + 1):
        for k, fn in enumerate(fns):
            if setup is not None:
                setup()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i:
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _per_tensor_torch_stats(grads):
    return [(torch.linalg.vector_norm(g), g.abs().amax(), (~g.isfinite()).sum(), (g == 0).sum())
            for g in grads]


def run_bench(device: str = "cpu", quick: bool = False, json_path: str | None = None,
              backend: str | None = None) -> int:
    repeats = 3 if quick else 7
    rows: list[dict] = []
    previous = set_backend(backend) if backend else None

    def row(op, scenario, t_torch, t_gk, nbytes, read_bw, note=""):
        r = dict(op=op, scenario=scenario, torch_ms=t_torch * 1e3, gradkern_ms=t_gk * 1e3,
                 speedup=t_torch / t_gk, gbps=nbytes / t_gk / 1e9,
                 read_bw_share=(nbytes / t_gk) / read_bw if read_bw else None, note=note)
        rows.append(r)
        _print_row(r)

    print(f"gradkern bench on {device}, best of {repeats} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"{'op':34s} {'scenario':34s} {'torch ms':>9s} {'gk ms':>9s} {'speed-up':>8s} "
          f"{'GB/s':>7s} {'read BW':>7s}")
    for name, spec in scenarios(quick).items():
        params = make_grads(spec, device)
        grads = [p.grad for p in params]
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        flat = torch.ones(nbytes // 4, device=device)
        read_bw = nbytes / best_time(flat.sum, repeats, device)
        del flat
        saved = [g.clone() for g in grads]

        def restore():
            for g, s in zip(grads, saved):
                g.copy_(s)

        t_t, t_g = best_times([lambda: torch_get_total_norm(grads),
                               lambda: clip.get_total_norm(grads)], repeats, device)
        row("total norm", name, t_t, t_g, nbytes, read_bw)
        t_t, t_g = best_times([lambda: torch_clip_grad_norm_(params, 1e30),
                               lambda: clip.clip_grad_norm_(params, 1e30)], repeats, device)
        row("clip_grad_norm_, no clipping", name, t_t, t_g, nbytes, read_bw)
        t_t, t_g = best_times([lambda: torch_clip_grad_norm_(params, 1.0),
                               lambda: clip.clip_grad_norm_(params, 1.0)], repeats, device,
                              restore)
        row("clip_grad_norm_, clipping", name, t_t, t_g, nbytes, read_bw)
        # |N(0,1)| > 2.6 for ~0.93% of values
        t_t, t_g = best_times([lambda: torch_clip_grad_value_(params, 2.6),
                               lambda: clip.clip_grad_value_(params, 2.6)], repeats, device,
                              restore)
        row("clip_grad_value_, <1% clamped", name, t_t, t_g, nbytes, read_bw)
        # Both sides start from the parameters, so both pay for reading every .grad.
        t_norm, t_stats = best_times([lambda: clip.get_total_norm([p.grad for p in params]),
                                      lambda: stats.grad_stats(params)], repeats, device)
        row("grad_stats vs gradkern total norm", name, t_norm, t_stats, nbytes, read_bw,
            "speed-up < 1: the cost of the extra statistics")
        if len(grads) <= 200 or not quick:
            t_t = best_time(lambda: _per_tensor_torch_stats(grads), repeats, device)
            row("grad_stats vs per-tensor torch", name, t_t, t_stats, nbytes, read_bw)
        if name.startswith("huge") and backends()["numba"].usable and device == "cpu":
            def with_numba():
                before = set_backend("numba")
                try:
                    clip.get_total_norm(grads)
                finally:
                    set_backend(before)

            t_numba, t_norm = best_times([with_numba, lambda: clip.get_total_norm(grads)],
                                         repeats, device)
            row("total norm: numba vs gradkern", name, t_numba, t_norm, nbytes, read_bw,
                "torch column = numba; speed-up = numba time / C++ time")
        del params, grads, saved
    print()
    monitor_rows = monitor_overhead(device, steps=12 if quick else 40)
    print_monitor_rows(monitor_rows)
    if backend:
        set_backend(previous)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": _device_name(device), "quick": quick, "build": build_report(),
                       "command": f"gradkern bench --device {device}" + (" --quick" if quick else ""),
                       "rows": rows, "monitor_rows": monitor_rows}, f, indent=2, default=str)
        print(f"wrote {json_path}")
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()


def _print_row(r: dict) -> None:
    share = "" if r["read_bw_share"] is None else f"{100 * r['read_bw_share']:6.0f}%"
    print(f"{r['op']:34s} {r['scenario']:34s} {r['torch_ms']:9.2f} {r['gradkern_ms']:9.2f} "
          f"{r['speedup']:7.2f}x {r['gbps']:7.1f} {share:>7s}")
