"""pytest-benchmark suite: torch's built-ins and each gradkern backend on the same gradients."""

import pytest

import gradkern as gk
from gradkern.scenarios import make_grads

IMPLS = ["torch-builtin", "cpp", "numba"]


@pytest.fixture(params=IMPLS)
def impl(request):
    name = request.param
    if name != "torch-builtin":
        if not gk.backends()[name].usable:
            pytest.skip(f"{name} not usable: {gk.backends()[name].reason}")
        previous = gk.set_backend(name)
        yield name
        gk.set_backend(previous)
    else:
        yield name


@pytest.fixture(scope="session")
def many_small():
    import torch

    return make_grads([((1000,), torch.float32)] * 10_000)


@pytest.fixture(scope="session")
def large():
    import torch

    return make_grads([((16_000_000,), torch.float32)] * 4)
