"""Shared cores: the C++ passes notice when other processes take the cores (and then keep small
passes on the calling thread), and give the same bits as on a quiet machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from gradkern import _native
from gradkern.tools.bench_contention import busy_processes
from helpers import required_backends

cpu = _native.cpu
if cpu is None and "cpp" in required_backends():
    pytest.fail(f"GRADKERN_REQUIRE names cpp, but {_native.CPU_ERROR}", pytrace=False)
pytestmark = pytest.mark.skipif(cpu is None, reason="the C++ CPU module is not built")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _spin(seconds: float) -> None:
    """Keep the calling thread runnable for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _verdict_after_spinning(seconds: float) -> bool:
    """cpu_shared() in a fresh thread (its own window) after it has spun for ``seconds``."""
    verdict = []

    def spin():
        cpu.cpu_shared()  # a thread's first reading starts its window
        _spin(seconds)
        verdict.append(cpu.cpu_shared())

    thread = threading.Thread(target=spin)
    thread.start()
    thread.join()
    return verdict[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from Linux's schedstat")
def test_the_gauge_is_measurable_on_linux():
    assert cpu.build_info()["cpu_share_measurable"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from Linux's schedstat")
def test_busy_processes_make_the_cores_shared_and_their_end_makes_them_quiet():
    with busy_processes(2 * _cores()):
        assert _verdict_after_spinning(0.25) is True
    assert _verdict_after_spinning(0.25) is False


# Enough small tensors that a quiet pass reduces them while it is still reading the table (over
# 512 rows), a tensor of many chunks, a bf16 one, and a clip that scales every tensor: on shared
# cores the table is read first and the passes run on the calling thread.
_SCRIPT = """
import hashlib, time, torch, gradkern as gk
from gradkern import _native
gen = torch.Generator().manual_seed(0)
shapes = [1_000] * 700 + [2_000_003, 65_536]
grads = [torch.randn(n, generator=gen) for n in shapes] + [torch.randn(300_001, generator=gen).bfloat16()]
params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
_native.cpu.cpu_shared()  # the calling thread's first reading starts its window
end = time.perf_counter() + 0.25
while time.perf_counter() < end:
    pass
shared = _native.cpu.cpu_shared()
for p, g in zip(params, grads):
    p.grad = g.clone()
for p in (2.0, 1.0, float("inf")):
    s = gk.grad_stats(params, p)
    print(float(s.total_norm.double()).hex(), [float(x).hex() for x in s.norm.double()])
gk.clip_grad_norm_(params, 0.5)
print(hashlib.sha256(b"".join(p.grad.view(torch.uint8).numpy().tobytes() for p in params)).hexdigest())
print("shared" if shared else "quiet")
"""


def _run(threads: str, cwd) -> tuple[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "GRADKERN_BACKEND": "cpp"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True).stdout
    results, verdict, _ = out.rsplit("\n", 2)
    return results, verdict


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from Linux's schedstat")
def test_shared_cores_give_the_bits_of_quiet_ones(tmp_path):
    quiet, verdict = _run("2", tmp_path)
    assert verdict == "quiet"
    single, _ = _run("1", tmp_path)
    with busy_processes(2 * _cores()):
        shared, verdict = _run("2", tmp_path)
    assert verdict == "shared"  # the passes above did take the shared-cores path
    assert shared == quiet == single


@pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                    reason="fork and Linux's schedstat")
def test_a_forked_child_measures_its_own_thread():
    # The child inherits its parent's open statistics file, which names the parent's thread:
    # the parent says "shared" and then waits for the child, so only the child's own
    # statistics can say "quiet" once it has stopped the busy processes and spun alone.
    with busy_processes(2 * _cores()) as busy:
        cpu.cpu_shared()
        _spin(0.25)
        assert cpu.cpu_shared() is True
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                for p in busy:
                    os.kill(p.pid, signal.SIGKILL)
                time.sleep(0.1)
                cpu.cpu_shared()
                _spin(0.25)
                code = 0 if cpu.cpu_shared() is False else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
