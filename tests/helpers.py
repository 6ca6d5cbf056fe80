"""What the tests share: the backends to run under, a pure-torch float64 reference, random
parameters, and the tolerances the kernels are held to."""

from __future__ import annotations

import os

import pytest
import torch

import gradkern as gk

CPU_BACKENDS = ("cpp", "numba", "torch")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORM_TYPES = (2.0, 1.0, 3.0, 0.5, float("inf"), float("-inf"), 0.0, -1.0)


def required_backends() -> set[str]:
    return {b for b in os.environ.get("GRADKERN_REQUIRE", "").split(",") if b}


def use_backend(name: str):
    """Generator for a fixture: force backend ``name`` for one test, then restore the choice.

    An unusable backend skips the test, or fails it when GRADKERN_REQUIRE names it.
    """
    info = gk.backends()[name]
    if not info.usable:
        if name in required_backends():
            pytest.fail(f"GRADKERN_REQUIRE names {name!r}, which is not usable: {info.reason}")
        pytest.skip(f"backend {name!r} not usable here: {info.reason}")
    previous = gk.set_backend(name)
    yield name
    gk.set_backend(previous)


def reference_norm(tensors, p: float) -> torch.Tensor:
    """The p-norm of the tensors as one vector, in float64 (sparse tensors densified).

    With no elements at all the answer is the identity of the reduction, 0, where torch raises
    for the inf-norm; a negative order has none, and torch raises (so does this).
    """
    flat = [t.to_dense().double().reshape(-1) for t in tensors]
    if sum(f.numel() for f in flat) == 0 and p >= 0:
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.cat(flat), p)


def make_params(shapes, dtype=torch.float32, seed=0, scale=1.0):
    """Parameters with random gradients of the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


# The accuracy bound for fp32 inputs: within 1e-6 of float64 arithmetic. The C++ kernels add
# narrow inputs in fp32 runs of 8 terms per lane (within 4.8e-7), so an fp64 result over fp32,
# fp16 or bf16 grads is held to this bound rather than to one fp64 rounding.
NARROW_INPUT_RTOL = 1e-6


def ulp_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for one rounding to ``dtype`` (plus slack for torch's own rounding)."""
    return {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}[dtype]
