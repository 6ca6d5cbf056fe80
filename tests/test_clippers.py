"""Clippers against torch / timm semantics and their papers' rules on hand-checked cases."""

import math

import pytest
import torch
from torch import nn

import gradkern as gk


def model_with_grads(seed=0, scale=1.0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                        nn.LayerNorm(5), nn.Linear(5, 2))
    for p in net.parameters():
        p.grad = torch.randn_like(p) * scale
    return net


def grads(net):
    return [p.grad.clone() for p in net.parameters()]


def test_clip_by_norm_matches_torch(backend):
    a, b = model_with_grads(), model_with_grads()
    got = gk.ClipByNorm(1.0).clip_(a.parameters())
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    torch.testing.assert_close(got, want)
    for x, y in zip(grads(a), grads(b)):
        torch.testing.assert_close(x, y)


def test_clip_by_norm_per_tensor_and_other_norms(backend):
    a = model_with_grads()
    before = grads(a)
    gk.ClipByNorm(0.5, per_tensor=True).clip_(a.parameters())
    for g0, g1 in zip(before, grads(a)):
        torch.testing.assert_close(g1, g0 * min(1.0, 0.5 / (g0.norm().item() + 1e-6)))
    c, d = model_with_grads(), model_with_grads()
    gk.ClipByNorm(1.0, norm_type=float("inf")).clip_(c.parameters())
    torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0, norm_type=float("inf"))
    for x, y in zip(grads(c), grads(d)):
        torch.testing.assert_close(x, y)


def test_clip_by_value_matches_torch(backend):
    a, b = model_with_grads(), model_with_grads()
    gk.ClipByValue(0.3).clip_(a.parameters())
    torch.nn.utils.clip_grad_value_(b.parameters(), 0.3)
    for x, y in zip(grads(a), grads(b)):
        assert torch.equal(x, y)


def timm_adaptive_clip_grad(parameters, clip_factor, eps):
    """timm.utils.agc.adaptive_clip_grad, restated in plain torch for the comparison."""
    def unitwise_norm(x):
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g_data, clipped))


@pytest.mark.parametrize("clip_factor", [0.01, 0.1, 10.0])
def test_agc_matches_timm(backend, clip_factor):
    a, b = model_with_grads(scale=0.3), model_with_grads(scale=0.3)
    total = gk.AGC(clip_factor=clip_factor, eps=1e-3).clip_(a.parameters())
    timm_adaptive_clip_grad(b.parameters(), clip_factor, 1e-3)
    for x, y in zip(grads(a), grads(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert total.item() == pytest.approx(
        math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model_with_grads(scale=0.3)
                      .parameters())), rel=1e-6)


def test_agc_leaves_excluded_parameters_alone():
    a = model_with_grads()
    head = list(a[4].parameters())
    before = [p.grad.clone() for p in head]
    gk.AGC(clip_factor=1e-4, exclude=head).clip_(a.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(head, before))
    assert not torch.equal(a[0].weight.grad, model_with_grads()[0].weight.grad)


def set_grad(p, value):
    p.grad = torch.full_like(p, value)


def test_autoclip_clips_to_the_percentile_of_history():
    p = nn.Parameter(torch.zeros(1))
    clip = gk.AutoClip(percentile=50, history=3)
    seen = []
    for g in (1.0, 3.0, 100.0, 2.0):
        set_grad(p, g)
        seen.append((clip.clip_([p]).item(), p.grad.item()))
    # norms so far: [1], [1,3], [1,3,100], then the history drops 1: [2,3,100]
    assert seen[0] == (1.0, pytest.approx(1.0, rel=1e-5))  # max_norm / (norm + 1e-6), as torch
    assert seen[1] == (3.0, pytest.approx(2.0, rel=1e-5))     # median of (1, 3) = 2
    assert seen[2] == (100.0, pytest.approx(3.0, rel=1e-5))   # median of (1, 3, 100)
    assert seen[3] == (2.0, pytest.approx(2.0, rel=1e-5))     # median of (100, 3, 2) = 3 > 2
    state = clip.state_dict()
    again = gk.AutoClip(percentile=50, history=3)
    again.load_state_dict(state)
    set_grad(p, 500.0)
    again.clip_([p])
    assert p.grad.item() == pytest.approx(100.0, rel=1e-5)  # 3 drops out: median of (2, 500, 100)


def zclip_reference(norms, alpha, z_thresh, warmup, eps=1e-6):
    """The ZClip rule written out in floats: returns the norm each step is clipped to."""
    out, mean, var = [], None, None
    for i, g in enumerate(norms):
        if i < warmup:
            out.append(g)
            if i == warmup - 1:
                w = norms[:warmup]
                mean = sum(w) / warmup
                var = sum((x - mean) ** 2 for x in w) / warmup
            continue
        std = math.sqrt(var + eps)
        z = (g - mean) / std
        target = mean + (z_thresh / z) * std if z > z_thresh else g
        clipped = min(g, target)
        out.append(clipped)
        new_mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - new_mean) ** 2
        mean = new_mean
    return out


def test_zclip_follows_the_rule():
    norms = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 8.0, 1.05, 30.0, 0.95]
    clip = gk.ZClip(alpha=0.9, z_thresh=2.0, warmup=5)
    p = nn.Parameter(torch.zeros(1))
    got = []
    for g in norms:
        set_grad(p, g)
        assert clip.clip_([p]).item() == pytest.approx(g)
        got.append(p.grad.item())
    want = zclip_reference(norms, 0.9, 2.0, 5)
    assert got == pytest.approx(want, rel=1e-5)
    assert got[6] < 2.0 and got[8] < 2.0  # the spikes are cut


def test_zclip_ignores_nonfinite_norms_in_its_moments():
    clip = gk.ZClip(warmup=2)
    p = nn.Parameter(torch.zeros(1))
    for g in (1.0, 1.0, float("inf"), 1.0):
        set_grad(p, g)
        clip.clip_([p])
    assert torch.isfinite(clip.state_dict()["mean"])


def test_clippers_validate_arguments():
    with pytest.raises(ValueError):
        gk.ClipByNorm(-1.0)
    with pytest.raises(ValueError):
        gk.ClipByValue(float("nan"))
    with pytest.raises(ValueError):
        gk.AutoClip(percentile=120)
    with pytest.raises(ValueError):
        gk.ZClip(alpha=1.5)
    with pytest.raises(ValueError):
        gk.AGC(clip_factor=-0.1)


def test_clippers_without_grads_return_zero():
    p = nn.Parameter(torch.zeros(3))
    for clip in (gk.ClipByNorm(1.0), gk.ClipByValue(1.0), gk.AGC(), gk.AutoClip(), gk.ZClip()):
        assert clip.clip_([p]).item() == 0.0
