"""The numba-cuda kernels' logic, checked on any machine through numba's CUDA simulator.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so the checks live in
sim_numba_cuda_kernels.py and run in a child pytest with the simulator on. On a GPU,
test_cuda.py runs the same kernels for real against the reference (backend ``numba_cuda``).
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
