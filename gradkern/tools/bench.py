"""``gradkern bench``: gradkern against torch's built-ins, side by side in one run.

Each row times torch and gradkern on the same gradients in the same process (best of N, wall
time including Python, the device synchronised before and after). The machine's limit is
measured in turn with torch and gradkern in the total-norm row's loop, so that all three see the
same state of a shared machine: a read pass (torch sums over the gradients' large fp32 tensors,
or over a flat buffer of the same size when the gradients are many small ones; see
:class:`LimitPasses`) and, on a GPU, a device-to-device copy counted as bytes read plus bytes
written. The "limit" column is a row's bytes read per second as a share of that: read bandwidth
on the CPU, copy bandwidth on a GPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import torch
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_
from torch.nn.utils import clip_grad_value_ as torch_clip_grad_value_
from torch.nn.utils import get_total_norm as torch_get_total_norm

import gradkern as gk
from gradkern import backends, set_backend

from .bench_compiled_step import compiled_step_times
from .bench_contention import contention_times
from .bench_contention import print_rows as print_contention_rows
from .bench_fused_step import CLIPPING, NOTHING_TO_CLIP, fused_step_times
from .bench_monitor import monitor_overhead
from .bench_monitor import print_rows as print_monitor_rows
from .info import build_report
from .scenarios import gpt2_small_shapes, make_grads, scenarios


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


# clip_grad_value_'s bound: the 99.9th percentile of |g| (the bench's gradients are N(0, 1):
# |g| > 3.29 for 0.1% of values), a bound that clips outliers as training runs set it. The
# fraction hardly moves the figure while it stays under 1% (benchmarks/NOTES.md). NOTHING_CLAMPED
# is one no value reaches, but finite: an infinite bound returns before reading anything.
CLAMP_AT = 3.2905
NOTHING_CLAMPED = 1e30

_LIMIT_BUFFER_BYTES = 4 << 30
_LARGE_TENSOR_BYTES = 1 << 20


class LimitPasses:
    """The passes that measure what the machine allows for reading ``tensors``, to be timed by the
    caller interleaved with the ops they are the limit for; :meth:`bandwidths` turns their best
    times into bytes/s.

    The read pass sums the tensors themselves, where fp32 tensors of at least 1 MiB hold half the
    bytes or more (one torch call each, so the per-call cost stays out of the measure). Memory
    allocated later can be faster than the gradients': in one process on a 2-core VM a fresh
    buffer read at 56 GB/s and the gradients at 45. Many small tensors are summed as a fresh flat
    buffer of the same size instead. On a GPU a device-to-device copy of a flat buffer is timed
    too. Flat buffers are capped at 4 GiB: both passes saturate long before.
    """

    def __init__(self, tensors: list[torch.Tensor], device: str):
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        large = [t for t in tensors
                 if t.dtype == torch.float32 and t.numel() * 4 >= _LARGE_TENSOR_BYTES]
        large_bytes = sum(t.numel() * 4 for t in large)
        flat_elems = max(min(nbytes, _LIMIT_BUFFER_BYTES) // 4, 1)
        if large and 2 * large_bytes >= nbytes:
            self.read_source, self.read_bytes = "the gradients", large_bytes
            self.passes: list[Callable[[], object]] = [lambda: [t.sum() for t in large]]
        else:
            flat = torch.ones(flat_elems, device=device)
            self.read_source, self.read_bytes = "a flat buffer", flat_elems * 4
            self.passes = [flat.sum]
        self.copy_bytes = 0
        if device.startswith("cuda"):
            src = torch.ones(flat_elems, device=device)
            dst = torch.empty_like(src)
            self.copy_bytes = 2 * flat_elems * 4
            self.passes.append(lambda: dst.copy_(src))

    def bandwidths(self, times: list[float]) -> tuple[float, float | None]:
        """(read bandwidth, copy bandwidth or None on the CPU) in bytes/s, from the best time
        of each pass."""
        read_bw = self.read_bytes / times[0]
        copy_bw = self.copy_bytes / times[1] if len(times) > 1 else None
        return read_bw, copy_bw


def _per_tensor_torch_stats(grads):
    return [(torch.linalg.vector_norm(g), g.abs().amax(), (~g.isfinite()).sum(), (g == 0).sum())
            for g in grads]


def run_bench(device: str = "cpu", quick: bool = False, json_path: str | None = None,
              backend: str | None = None, contention: int | None = None) -> int:
    """Every scenario, torch against gradkern; ``contention`` busy processes for the
    contention rows (default: 3 on the CPU in a full run, none with ``quick`` or on a GPU;
    0: none)."""
    repeats = 3 if quick else 7
    rows: list[dict] = []
    previous = set_backend(backend) if backend else None

    limits: dict[str, dict] = {}
    on_gpu = device.startswith("cuda")

    def row(op, scenario, t_torch, t_gk, nbytes, note=""):
        """One row; the limit share only where the scenario's limit was measured."""
        measured = limits.get(scenario)
        share = (nbytes / t_gk) / measured["copy_bw" if on_gpu else "read_bw"] \
            if measured else float("nan")
        r = dict(op=op, scenario=scenario, torch_ms=t_torch * 1e3, gradkern_ms=t_gk * 1e3,
                 speedup=t_torch / t_gk, gbps=nbytes / t_gk / 1e9, limit_share=share,
                 note=note)
        rows.append(r)
        _print_row(r)

    threads = "" if on_gpu else f", {torch.get_num_threads()} torch threads"
    print(f"gradkern bench on {device} ({device_name(device)}), best of {repeats} "
          f"(torch {torch.__version__}{threads})")
    print(f"{'op':34s} {'scenario':34s} {'torch ms':>9s} {'gk ms':>9s} {'speed-up':>8s} "
          f"{'GB/s':>7s} {'limit':>7s}")
    print("limit: bytes read per second as a share of the "
          + ("device-to-device copy bandwidth (read + write)" if on_gpu
             else "read bandwidth (one sum pass)")
          + ", timed in turn with each scenario's total-norm row")
    for name, spec in scenarios(quick, device).items():
        params = make_grads(spec, device)
        grads = [p.grad for p in params]
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        limit = LimitPasses(grads, device)
        t_t, t_g, *t_limit = best_times([lambda: torch_get_total_norm(grads),
                                         lambda: gk.get_total_norm(grads), *limit.passes],
                                        repeats, device)
        read_bw, copy_bw = limit.bandwidths(t_limit)
        limits[name] = dict(read_bw=read_bw, copy_bw=copy_bw, read_source=limit.read_source)
        del limit  # its flat buffers, before `saved` below doubles the gradients' memory
        print(f"  {name}: {nbytes / 1e9:.2f} GB in {len(grads)} tensors; read pass over "
              f"{limits[name]['read_source']} {read_bw / 1e9:.1f} GB/s"
              + (f", copy {copy_bw / 1e9:.1f} GB/s" if copy_bw else ""))
        row("total norm", name, t_t, t_g, nbytes)
        saved = [g.clone() for g in grads]  # after the flat buffer is gone: memory peaks once

        def restore():
            for g, s in zip(grads, saved):
                g.copy_(s)

        t_t, t_g = best_times([lambda: torch_clip_grad_norm_(params, 1e30),
                               lambda: gk.clip_grad_norm_(params, 1e30)], repeats, device)
        row("clip_grad_norm_, no clipping", name, t_t, t_g, nbytes)
        t_t, t_g = best_times([lambda: torch_clip_grad_norm_(params, 1.0),
                               lambda: gk.clip_grad_norm_(params, 1.0)], repeats, device,
                              restore)
        row("clip_grad_norm_, clipping", name, t_t, t_g, nbytes)
        # The same pass with a bound no value reaches reads everything and writes nothing: no
        # one-pass clip is faster, so torch's time over it is the largest speed-up this run allows.
        t_t, t_g, t_read = best_times([lambda: torch_clip_grad_value_(params, CLAMP_AT),
                                       lambda: gk.clip_grad_value_(params, CLAMP_AT),
                                       lambda: gk.clip_grad_value_(params, NOTHING_CLAMPED)],
                                      repeats, device, restore)
        row("clip_grad_value_, <1% clamped", name, t_t, t_g, nbytes)
        row("clip_grad_value_, nothing clamped", name, t_t, t_read, nbytes,
            "torch column = torch clipping <1%; speed-up = the ceiling of the row above")
        # Both sides start from the parameters, so both pay for reading every .grad.
        t_norm, t_stats = best_times([lambda: gk.get_total_norm([p.grad for p in params]),
                                      lambda: gk.grad_stats(params)], repeats, device)
        row("grad_stats vs gradkern total norm", name, t_norm, t_stats, nbytes,
            "speed-up < 1: the cost of the extra statistics")
        if len(grads) <= 200 or not quick:
            t_t = best_time(lambda: _per_tensor_torch_stats(grads), repeats, device)
            row("grad_stats vs per-tensor torch", name, t_t, t_stats, nbytes)
        compiled, fallback = ("cuda", "numba_cuda") if on_gpu else ("cpp", "numba")
        if (name.startswith("huge") and backend is None and backends()[compiled].usable
                and backends()[fallback].usable):
            def with_fallback():
                before = set_backend(fallback)
                try:
                    gk.get_total_norm(grads)
                finally:
                    set_backend(before)

            t_fallback, t_norm = best_times([with_fallback, lambda: gk.get_total_norm(grads)],
                                            repeats, device)
            row(f"total norm: {fallback} vs gradkern", name, t_fallback, t_norm, nbytes,
                f"torch column = {fallback}; speed-up = {fallback} time / compiled time")
        del params, grads, saved
    _fused_step_rows(row, device, repeats, quick)
    t_torch, t_gk, nbytes = compiled_step_times(device, repeats, best_times)
    row("compiled step: fwd + bwd + clip", COMPILED_SCENARIO, t_torch, t_gk, nbytes,
        "torch.compile over forward, backward and clip_grad_norm_(1.0): torch's or gradkern's")
    print()
    monitor_rows = monitor_overhead(device, steps=12 if quick else 40)
    print_monitor_rows(monitor_rows)
    if contention is None:
        contention = 0 if quick or on_gpu else 3
    contention_rows = contention_times(contention) if contention > 0 else []
    print_contention_rows(contention_rows)
    if backend:
        set_backend(previous)
    if json_path:
        write_run(json_path, device, f"gradkern bench --device {device}"
                  + (" --quick" if quick else ""), quick=quick, limits=limits, rows=rows,
                  monitor_rows=monitor_rows, contention_rows=contention_rows)
    return 0


def write_run(path: str, device: str, command: str, *, quick: bool = False,
              limits: dict | None = None, rows: list[dict] | None = None,
              monitor_rows: list[dict] | None = None,
              contention_rows: list[dict] | None = None) -> None:
    """Save a bench run as JSON: the machine, the build and the command, then its rows (the
    layout ``benchmarks/table.py`` and ``benchmarks/cpu_targets.py`` read)."""
    with open(path, "w") as f:
        json.dump({"device": device_name(device), "quick": quick, "build": build_report(),
                   "torch": torch.__version__, "cuda": torch.version.cuda, "command": command,
                   "limits_bytes_per_s": limits or {}, "rows": rows or [],
                   "monitor_rows": monitor_rows or [], "contention_rows": contention_rows or []},
                  f, indent=2, default=str)
    print(f"wrote {path}")


COMPILED_SCENARIO = "MLP 8 x 1,024 (8.4M), batch 64"


def _fused_step_rows(row, device: str, repeats: int, quick: bool) -> None:
    """A training step's optimizer part on GPT-2-small shapes with fused AdamW, clipped by torch
    and by the Monitor's folded clip, with and without anything to clip (see
    :mod:`gradkern.tools.bench_fused_step`)."""
    layers = 3 if quick else 12
    scenario = f"GPT-2-small shapes ({layers} layers)"
    nbytes = sum(math.prod(s) for s in gpt2_small_shapes(layers)) * 4
    for max_norm, amp, what in ((CLIPPING, False, "clip 1.0"),
                                (NOTHING_TO_CLIP, False, "nothing to clip"),
                                (CLIPPING, True, "GradScaler, clip 1.0")):
        t = fused_step_times(layers, device, repeats, best_times, max_norm, amp)
        row(f"fused AdamW step, {what}", scenario, t["torch_clip"], t["gradkern"], nbytes,
            "torch: (unscale_ +) clip_grad_norm_ + step; gradkern: gk.Monitor(clip=...), "
            "folded into the step")
        note = (f"torch column = unclipped step {t['unclipped'] * 1e3:.2f} ms + one read "
                f"pass {t['read'] * 1e3:.2f} ms; speed-up >= 1: the goal is met")
        row(f"  the goal, {what}", scenario, t["unclipped"] + t["read"], t["gradkern"],
            nbytes, note)
        print(f"  ({note})")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()


def _print_row(r: dict) -> None:
    share = "-" if math.isnan(r["limit_share"]) else f"{100 * r['limit_share']:6.0f}%"
    print(f"{r['op']:34s} {r['scenario']:34s} {r['torch_ms']:9.2f} {r['gradkern_ms']:9.2f} "
          f"{r['speedup']:7.2f}x {r['gbps']:7.1f} {share:>7s}")
