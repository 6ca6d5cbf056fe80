"""Run with: pytest benchmarks --benchmark-only [--gk-device cuda] (groups compare
implementations per op)."""

import pytest
import torch
from torch.nn import utils as tnu

import gradkern as gk


def _per_tensor_torch_stats(params):
    return [(torch.linalg.vector_norm(p.grad), p.grad.abs().amax(), (~p.grad.isfinite()).sum(),
             (p.grad == 0).sum()) for p in params]


# op name -> (torch built-in, gradkern, extra args); each takes the parameter list first
OPS = {
    "total norm": (lambda ps: tnu.get_total_norm([p.grad for p in ps]),
                   lambda ps: gk.get_total_norm([p.grad for p in ps]), ()),
    "clip_grad_norm_ (no clipping)": (tnu.clip_grad_norm_, gk.clip_grad_norm_, (1e30,)),
    "clip_grad_value_ (<1% clamped)": (tnu.clip_grad_value_, gk.clip_grad_value_, (2.6,)),
    "all four statistics": (_per_tensor_torch_stats, gk.grad_stats, ()),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("scenario", ["many_small", "large"])
def test_op(benchmark, impl, run, op, scenario, request):
    params = request.getfixturevalue(scenario)
    torch_fn, gk_fn, args = OPS[op]
    benchmark.group = f"{op} / {scenario}"
    benchmark(run, torch_fn if impl == "torch-builtin" else gk_fn, params, *args)
