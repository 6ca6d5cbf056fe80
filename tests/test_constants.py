"""The numbers shared with the kernels have one source per language: gradkern/_constants.py and
cpp/include/gradkern/constants.h. Every compiled module and both Numba twins must agree with the
Python source; a change to one copy alone fails here."""

import importlib

import pytest
import torch

from gradkern import _constants, _native
from helpers import required_backends

DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
               "bfloat16": torch.bfloat16}


def _compiled_modules():
    modules = []
    if _native.cpu is not None:
        modules.append(pytest.param(_native.cpu, id="_cpu"))
    elif "cpp" in required_backends():
        pytest.fail(f"GRADKERN_REQUIRE names cpp, but {_native.CPU_ERROR}")
    cuda, error = _native.cuda()
    if cuda is not None:
        modules.append(pytest.param(cuda, id="_cuda"))
    elif "cuda" in required_backends():
        pytest.fail(f"GRADKERN_REQUIRE names cuda, but {error}")
    return modules


@pytest.mark.parametrize("module", _compiled_modules())
def test_compiled_modules_agree_with_python(module):
    assert {DTYPE_NAMES[name]: code for name, code in module.DTYPE_CODES.items()} == \
        _constants.DTYPE_CODES
    assert dict(module.NORM_KINDS) == {k.name: int(k) for k in _constants.NormKind}
    assert module.CHUNK_ELEMS == _constants.CHUNK_ELEMS
    assert (module.MIN_PARALLEL_RANGES, module.MIN_PARALLEL_RANGES_SHARED,
            module.SHARE_WINDOW_NS, module.SHARED_RUN_PER_WAIT) == (
        _constants.MIN_PARALLEL_RANGES, _constants.MIN_PARALLEL_RANGES_SHARED,
        _constants.SHARE_WINDOW_NS, _constants.SHARED_RUN_PER_WAIT)


@pytest.mark.parametrize("name", ["gradkern.backends._numba_kernels",
                                  "gradkern.backends._numba_cuda_kernels"])
def test_numba_twins_agree_with_python(name):
    pytest.importorskip("numba")
    k = importlib.import_module(name)
    assert (k.F32, k.F64, k.F16, k.BF16) == tuple(
        _constants.DTYPE_CODES[d] for d in (torch.float32, torch.float64, torch.float16,
                                             torch.bfloat16))
    kinds = _constants.NormKind
    assert (k.KIND_NONE, k.KIND_L1, k.KIND_L2, k.KIND_MIN_ABS, k.KIND_POWER) == (
        kinds.NONE, kinds.L1, kinds.L2, kinds.MIN_ABS, kinds.POWER)
    assert k.CHUNK_ELEMS == _constants.CHUNK_ELEMS


def test_python_users_take_the_source():
    from gradkern import _chunks, _norms, _table, _torch_layout

    assert _table.DTYPE_CODES is _constants.DTYPE_CODES
    assert _norms.NormKind is _constants.NormKind
    assert _chunks.CHUNK_ELEMS == _constants.CHUNK_ELEMS
    assert _torch_layout.DTYPES == _constants.DTYPES_BY_CODE
