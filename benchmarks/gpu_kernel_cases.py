"""Every CUDA kernel path on small, awkward inputs: for compute-sanitizer and Nsight Compute.

    compute-sanitizer --tool memcheck python benchmarks/gpu_kernel_cases.py
    compute-sanitizer --tool racecheck python benchmarks/gpu_kernel_cases.py
    ncu --kernel-name regex:"chunk_partials|clip_chunks" --launch-count 4 \\
        --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \\
        python benchmarks/gpu_kernel_cases.py --large

The small cases cover every dtype and norm kind, empty and one-element tensors, lengths that end
inside a 16-byte vector, starts that are not 16-byte aligned (views at an odd offset), a tensor
spanning several chunks, clipping that scales, clamps, or does nothing. Each result is checked
against float64 torch, so the script also fails on a wrong answer. ``--large`` runs instead a
1 GiB bf16 set (the LLaMA-like case's dtype), for a throughput profile of the main kernels.
"""

import sys

import torch

import gradkern as gk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU run checks the script itself
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORMS = (2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.0)


def small_grads(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    base = torch.randn(200_003, generator=gen, device=DEVICE).to(dtype)
    return [torch.zeros(0, device=DEVICE, dtype=dtype), base[:1].clone(), base[1:18],
            base[3:65_540], base[:131_075].clone(), base[5:]]


def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.allclose(got, want, rtol=2e-2, atol=0, equal_nan=True):
        raise AssertionError(f"{what}: {got} != {want}")


def run_small() -> None:
    if DEVICE == "cuda":
        backend = gk.backends()["cuda"]
        assert backend.usable, backend.reason
    for dtype in DTYPES:
        for order in NORMS:
            grads = small_grads(dtype)
            want = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]), order)
            check(gk.get_total_norm(grads, order), want.to(dtype), f"{dtype} p={order}")
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in small_grads(dtype)]
        for p, g in zip(params, small_grads(dtype)):
            p.grad = g.clone()
        stats = gk.grad_stats(params)
        for i, p in enumerate(params):
            if p.numel():
                check(stats.max_abs[i], p.grad.double().abs().max(), f"{dtype} max_abs #{i}")
                check(stats.norm[i], p.grad.double().norm(), f"{dtype} norm #{i}")
        gk.clip_grad_norm_(params, 1e9)  # no clipping: the scale kernel exits early
        gk.clip_grad_norm_(params, 0.5)  # scales every tensor
        gk.clip_grad_value_(params, 1e-3)  # clamps almost every element
        gk.clip_(params, max_norm=0.1, value=1e-4)
        assert all(float(p.grad.double().abs().max()) <= 1e-4 * 1.01 for p in params if p.numel())
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("small cases: ok")


def run_large() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    params = []
    for _ in range(8):  # 1 GiB of bf16 gradients
        p = torch.nn.Parameter(torch.empty(64 * 2**20, device=DEVICE, dtype=torch.bfloat16))
        p.grad = torch.randn(p.shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        params.append(p)
    for _ in range(2):
        total = gk.get_total_norm([p.grad for p in params])
        gk.clip_grads_with_norm_(params, 1.0, total)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("large cases: ok")


if __name__ == "__main__":
    run_large() if "--large" in sys.argv else run_small()
