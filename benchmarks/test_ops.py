"""Run with: pytest benchmarks --benchmark-only (groups compare implementations per op)."""

import pytest
import torch
from torch.nn import utils as tnu

import gradkern as gk


def _grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("scenario", ["many_small", "large"])
def test_total_norm(benchmark, impl, scenario, request):
    params = request.getfixturevalue(scenario)
    benchmark.group = f"total norm / {scenario}"
    fn = tnu.get_total_norm if impl == "torch-builtin" else gk.get_total_norm
    benchmark(fn, _grads(params))


@pytest.mark.parametrize("scenario", ["many_small", "large"])
def test_clip_grad_norm_no_clipping(benchmark, impl, scenario, request):
    params = request.getfixturevalue(scenario)
    benchmark.group = f"clip_grad_norm_ (no clipping) / {scenario}"
    fn = tnu.clip_grad_norm_ if impl == "torch-builtin" else gk.clip_grad_norm_
    benchmark(fn, params, 1e30)


@pytest.mark.parametrize("scenario", ["many_small", "large"])
def test_clip_grad_value(benchmark, impl, scenario, request):
    params = request.getfixturevalue(scenario)
    benchmark.group = f"clip_grad_value_ (<1% clamped) / {scenario}"
    fn = tnu.clip_grad_value_ if impl == "torch-builtin" else gk.clip_grad_value_
    benchmark(fn, params, 2.6)


@pytest.mark.parametrize("scenario", ["many_small", "large"])
def test_stats(benchmark, impl, scenario, request):
    params = request.getfixturevalue(scenario)
    benchmark.group = f"all four statistics / {scenario}"
    if impl == "torch-builtin":
        def per_tensor():
            return [(torch.linalg.vector_norm(g), g.abs().amax(), (~g.isfinite()).sum(),
                     (g == 0).sum()) for g in _grads(params)]
        benchmark(per_tensor)
    else:
        benchmark(gk.grad_stats, params)
