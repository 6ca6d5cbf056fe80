"""Bad arguments raise clear errors before anything is touched."""

import pytest
import torch

import gradkern as gk
from helpers import make_params


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


class _Wrapper(torch.Tensor):
    """A tensor subclass that keeps its values in an inner tensor, as DTensor does: the outer
    tensor has no memory, and its data pointer is null."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.inner if isinstance(x, _Wrapper) else x

        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        return func(*args, **kwargs)


def test_tensor_without_memory_of_its_own_raises_instead_of_crashing(backend):
    # Kernels given its null data pointer would read or write address 0 and kill the process.
    good = make_params([(4, 4)], scale=10.0)
    wrapped = torch.nn.Parameter(torch.zeros(3))
    wrapped.grad = _Wrapper(torch.full((3,), 5.0))
    assert torch.Tensor.data_ptr(wrapped.grad) == 0
    snap = _snapshot(good)
    for call in (lambda ps: gk.clip_grad_norm_(ps, 0.1), lambda ps: gk.clip_grad_value_(ps, 0.1),
                 lambda ps: gk.clip_grads_with_norm_(ps, 0.1, torch.tensor(100.0)),
                 lambda ps: gk.clip_(ps, max_norm=0.1, value=0.1), gk.grad_stats,
                 gk.find_nonfinite, lambda ps: gk.ClipByNorm(0.1).clip_(ps)):
        with pytest.raises(TypeError, match="_Wrapper without memory of its own"):
            call([good[0], wrapped])
    assert _unchanged(good, snap)
    assert torch.equal(wrapped.grad.inner, torch.full((3,), 5.0))


def test_expanded_gradient_raises_before_any_gradient_is_clipped(backend):
    # An expanded gradient (stride 0) cannot be written in place. torch's clip_grad_norm_ has
    # scaled the gradients before it by the time it raises; gradkern raises before writing.
    good = make_params([(4, 4), (7,)], scale=10.0)
    expanded = torch.nn.Parameter(torch.zeros(5))
    expanded.grad = torch.full((1,), 30.0).expand(5)
    snap = _snapshot(good)
    for call in (lambda ps: gk.clip_grad_norm_(ps, 0.1), lambda ps: gk.clip_grad_value_(ps, 0.1),
                 lambda ps: gk.clip_grads_with_norm_(ps, 0.1, torch.tensor(100.0)),
                 lambda ps: gk.clip_(ps, max_norm=0.1, per_tensor=True),
                 lambda ps: gk.ClipByNorm(0.1).clip_(ps), lambda ps: gk.ClipByValue(0.1).clip_(ps),
                 lambda ps: gk.AGC(0.01).clip_(ps)):
        with pytest.raises(RuntimeError, match="share one memory location"):
            call([good[0], expanded, good[1]])
        assert _unchanged(good, snap)
        assert torch.equal(expanded.grad, torch.full((5,), 30.0))
    # also when nothing would change: it fails at the first clip, not the first that scales
    with pytest.raises(RuntimeError, match="share one memory location"):
        gk.clip_grad_norm_([good[0], expanded, good[1]], 1e9)
    # reading it is fine
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in good] +
                                              [expanded.grad]))
    torch.testing.assert_close(gk.get_total_norm([p.grad for p in good] + [expanded.grad]), want)
    assert gk.grad_stats([expanded]).max_abs.item() == 30.0
