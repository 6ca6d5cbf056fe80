"""Bad arguments raise clear errors before anything is touched."""

import pytest
import torch

import gradkern as gk
from conftest import make_params


def _snapshot(params):
    return [p.grad.clone() for p in params]


def _unchanged(params, snap):
    return all(torch.equal(p.grad, s) for p, s in zip(params, snap))


@pytest.mark.parametrize("kwargs", [dict(max_norm=-1.0), dict(max_norm=float("nan")),
                                    dict(max_norm=1.0, value=-0.5),
                                    dict(max_norm=1.0, value=float("nan")),
                                    dict(max_norm=1.0, norm_type="fro"),
                                    dict(max_norm=1.0, norm_type=float("nan"))])
def test_clip_rejects_bad_arguments(backend, kwargs):
    params = make_params([(10,), (20,)], scale=10.0)
    snap = _snapshot(params)
    with pytest.raises(ValueError):
        gk.clip_(params, **kwargs)
    assert _unchanged(params, snap)


def test_drop_ins_reject_negative_bounds(backend):
    params = make_params([(10,)], scale=10.0)
    snap = _snapshot(params)
    with pytest.raises(ValueError, match="max_norm"):
        gk.clip_grad_norm_(params, -1.0)
    with pytest.raises(ValueError, match="clip_value"):
        gk.clip_grad_value_(params, -1.0)
    with pytest.raises(ValueError, match="max_norm"):
        gk.clip_grads_with_norm_(params, float("nan"), torch.tensor(1.0))
    assert _unchanged(params, snap)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_tensors_raise_type_error(backend, dtype):
    good = make_params([(10,)], scale=10.0)
    bad = torch.zeros(3, dtype=dtype)  # integer tensors can carry integer .grad
    bad.grad = torch.ones(3, dtype=dtype)
    named = [("good", good[0]), ("counts", bad)]
    snap = _snapshot(good)
    with pytest.raises(TypeError, match="'counts'.*non-floating-point"):
        gk.clip_(named, 0.1, value=0.1)
    with pytest.raises(TypeError):
        gk.get_total_norm([torch.ones(3, dtype=dtype)])
    assert _unchanged(good, snap)


def test_unsupported_float_dtype_is_named():
    with pytest.raises(TypeError, match="floating-point torch.float8"):
        gk.get_total_norm([torch.zeros(3, dtype=torch.float8_e4m3fn)])


def test_bad_layout_fails_before_writing(backend):
    good = make_params([(4, 4)], scale=10.0)
    csr = torch.zeros(4, 4).to_sparse_csr()
    csr.grad = torch.eye(4).to_sparse_csr()
    snap = _snapshot(good)
    with pytest.raises(TypeError, match="layout"):
        gk.clip_grad_value_([good[0], csr], 0.1)
    assert _unchanged(good, snap)
