"""Inputs where torch fails or where a careless kernel would be wrong."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradkern as gk
from helpers import make_params, reference_norm


def test_no_grads_gives_zero(backend):
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]  # .grad is None
    assert gk.clip_grad_norm_(params, 1.0).item() == 0.0
    assert gk.get_total_norm([]).item() == 0.0
    assert gk.clip_(params, 1.0, value=1.0).item() == 0.0
    assert gk.grad_stats(params).total_norm.item() == 0.0
    assert gk.find_nonfinite(params) == []


def test_empty_generator_warns_like_torch(backend):
    with pytest.warns(UserWarning, match="empty generator"):
        gk.clip_grad_norm_((p for p in []), 1.0)


def test_inf_norm_ignores_empty_tensor(backend):
    # torch raises here ("does not have an identity"); the sane answer is the max over the rest.
    t = [torch.tensor([]), torch.tensor([1.0, -4.0]), torch.tensor(2.0)]
    assert gk.get_total_norm(t, float("inf")).item() == 4.0


def test_zero_dim_tensors(backend):
    t = [torch.tensor(3.0), torch.tensor(-4.0)]
    assert gk.get_total_norm(t).item() == pytest.approx(5.0)


@pytest.mark.parametrize("p", [2.0, 1, 3.5, 0.0, math.inf, -math.inf])
def test_norm_type_given_any_way_torch_accepts(backend, p):
    t = [torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, -4.0])]
    want = gk.get_total_norm(t, float(p))
    forms = [np.float64(p), torch.tensor(p, dtype=torch.float64), str(float(p))]
    for form in forms + ([int(p)] if math.isfinite(p) and p == int(p) else []):
        assert torch.equal(gk.get_total_norm(t, form), want), form
    # A tensor norm_type is read each call, never remembered: it may change in place.
    norm_type = torch.tensor(1.0)
    assert gk.get_total_norm(t, norm_type).item() == 10.0
    norm_type.fill_(p)
    assert torch.equal(gk.get_total_norm(t, norm_type), want)


def test_norm_zero_counts_nonzero_elements(backend):
    t = [torch.tensor([0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, -4.0])]
    assert gk.get_total_norm(t, 0).item() == 4.0


def test_non_contiguous_grads(backend):
    base = make_params([(64, 48), (10, 10)], seed=1)
    p = torch.nn.Parameter(torch.zeros(48, 64))
    p.grad = base[0].grad.t()  # transposed view: not contiguous
    q = torch.nn.Parameter(torch.zeros(10, 5))
    q.grad = base[1].grad[:, ::2]  # strided view
    assert not p.grad.is_contiguous() and not q.grad.is_contiguous()
    expected = reference_norm([p.grad, q.grad], 2.0)
    assert gk.get_total_norm([p.grad, q.grad]).double().item() == pytest.approx(expected.item(),
                                                                                 rel=1e-6)
    before = [p.grad.clone(), q.grad.clone()]
    gk.clip_grad_norm_([p, q], 1.0)
    coef = 1.0 / (expected.item() + 1e-6)
    torch.testing.assert_close(p.grad, before[0] * coef)
    torch.testing.assert_close(q.grad, before[1] * coef)
    gk.clip_grad_value_([p, q], 0.01)
    assert p.grad.abs().max() <= 0.01 and q.grad.abs().max() <= 0.01


def _sparse(coalesced: bool) -> torch.Tensor:
    idx = torch.tensor([[0, 2, 2, 4], [1, 3, 3, 0]])
    val = torch.tensor([3.0, -1.0, -1.0, 0.0])
    s = torch.sparse_coo_tensor(idx, val, (5, 5))
    return s.coalesce() if coalesced else s


@pytest.mark.parametrize("coalesced", [True, False])
def test_sparse_coo_grads(backend, coalesced):
    p = torch.nn.Parameter(torch.zeros(5, 5))
    p.grad = _sparse(coalesced)
    dense = p.grad.to_dense()
    assert gk.get_total_norm([p.grad]).item() == pytest.approx(math.sqrt(9 + 4))
    assert gk.get_total_norm([p.grad], float("-inf")).item() == 0.0
    s = gk.grad_stats([p])
    assert s.numel.item() == 25 and s.zeros.item() == 23 and s.max_abs.item() == 3.0
    gk.clip_grad_norm_([p], 1.0)
    torch.testing.assert_close(p.grad.to_dense(), dense / (math.sqrt(13) + 1e-6))
    gk.clip_grad_value_([p], 0.1)
    assert p.grad.to_dense().abs().max().item() == pytest.approx(0.1)


@pytest.mark.parametrize("where", [0, 65_535, 65_536, 199_999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_placement(backend, where, bad):
    params = make_params([(3,), (200_000,), (5,)], seed=2)
    params[1].grad[where] = bad
    named = [("a", params[0]), ("b.weight", params[1]), ("c", params[2])]
    s = gk.grad_stats(named)
    assert s.nonfinite.tolist() == [0, 1, 0]
    assert gk.find_nonfinite(named) == ["b.weight"]
    total = gk.get_total_norm([p.grad for p in params])
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert (math.isnan(total) and math.isnan(expected)) or total.item() == expected.item()
    if math.isnan(bad):
        assert math.isnan(s.max_abs[1]) and math.isnan(gk.get_total_norm([params[1].grad], "inf"))
    else:
        assert s.max_abs[1].item() == math.inf


def test_nan_and_inf_combine_like_torch(backend):
    a = [torch.tensor([1.0, float("inf")]), torch.tensor([-float("inf")])]
    b = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])]
    for ts in (a, b):
        for p in (2.0, 1.0, float("inf"), float("-inf")):
            ours = gk.get_total_norm(ts, p)
            theirs = torch.nn.utils.get_total_norm(ts, p)
            assert torch.equal(ours.isnan(), theirs.isnan()) and (ours.isnan() or ours == theirs)


def test_nonfinite_norm_poisons_grads_like_torch(backend):
    params = make_params([(4,), (4,)], seed=3)
    params[0].grad[1] = float("nan")
    gk.clip_grad_norm_(params, 1.0)
    assert params[1].grad.isnan().all()  # torch multiplies by a NaN coefficient too


def test_error_if_nonfinite_names_parameters_and_mutates_nothing(backend):
    params = make_params([(4,), (4,), (4,)], seed=4)
    params[2].grad[0] = float("inf")
    before = [p.grad.clone() for p in params]
    named = [("encoder.w", params[0]), ("encoder.b", params[1]), ("head.w", params[2])]
    with pytest.raises(RuntimeError, match="head.w"):
        gk.clip_(named, 0.1, value=0.01, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gk.clip_grad_norm_(params, 0.1, error_if_nonfinite=True)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_mixed_devices_and_meta_fall_back_to_torch():
    t = torch.ones(4, device="meta")
    # The meta device has no data; the torch backend still computes symbolically.
    assert gk.get_total_norm([t]).device.type == "meta"


_READ_ONLY_CLAMP = """
import mmap, sys, warnings
import numpy as np, torch
import gradkern as gk
with open(sys.argv[1], "rb") as f:
    pages = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # a store here is a SIGSEGV
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "the given NumPy array is not writable"
    grad = torch.from_numpy(np.frombuffer(pages, dtype=np.float32))
p = torch.nn.Parameter(torch.zeros(grad.shape))
p.grad = grad
gk.clip_grad_value_([p], 1.0)
print(gk.get_backend(), int(grad.isnan().sum()))
"""


@pytest.mark.parametrize("name", ["cpp", "numba"])
def test_clip_value_that_changes_nothing_writes_nothing(name, tmp_path):
    # Read-only pages make any store fatal, even of an unchanged value. The clamp flags blocks
    # that hold a NaN (its fast test cannot tell NaN from an outlier); it must not store them.
    if not gk.backends()[name].usable:
        pytest.skip(f"backend {name!r} not usable here")
    values = (torch.rand(4096 + 7, generator=torch.Generator().manual_seed(0)) - 0.5).numpy()
    values[[5, 100, 2000, 4100]] = np.nan
    path = tmp_path / "grad.bin"
    path.write_bytes(values.tobytes())
    out = subprocess.run([sys.executable, "-c", _READ_ONLY_CLAMP, str(path)], cwd=tmp_path,
                         env={**os.environ, "GRADKERN_BACKEND": name}, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [name, "4"]
