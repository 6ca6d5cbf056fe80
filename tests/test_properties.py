"""Property-based checks: random lists of random tensors against the float64 reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradkern as gk
from helpers import reference_norm, ulp_tolerance

_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
_sizes = st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=6)
_norms = st.sampled_from([1.0, 2.0, 3.0, 0.5, math.inf, -math.inf, 0.0])


class _P:
    def __init__(self, g):
        self.grad = g


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # backend is per test
@given(sizes=_sizes, dtype=_dtypes, p=_norms, seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 50.0]))
@example(sizes=[0, 0], dtype=torch.float32, p=-math.inf, seed=0, scale=1.0)  # no elements
def test_norms_and_stats_match_reference(backend, sizes, dtype, p, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
             for n in sizes]
    if p < 0 and sum(sizes) == 0:  # no value, as in torch: both raise
        with pytest.raises(RuntimeError):
            reference_norm(grads, p)
        with pytest.raises(RuntimeError, match="zero elements"):
            gk.get_total_norm(grads, p)
        return
    got = gk.get_total_norm(grads, p).double()
    exact = reference_norm(grads, p).to(dtype).double()
    if math.isinf(exact) or exact == 0:
        assert got == exact
    else:
        assert abs(got - exact) <= ulp_tolerance(dtype) * abs(exact)
    s = gk.grad_stats([_P(g) for g in grads])
    assert s.zeros.tolist() == [int((g == 0).sum()) for g in grads]
    assert s.numel.tolist() == sizes


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=_sizes, dtype=_dtypes, seed=st.integers(0, 2**31 - 1),
       value=st.floats(min_value=0.0, max_value=3.0))
def test_clip_value_equals_torch_clamp(backend, sizes, dtype, seed, value):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    expected = [g.clamp(-value, value) for g in grads]
    gk.clip_grad_value_([_P(g) for g in grads], value)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)
