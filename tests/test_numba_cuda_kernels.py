"""The numba-cuda kernels, checked on any machine: their logic under numba's CUDA simulator,
their typing and code generation by compiling them to PTX.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so the simulated checks live in
sim_numba_cuda_kernels.py and run in a child pytest with the simulator on; the simulator runs
Python, so it cannot catch a kernel that numba would fail to type, which the PTX compile does.
On a GPU, test_cuda.py runs the same kernels for real against the reference (``numba_cuda``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SIMULATED_TESTS = Path(__file__).with_name("sim_numba_cuda_kernels.py")


def _simulator_importable() -> bool:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    probe = "from numba import cuda; cuda.jit(lambda: None)"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


def test_numba_cuda_kernels_under_the_simulator():
    if not _simulator_importable():
        pytest.fail("numba's CUDA simulator does not import; the numba_cuda kernels go untested")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SIMULATED_TESTS)],
        env=env, capture_output=True, text=True, cwd=SIMULATED_TESTS.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


_COMPILE_TO_PTX = r"""
import types as pytypes
import numba.cuda.dispatcher as dispatcher
from numba import cuda, types as T

if getattr(cuda, "implementation", "") == "Built-in":
    # numba's built-in target types device functions for the current GPU's compute capability;
    # there is none here, so name one (the kernels are compiled for explicit targets below).
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(8, 0))

from gradkern.backends import _numba_cuda_kernels as k

i64, f64, i8 = T.int64, T.float64, T.int8
signatures = {
    "chunk_partials": (i64[:], i64[:], i8[:], i64[:], i64[:], i64, f64, f64[:], i64[:, :]),
    "fold_tensors": (i8[:], i64[:], i64, f64[:], i64[:, :], f64[:], f64[:], i64[:], i64[:]),
    "clip_chunks": (i64[:], i64[:], i8[:], i64[:], i64[:], f64[:], i64[:], f64[:], T.boolean),
}
for cc in ((8, 0), (9, 0)):
    for name, signature in signatures.items():
        ptx, _ = cuda.compile_ptx(getattr(k, name).py_func, signature, cc=cc)
        assert ".entry" in ptx and "atom." not in ptx, name
        print(name, cc, len(ptx))
"""


def test_numba_cuda_kernels_compile_to_ptx():
    result = subprocess.run([sys.executable, "-c", _COMPILE_TO_PTX], capture_output=True,
                            text=True, cwd=SIMULATED_TESTS.parent)
    if result.returncode and "NVVM" in result.stderr and "cannot be found" in result.stderr:
        pytest.skip("no libNVVM on this machine (CUDA toolkit absent); nothing to compile with")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("\n") == 6
