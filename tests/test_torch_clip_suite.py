"""PyTorch's own checks of its clipping functions (``test/test_nn.py``), rewritten against
gradkern and run on every CPU backend, plus the drop-in edge cases where the two could part.

Each test states torch's behaviour and holds gradkern to it, or to a clear error raised before
anything is written.
"""

import math
import warnings
from itertools import product

import pytest
import torch
from torch import inf, nan, nn

import gradkern as gk

NORMS = [0.5, 1.5, 2, 4, "inf"]


def torch_style_norm(grads, norm_type) -> torch.Tensor:
    """The norm the way torch's test computes it: a sum of powers, or a max."""
    p = float(norm_type)
    if p == inf:
        return max(g.abs().max() for g in grads)
    return sum(g.abs().pow(p).sum() for g in grads) ** (1.0 / p)


def grads_of(layer):
    return [p.grad for p in layer.parameters()]


def _set_grads(layer, grads):
    for p, g in zip(layer.parameters(), grads):
        p.grad = None if g is None else g.clone().view_as(p)


def test_clip_grad_norm_scales_every_gradient_alike(backend):
    layer = nn.Linear(10, 10)
    max_norm = 2.0
    grads = torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)
    for norm_type in NORMS:
        _set_grads(layer, grads)
        before = torch_style_norm(grads_of(layer), norm_type)
        norm = gk.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type)
        after = torch_style_norm(grads_of(layer), norm_type)
        torch.testing.assert_close(norm, before.to(norm.dtype))
        torch.testing.assert_close(after, torch.tensor(max_norm))
        assert after <= before
        ratios = torch.cat([(p.grad / g.view_as(p)).reshape(-1)
                            for p, g in zip(layer.parameters(), grads)])
        assert float(ratios.std()) == pytest.approx(0.0, abs=1e-6)  # one coefficient for all


def test_clip_grad_norm_leaves_small_gradients_alone(backend):
    layer = nn.Linear(10, 10)
    grads = (torch.rand(10, 10, generator=torch.Generator().manual_seed(0)).div(10000),
             torch.ones(10).div(500))
    _set_grads(layer, grads)
    for norm_type in NORMS:
        before = torch_style_norm(grads_of(layer), norm_type)
        norm = gk.clip_grad_norm_(layer.parameters(), 2.0, norm_type=norm_type)
        torch.testing.assert_close(norm, before.to(norm.dtype))
        for p, g in zip(layer.parameters(), grads):
            assert torch.equal(p.grad, g.view_as(p))  # bit for bit: nothing was written


def test_clip_grad_norm_takes_a_single_tensor(backend):
    g = torch.arange(1.0, 101).view(10, 10)
    p1, p2 = nn.Parameter(torch.randn(10, 10)), nn.Parameter(torch.randn(10, 10))
    p1.grad, p2.grad = g.clone(), g.clone()
    for norm_type in NORMS:
        gk.clip_grad_norm_(p1, 2.0, norm_type=norm_type)
        gk.clip_grad_norm_([p2], 2.0, norm_type=norm_type)
        assert torch.equal(p1.grad, p2.grad)


def test_clip_grad_norm_warns_on_an_exhausted_generator():
    layer = nn.Linear(3, 3)
    params = layer.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gk.clip_grad_norm_(params, 1.0)
    assert [str(w.message) for w in caught] == [
        "`parameters` is an empty generator, no gradient clipping will occur."]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_clip_grad_value_bounds_every_element(backend, dtype):
    layer = nn.Linear(10, 10).to(dtype)
    grad_w = torch.arange(-50.0, 50).view(10, 10).div_(5).to(dtype)
    grad_b = torch.ones(10).mul_(2).to(dtype)
    for grads in ([grad_w, grad_b], [grad_w, None]):
        _set_grads(layer, grads)
        gk.clip_grad_value_(layer.parameters(), 2.5)
        for p, g in zip(layer.parameters(), grads):
            if g is None:
                assert p.grad is None
                continue
            assert float(p.grad.max()) <= 2.5 and float(p.grad.min()) >= -2.5
            assert torch.equal(p.grad, g.view_as(p).clamp(-2.5, 2.5))
    p1, p2 = nn.Parameter(torch.randn(10, 10).to(dtype)), nn.Parameter(torch.randn(10, 10).to(dtype))
    p1.grad, p2.grad = grad_w.clone(), grad_w.clone()
    gk.clip_grad_value_(p1, 2.5)
    gk.clip_grad_value_([p2], 2.5)
    assert torch.equal(p1.grad, p2.grad)


@pytest.mark.parametrize("norm_type", NORMS)
def test_get_total_norm_and_clip_grads_with_norm_split_clip_grad_norm(backend, norm_type):
    """The two halves of clip_grad_norm_: the norm, then the scaling by it."""
    grads = [torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)]
    total = gk.get_total_norm(grads, norm_type=norm_type)
    torch.testing.assert_close(total, torch_style_norm(grads, norm_type).to(total.dtype))
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(grads, norm_type=norm_type))
    ours, theirs = nn.Linear(10, 10), nn.Linear(10, 10)
    _set_grads(ours, grads)
    _set_grads(theirs, grads)
    gk.clip_grads_with_norm_(ours.parameters(), 2.0, total)
    gk.clip_grad_norm_(theirs.parameters(), 2.0, norm_type=norm_type)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


# ---- error_if_nonfinite: torch's table of cases -----------------------------------------------

_POS = [0.1, 1, 2, 3.5, inf]
_NEG = [-0.1, -1, -2, -3.5]
_EXCEPT_0 = _POS + _NEG
_ALL = _EXCEPT_0 + [0]

# (grad in one element only, prefix a finite parameter, scalars, norms non-finite, norms finite)
ERROR_CASES = [
    (False, False, [inf, -inf], _EXCEPT_0, [0]),
    (False, True, [inf, -inf], _POS, _NEG + [0]),
    (True, False, [inf, -inf], _POS, _NEG + [0]),
    (True, True, [inf, -inf], _POS, _NEG + [0]),
    (False, False, [nan], _EXCEPT_0, [0]),
    (False, True, [nan], _EXCEPT_0, [0]),
    (True, False, [nan], _EXCEPT_0, [0]),
    (True, True, [nan], _EXCEPT_0, [0]),
    (False, False, [2e22, -2e22], [], _ALL),
    (False, True, [2e22, -2e22], [], _ALL),
    (True, False, [2e22, -2e22], [], _ALL),
    (True, True, [2e22, -2e22], [], _ALL),
    # fp64 grads of 2e200: the sum of squares (or of |g|^-2) leaves the fp64 range
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], _NEG + [inf, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], _NEG + [inf, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], _NEG + [inf, 1, 0.1, 0]),
]


def _error_case_params(scalar, one_element, prefix_finite):
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    (param[1] if one_element else param).mul(scalar).sum().backward()
    if not prefix_finite:
        return [param]
    prefix = torch.ones(1, dtype=torch.float64, requires_grad=True)
    prefix.mul(1).sum().backward()
    return [prefix, param]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_error_if_nonfinite_table(backend, case):
    one_element, prefix_finite, scalars, nonfinite, finite = ERROR_CASES[case]
    for error_if_nonfinite in (False, True):
        for norm_type, scalar in product(nonfinite, scalars):
            params = _error_case_params(scalar, one_element, prefix_finite)
            if error_if_nonfinite:
                before = [p.grad.clone() for p in params]
                with pytest.raises(RuntimeError, match=f"The total norm of order "
                                                      f"{float(norm_type)} for gradients"):
                    gk.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
                for a, p in zip(before, params):  # nothing written
                    torch.testing.assert_close(p.grad, a, rtol=0, atol=0, equal_nan=True)
            else:
                norm = gk.clip_grad_norm_(params, 1, norm_type=norm_type)
                assert not bool(torch.isfinite(norm)), (norm_type, scalar)
        for norm_type, scalar in product(finite, scalars):
            params = _error_case_params(scalar, one_element, prefix_finite)
            norm = gk.clip_grad_norm_(params, 1, norm_type=norm_type,
                                      error_if_nonfinite=error_if_nonfinite)
            assert bool(torch.isfinite(norm)), (norm_type, scalar)


@pytest.mark.parametrize("dtype,value", [(torch.float16, 60000.0), (torch.float32, 3e38)])
def test_a_norm_that_overflows_its_dtype_is_non_finite(backend, dtype, value):
    """torch returns the norm in the gradients' dtype, where a norm of finite gradients can
    overflow; error_if_nonfinite then raises, and nothing is written."""
    p = nn.Parameter(torch.zeros(4, dtype=dtype))
    p.grad = torch.full((4,), value, dtype=dtype)
    with pytest.raises(RuntimeError, match="overflows"):
        gk.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert torch.equal(p.grad, torch.full((4,), value, dtype=dtype))
    with pytest.raises(RuntimeError, match="overflows"):
        gk.get_total_norm([p.grad], error_if_nonfinite=True)
    assert gk.get_total_norm([p.grad]).isinf()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.get_total_norm([p.grad], error_if_nonfinite=True)


# ---- the drop-in edge cases --------------------------------------------------------------------

def _param(values, dtype=torch.float32):
    p = nn.Parameter(torch.zeros(len(values), dtype=dtype))
    p.grad = torch.tensor(values, dtype=dtype)
    return p


@pytest.mark.parametrize("items", ["pairs first", "tensors first"])
def test_a_list_mixing_pairs_and_tensors_is_refused(backend, items):
    a, b = _param([3.0, 4.0]), _param([30.0, 40.0])
    mixed = [("a", a), b] if items == "pairs first" else [a, ("b", b)]
    for call in (lambda: gk.clip_grad_norm_(mixed, 1.0), lambda: gk.clip_(mixed, 1.0),
                 lambda: gk.clip_grad_value_(mixed, 1.0), lambda: gk.grad_stats(mixed)):
        with pytest.raises(TypeError, match="mixes"):
            call()
    assert a.grad.tolist() == [3.0, 4.0] and b.grad.tolist() == [30.0, 40.0]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf"])
def test_a_tensor_listed_twice_is_clipped_as_torch_clips_it(backend, norm_type):
    """torch counts a repeated tensor twice in the norm and scales it once per appearance;
    value clipping then clamps it once."""
    ours, theirs = _param([10.0, -0.05, 3.0]), _param([10.0, -0.05, 3.0])
    norm = gk.clip_([ours, ours], 1.0, value=0.1, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_([theirs, theirs], 1.0, norm_type=norm_type)
    torch.nn.utils.clip_grad_value_([theirs, theirs], 0.1)
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(ours.grad, theirs.grad)
    a, b = _param([10.0, -0.05, 3.0]), _param([1.0, 2.0, 3.0])
    a_ref, b_ref = _param([10.0, -0.05, 3.0]), _param([1.0, 2.0, 3.0])
    norm = gk.clip_grad_norm_([a, b, a], 0.5, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_([a_ref, b_ref, a_ref], 0.5, norm_type=norm_type)
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(a.grad, a_ref.grad)  # scaled twice
    torch.testing.assert_close(b.grad, b_ref.grad)


def test_a_tensor_listed_twice_per_tensor_is_clipped_once(backend):
    p = _param([3.0, 4.0])
    gk.clip_([p, p], 1.0, per_tensor=True)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))


def test_overlapping_views_are_refused_before_anything_is_written(backend):
    buffer = torch.arange(1.0, 9.0)
    a, b = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(6))
    a.grad, b.grad = buffer[:6], buffer[2:]
    with pytest.raises(RuntimeError, match="share part of their memory"):
        gk.clip_grad_norm_([a, b], 1.0)
    assert torch.equal(buffer, torch.arange(1.0, 9.0))
    assert bool(gk.get_total_norm([a.grad, b.grad]) > 0)  # reading them is fine


@pytest.mark.parametrize("norm_type", [-inf, -1.0, -2.0])
def test_negative_orders_of_zero_elements(norm_type):
    """torch raises for them over an empty tensor (no identity); an empty list is 0."""
    with pytest.raises(RuntimeError, match="zero elements"):
        gk.get_total_norm([torch.empty(0)], norm_type)
    with pytest.raises(RuntimeError):
        torch.nn.utils.get_total_norm([torch.empty(0)], norm_type)
    assert gk.get_total_norm([], norm_type).item() == 0.0
    assert gk.get_total_norm([torch.empty(0), torch.tensor([2.0, 4.0])], norm_type) > 0


@pytest.mark.parametrize("total_norm,match", [(-1.0, ">= 0"), (torch.tensor(-2.0), ">= 0"),
                                              (torch.tensor([1.0, 2.0]), "one number"),
                                              ("big", "number")])
def test_clip_grads_with_norm_refuses_what_is_not_a_norm(total_norm, match):
    p = _param([3.0, 4.0])
    with pytest.raises(ValueError, match=match):
        gk.clip_grads_with_norm_([p], 1.0, total_norm)
    assert p.grad.tolist() == [3.0, 4.0]


def test_complex_gradients_are_a_clear_type_error():
    p = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    p.grad = torch.ones(2, dtype=torch.complex64)
    for call in (lambda: gk.clip_grad_norm_([p], 0.5), lambda: gk.clip_grad_value_([p], 0.5),
                 lambda: gk.get_total_norm([p.grad])):
        with pytest.raises(TypeError, match="complex"):
            call()
    assert torch.equal(p.grad, torch.ones(2, dtype=torch.complex64))


# ---- AGC against timm's adaptive_clip_grad ------------------------------------------------------

def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm's rule, one parameter after the other: each unit (output row) of a gradient is
    scaled to clip_factor * max(||w_unit||, eps) where its norm exceeds that."""
    def unitwise_norm(x):
        if x.ndim <= 1:
            return torch.linalg.vector_norm(x, norm_type)
        return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(p.grad.detach())
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))


def _agc_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
                          nn.LayerNorm(10), nn.Linear(10, 4, bias=False))
    x = torch.randn(5, 3, 8, 8)
    (model(x) * 50).pow(2).mean().backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, inf])
@pytest.mark.parametrize("clip_factor", [0.01, 0.1])
def test_agc_matches_timm(backend, norm_type, clip_factor):
    ours, theirs = _agc_model(0), _agc_model(0)
    gk.AGC(clip_factor=clip_factor, norm_type=norm_type).clip_(ours.parameters())
    timm_adaptive_clip_grad(theirs.parameters(), clip_factor, norm_type=norm_type)
    changed = 0
    for a, b, fresh in zip(ours.parameters(), theirs.parameters(), _agc_model(0).parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)
        changed += not torch.equal(fresh.grad, b.grad)
    assert changed >= 2  # the rule clipped something


def test_agc_clips_a_tied_weight_once_as_timm_does(backend):
    w1, w2 = nn.Parameter(torch.tensor([[0.3, 0.4]])), nn.Parameter(torch.tensor([[0.3, 0.4]]))
    w1.grad, w2.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 4.0]])
    gk.AGC(clip_factor=0.1).clip_([w1, w1])
    timm_adaptive_clip_grad([w2, w2], clip_factor=0.1)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert math.isclose(float(w1.grad.norm()), 0.1 * 0.5, rel_tol=1e-5)


# ---- clipper state -------------------------------------------------------------------------

@pytest.mark.parametrize("make,other", [(gk.AutoClip, gk.ZClip), (gk.ZClip, gk.AutoClip)])
def test_loading_another_clippers_state_is_a_value_error(make, other):
    clipper = make()
    p = _param([3.0, 4.0])
    clipper.clip_([p])
    before = clipper.state_dict()
    with pytest.raises(ValueError, match=f"not a {make.__name__} state"):
        clipper.load_state_dict(other().state_dict())
    after = clipper.state_dict()
    assert after.keys() == before.keys()
