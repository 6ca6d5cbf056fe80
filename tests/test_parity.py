"""Every backend against the pure-torch float64 reference and against torch.nn.utils itself."""

import itertools
import math

import pytest
import torch
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_
from torch.nn.utils import clip_grad_value_ as torch_clip_grad_value_

import gradkern as gk
from helpers import (DTYPES, NARROW_INPUT_RTOL, NORM_TYPES, make_params, reference_norm,
                      ulp_tolerance)

SHAPES = [(0,), (), (1,), (7,), (33, 5), (70_001,), (3, 65_536)]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    # The exact value rounded to the result dtype: an fp16 norm over 65504 is inf, in torch too.
    a, e = actual.double(), expected.to(actual.dtype).double()
    if math.isnan(e) or math.isinf(e):
        return bool((a == e) | (a.isnan() & e.isnan()))
    return bool(torch.isclose(a, e, rtol=ulp_tolerance(dtype), atol=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_total_norm_matches_reference(backend, dtype, norm_type):
    params = make_params(SHAPES, dtype, seed=1)
    params[3].grad[2] = 0  # an exact zero in a small tensor
    grads = [p.grad for p in params]
    got = gk.get_total_norm(grads, norm_type)
    assert got.dtype == dtype and got.shape == ()
    assert _close(got, reference_norm(grads, norm_type), dtype), (got, reference_norm(grads, norm_type))


@pytest.mark.parametrize("dtypes", [combo for k in range(2, 5)
                                    for combo in itertools.combinations(DTYPES, k)])
def test_mixed_dtypes_promote_like_torch(backend, dtypes):
    grads = [make_params([(100,)], d, seed=i)[0].grad for i, d in enumerate(dtypes)]
    got = gk.get_total_norm(grads)
    assert got.dtype == torch.nn.utils.get_total_norm(grads).dtype
    # Every combination holds a dtype narrower than fp64, and an fp64 total is as exact as that
    # part of it: within 1e-6 for fp32 (torch rounds those parts' norms to fp32 first).
    rtol = max(ulp_tolerance(got.dtype), NARROW_INPUT_RTOL)
    assert torch.isclose(got.double(), reference_norm(grads, 2.0).double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
def test_grad_stats_fields(backend, dtype, norm_type):
    params = make_params(SHAPES, dtype, seed=2)
    params[4].grad[0, :3] = 0
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    s = gk.grad_stats(named, norm_type)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert s.names == [f"p{i}" for i in range(len(params))]
    assert s.norm.dtype == out_dtype and s.max_abs.dtype == out_dtype
    assert s.nonfinite.dtype == s.zeros.dtype == s.numel.dtype == torch.int64
    for i, p in enumerate(params):
        g = p.grad.double().reshape(-1)
        assert s.numel[i] == g.numel()
        assert s.zeros[i] == int((g == 0).sum())
        assert s.nonfinite[i] == 0
        assert s.max_abs[i] == (g.abs().max() if g.numel() else 0)
        expected = torch.linalg.vector_norm(g, norm_type) if g.numel() else torch.tensor(0.0)
        assert _close(s.norm[i], expected, dtype)
    assert _close(s.total_norm, reference_norm([p.grad for p in params], norm_type), dtype)


TORCH_SAFE_SHAPES = [s for s in SHAPES if s != (0,)]  # torch's inf-norm fails on empty tensors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_matches_exact_math_and_torch(backend, dtype, max_norm, norm_type):
    mine = make_params(TORCH_SAFE_SHAPES, dtype, seed=3)
    theirs = make_params(TORCH_SAFE_SHAPES, dtype, seed=3)
    before = [p.grad.double().clone() for p in mine]
    n_mine = gk.clip_grad_norm_(mine, max_norm, norm_type)
    n_theirs = torch_clip_grad_norm_(theirs, max_norm, norm_type)
    assert n_mine.dtype == n_theirs.dtype and n_mine.shape == ()
    exact = reference_norm(before, norm_type)
    assert _close(n_mine, exact, dtype)
    coef = min(1.0, max_norm / (float(exact) + 1e-6))
    for p, g in zip(mine, before):
        # one rounding of the exact product (torch also rounds its coefficient to the grad dtype)
        torch.testing.assert_close(p.grad.double(), (g * coef).to(dtype).double(),
                                   rtol=ulp_tolerance(dtype), atol=0)
    if dtype in (torch.float32, torch.float64):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=4 * ulp_tolerance(dtype), atol=0)
    if max_norm == 1e6:  # nothing to clip: gradkern must not touch a single bit
        for a, g in zip(mine, before):
            assert torch.equal(a.grad.double(), g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [0.0, 0.1, 1.3, float("inf")])
def test_clip_grad_value_is_bitwise_torch(backend, dtype, clip_value):
    mine, theirs = make_params(SHAPES, dtype, seed=4), make_params(SHAPES, dtype, seed=4)
    mine[5].grad[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    theirs[5].grad[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert gk.clip_grad_value_(mine, clip_value) is None
    torch_clip_grad_value_(theirs, clip_value)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
        assert torch.equal(a.grad.isnan(), b.grad.isnan())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1024, 3 * 1024 + 17, 65_536 + 1_000])
def test_clip_grad_value_sparse_outliers_at_block_and_group_edges(backend, dtype, n):
    # The compiled clamp flags 16-element blocks in groups of 64 and rewrites only flagged
    # blocks: put outliers on the first and last element of blocks and groups, in the tail, and
    # blocks that hold only a NaN, -0 or an inf.
    grad = (torch.rand(n, generator=torch.Generator().manual_seed(n)) - 0.5).to(dtype)
    n_main = n - n % 16
    for i in [0, 15, 16, 1023, 1024, 1025, 2047, n_main - 1, n - 1]:
        if i < n:
            grad[i] = 3.0 if i % 2 else -3.0
    for i, v in [(100, float("nan")), (300, -0.0), (500, float("inf")), (700, -float("inf")),
                 (n - 2, float("nan"))]:
        grad[i] = v
    mine, theirs = torch.nn.Parameter(torch.zeros(n, dtype=dtype)), grad.clone()
    mine.grad = grad.clone()
    gk.clip_grad_value_([mine], 1.0)
    theirs.clamp_(-1.0, 1.0)
    assert torch.equal(mine.grad.nan_to_num(7.0), theirs.nan_to_num(7.0))
    assert torch.equal(mine.grad.isnan(), theirs.isnan())
    numbers = ~theirs.isnan()  # torch's bf16 clamp turns NaN into a NaN with the sign bit set
    assert torch.equal(mine.grad[numbers].signbit(), theirs[numbers].signbit())  # -0 stays -0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_per_tensor_then_value(backend, dtype):
    params = make_params([(10,), (1000,), (5, 5)], dtype, seed=5, scale=3.0)
    before = [p.grad.double().clone() for p in params]
    total = gk.clip_(params, max_norm=2.0, value=0.5, per_tensor=True)
    assert _close(total, reference_norm(before, 2.0), dtype)
    for p, g in zip(params, before):
        coef = min(1.0, 2.0 / (float(torch.linalg.vector_norm(g)) + 1e-6))
        expected = (g * coef).clamp(-0.5, 0.5)
        torch.testing.assert_close(p.grad.double(), expected, rtol=2 * ulp_tolerance(dtype),
                                   atol=1e-7)


def test_clip_global_norm_then_value(backend):
    params = make_params([(100,), (300,)], seed=6, scale=2.0)
    before = [p.grad.double().clone() for p in params]
    total = gk.clip_(params, 1.0, value=0.05)
    ref = reference_norm(before, 2.0)
    assert _close(total, ref, torch.float32)
    coef = min(1.0, 1.0 / (float(ref) + 1e-6))
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad.double(), (g * coef).clamp(-0.05, 0.05), rtol=3e-6,
                                   atol=1e-8)


def test_clip_grads_with_norm_uses_given_norm(backend):
    params = make_params([(50,), (60,)], seed=7)
    before = [p.grad.clone() for p in params]
    gk.clip_grads_with_norm_(params, 1.0, torch.tensor(4.0))
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1.0 / (4.0 + 1e-6)))


def test_ten_thousand_tensors(backend):
    shapes = [(1 + (i * 37) % 300,) for i in range(10_000)]
    params = make_params(shapes, seed=8)
    grads = [p.grad for p in params]
    assert _close(gk.get_total_norm(grads), reference_norm(grads, 2.0), torch.float32)
    s = gk.grad_stats(params)
    assert s.numel.sum() == sum(g.numel() for g in grads)
    ref = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
    torch.testing.assert_close(s.norm.double(), ref, rtol=2e-6, atol=0)
    gk.clip_grad_norm_(params, 1.0)
    assert float(reference_norm([p.grad for p in params], 2.0)) <= 1.0 + 1e-5


def test_backends_agree_with_each_other():
    usable = [n for n in ("cpp", "numba") if gk.backends()[n].usable]
    if len(usable) < 2:
        pytest.skip("needs both compiled backends")
    params = make_params([(100_003,), (17,), (65_536 * 2 + 5,)], seed=9)
    results = {}
    for name in usable:
        previous = gk.set_backend(name)
        try:
            s = gk.grad_stats(params)
            results[name] = s
        finally:
            gk.set_backend(previous)
    a, b = results.values()
    assert torch.equal(a.max_abs, b.max_abs) and torch.equal(a.zeros, b.zeros)
    # The power sums are added differently (fp32 runs in C++, fp64 throughout in Numba): both
    # are within NARROW_INPUT_RTOL of float64 arithmetic, so within that of each other.
    for x, y in ((a.norm, b.norm), (a.total_norm, b.total_norm)):
        torch.testing.assert_close(x, y, rtol=NARROW_INPUT_RTOL, atol=0)
