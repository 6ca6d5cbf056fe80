"""pytest-benchmark suite: torch's built-ins and each gradkern backend on the same gradients.

``pytest benchmarks --benchmark-only`` runs on the CPU; ``--gk-device cuda`` runs the GPU sets
with the CUDA backends (each timed call ends with a device synchronise, so the time is the
work's, not the launch's).
"""

import pytest
import torch

import gradkern as gk
from gradkern.tools.scenarios import make_grads

BACKENDS = {"cpu": ("cpp", "numba"), "cuda": ("cuda", "numba_cuda")}
SIZES = {"cpu": {"many_small": (10_000, 1000), "large": (4, 16_000_000)},
         "cuda": {"many_small": (20_000, 4096), "large": (4, 256_000_000)}}


def pytest_addoption(parser):
    parser.addoption("--gk-device", default="cpu", choices=sorted(BACKENDS),
                     help="device of the gradients (default: cpu)")


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        device = metafunc.config.getoption("--gk-device")
        metafunc.parametrize("impl", ("torch-builtin", *BACKENDS[device]), indirect=True)


@pytest.fixture(scope="session")
def device(pytestconfig):
    name = pytestconfig.getoption("--gk-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--gk-device cuda needs a GPU")
    return name


@pytest.fixture
def impl(request):
    name = request.param
    if name == "torch-builtin":
        yield name
        return
    if not gk.backends()[name].usable:
        pytest.skip(f"{name} not usable: {gk.backends()[name].reason}")
    previous = gk.set_backend(name)
    yield name
    gk.set_backend(previous)


@pytest.fixture
def run(device):
    """Calls fn(*args), then waits for the device, so a benchmark times the work."""
    if device == "cpu":
        return lambda fn, *args: fn(*args)

    def synchronised(fn, *args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return synchronised


def _grads(device, scenario):
    count, size = SIZES[device][scenario]
    return make_grads([((size,), torch.float32)] * count, device)


@pytest.fixture(scope="session")
def many_small(device):
    return _grads(device, "many_small")


@pytest.fixture(scope="session")
def large(device):
    return _grads(device, "large")
