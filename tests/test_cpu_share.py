"""Shared cores: the C++ passes and the Numba backend notice when other processes take the cores
(and then keep small passes on the calling thread), and give the same bits as on a quiet
machine. The Numba backend reads the same statistics through its own twin of the C++ gauge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import gradkern as gk
from gradkern import _constants, _native
from gradkern.backends import _cpu_share
from gradkern.tools.bench_contention import busy_processes
from helpers import make_params, required_backends, use_backend

cpu = _native.cpu
if cpu is None and "cpp" in required_backends():
    pytest.fail(f"GRADKERN_REQUIRE names cpp, but {_native.CPU_ERROR}", pytrace=False)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="read from Linux's schedstat")


def _gauges():
    """Each gauge as (cpu_shared, cpu_share_measurable): the C++ one where it is built, and the
    Numba backend's twin."""
    twin = pytest.param((_cpu_share.cpu_shared, _cpu_share.cpu_share_measurable), id="twin")
    if cpu is None:
        return [twin]
    cpp = pytest.param((cpu.cpu_shared, lambda: cpu.build_info()["cpu_share_measurable"]),
                       id="cpp")
    return [cpp, twin]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _spin(seconds: float) -> None:
    """Keep the calling thread runnable for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _verdict_after_spinning(cpu_shared, seconds: float) -> bool:
    """cpu_shared() in a fresh thread (its own window) after it has spun for ``seconds``."""
    verdict = []

    def spin():
        cpu_shared()  # a thread's first reading starts its window
        _spin(seconds)
        verdict.append(cpu_shared())

    thread = threading.Thread(target=spin)
    thread.start()
    thread.join()
    return verdict[0]


@linux_only
@pytest.mark.parametrize("gauge", _gauges())
def test_the_gauge_is_measurable_on_linux(gauge):
    _, measurable = gauge
    assert measurable()


@linux_only
@pytest.mark.parametrize("gauge", _gauges())
def test_busy_processes_make_the_cores_shared_and_their_end_makes_them_quiet(gauge):
    cpu_shared, _ = gauge
    with busy_processes(2 * _cores()):
        assert _verdict_after_spinning(cpu_shared, 0.25) is True
    assert _verdict_after_spinning(cpu_shared, 0.25) is False


def test_the_twin_is_false_where_the_statistics_are_missing(monkeypatch):
    monkeypatch.setattr(_cpu_share, "_SCHEDSTAT", "/nonexistent/schedstat")
    gauge = _cpu_share._ThreadGauge()
    assert not gauge.measurable()
    assert gauge.shared() is False
    assert gauge.times() is None


def _times_around_spinning(seconds: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """thread_times() in a fresh thread before and after it spins for ``seconds``."""
    readings = []

    def spin():
        readings.append(_cpu_share.thread_times())
        _spin(seconds)
        readings.append(_cpu_share.thread_times())

    thread = threading.Thread(target=spin)
    thread.start()
    thread.join()
    return readings[0], readings[1]


@linux_only
def test_thread_times_see_a_thread_lose_its_core():
    # quiet: the spin ran on a core; with busy processes beside it, it also waited for one
    (run0, _), (run1, _) = _times_around_spinning(0.2)
    assert run1 - run0 >= 0.1e9
    with busy_processes(2 * _cores()):
        (run0, wait0), (run1, wait1) = _times_around_spinning(0.3)
    assert run1 > run0 and wait1 - wait0 >= 0.05e9


# Enough small tensors that a quiet C++ pass reduces them while it is still reading the table
# (over 512 rows), a tensor of many chunks, a bf16 one, and a clip that scales every tensor: on
# shared cores the table is read first and the passes run on the calling thread.
_SCRIPT = """
import hashlib, sys, time, torch, gradkern as gk
from gradkern import _native
from gradkern.backends import _cpu_share
cpu_shared = _native.cpu.cpu_shared if sys.argv[1] == "cpp" else _cpu_share.cpu_shared
gen = torch.Generator().manual_seed(0)
shapes = [1_000] * 700 + [2_000_003, 65_536]
grads = [torch.randn(n, generator=gen) for n in shapes] + [torch.randn(300_001, generator=gen).bfloat16()]
params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
cpu_shared()  # the calling thread's first reading starts its window
end = time.perf_counter() + 0.25
while time.perf_counter() < end:
    pass
shared = cpu_shared()
for p, g in zip(params, grads):
    p.grad = g.clone()
for p in (2.0, 1.0, float("inf")):
    s = gk.grad_stats(params, p)
    print(float(s.total_norm.double()).hex(), [float(x).hex() for x in s.norm.double()])
gk.clip_grad_norm_(params, 0.5)
print(hashlib.sha256(b"".join(p.grad.view(torch.uint8).numpy().tobytes() for p in params)).hexdigest())
print("shared" if shared else "quiet")
"""


def _run(backend: str, threads: str, cwd) -> tuple[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads,
           "GRADKERN_BACKEND": backend}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, backend], env=env, cwd=cwd,
                         capture_output=True, text=True, check=True).stdout
    results, verdict, _ = out.rsplit("\n", 2)
    return results, verdict


@pytest.fixture(params=["cpp", "numba"])
def backend(request):
    """Each CPU backend that has a shared-cores rule (skipped where it cannot run)."""
    yield from use_backend(request.param)


@linux_only
def test_shared_cores_give_the_bits_of_quiet_ones(backend, tmp_path):
    quiet, verdict = _run(backend, "2", tmp_path)
    assert verdict == "quiet"
    single, _ = _run(backend, "1", tmp_path)
    with busy_processes(2 * _cores()):
        shared, verdict = _run(backend, "2", tmp_path)
    assert verdict == "shared"  # the passes above did take the shared-cores path
    assert shared == quiet == single


class _TeamRecorder:
    """Stands in for the Numba kernels module: notes, at each call, Numba's thread count and
    the verdict the pass was sized by (the twin's verdict stands for at least 4 ms, so asking
    again right after the pass asked gives the same answer)."""

    def __init__(self, kernels):
        self._kernels = kernels
        self.calls: list[tuple[int, bool]] = []

    def __getattr__(self, name):
        kernel = getattr(self._kernels, name)

        def call(*args):
            import numba

            self.calls.append((numba.get_num_threads(), _cpu_share.cpu_shared()))
            return kernel(*args)

        return call


@pytest.fixture
def numba_calls():
    """The Numba backend, forced, with its kernels' calls recorded."""
    from gradkern.backends import backend_for

    for _ in use_backend("numba"):
        numba_backend = backend_for(torch.device("cpu"))
        recorder = _TeamRecorder(numba_backend._kernels)
        numba_backend._kernels = recorder
        try:
            yield recorder
        finally:
            numba_backend._kernels = recorder._kernels


@linux_only
def test_numba_passes_size_their_team_to_the_work_and_the_cores(numba_calls):
    import numba

    from gradkern.backends.numba_cpu import runs_alone

    if numba.get_num_threads() < 2:
        pytest.skip("Numba runs one thread here")
    team = numba.get_num_threads()
    small = make_params([(1_000,)] * 1_000)  # 16 work items: parallel only on quiet cores
    tiny = make_params([(1_000,)] * 100)  # 2 work items: always on the calling thread

    def run_in_a_thread(shared_expected: bool) -> None:
        """Each op once in a fresh thread that has spun first, so the twin's window is full:
        the first pass is sized by that verdict, and each later one by the verdict of its
        moment (which a window closing in between may have turned)."""
        numba_calls.calls.clear()
        seen = []

        def body():
            _cpu_share.cpu_shared()
            _spin(0.25)
            seen.append(_cpu_share.cpu_shared())
            gk.get_total_norm([p.grad for p in small])
            gk.clip_grad_norm_(small, 1e-3)  # two passes: the stats, then the write
            gk.get_total_norm([p.grad for p in tiny])
            seen.append(numba.get_num_threads())  # restored after each pass

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        assert seen == [shared_expected, team]
        calls = numba_calls.calls
        assert len(calls) == 4
        assert calls[0] == (1 if shared_expected else team, shared_expected)
        for threads, shared in calls[:3]:
            assert threads == (1 if shared else team)
        assert calls[3][0] == 1  # too small for a team either way

    run_in_a_thread(False)
    with busy_processes(2 * _cores()):
        run_in_a_thread(True)
        # 32M elements keep the team even then
        one_large = np.array([_constants.MIN_PARALLEL_RANGES_SHARED * _constants.CHUNK_ELEMS])
        assert runs_alone(one_large) is False


def _work_item_cases():
    """Element counts around the packing's edges, and random sets of every kind of tensor."""
    chunk = _constants.CHUNK_ELEMS
    cases = [[], [0], [0, 0], [1], [chunk], [chunk + 1], [chunk - 1, 1], [chunk - 1, 2],
             [chunk // 2] * 3, [chunk // 2 + 1] * 3, [1000] * 65, [1000] * 66, [1000] * 1000,
             [3 * chunk, 5, chunk - 5, 0, 7 * chunk + 3, 1], [40_000] * 800]
    rng = np.random.default_rng(7)
    for high in (10, 2_000, chunk, 3 * chunk, 50 * chunk):
        for _ in range(20):
            cases.append(list(rng.integers(0, high, size=rng.integers(0, 300))))
    return [np.array(c, dtype=np.int64) for c in cases]


@pytest.mark.skipif(cpu is None, reason="the C++ plan is the reference")
def test_numba_counts_the_work_items_of_the_cpp_chunk_plan(monkeypatch):
    for _ in use_backend("numba"):
        from gradkern.backends import numba_cpu
        from gradkern.backends._numba_kernels import work_items

        for numel in _work_item_cases():
            assert work_items(numel) == cpu.work_items(numel), numel.tolist()
        # Tensors just over half a chunk fill an item each, as in the C++ plan, so a pass over
        # as many of them as a threshold's items keeps the team, though they hold fewer whole
        # chunks' worth of elements.
        half = _constants.CHUNK_ELEMS // 2 + 1
        for shared, threshold in ((False, _constants.MIN_PARALLEL_RANGES),
                                  (True, _constants.MIN_PARALLEL_RANGES_SHARED)):
            monkeypatch.setattr(numba_cpu, "cpu_shared", lambda shared=shared: shared)
            assert numba_cpu.runs_alone(np.full(threshold, half)) is False
            assert numba_cpu.runs_alone(np.full(threshold - 1, half)) is True
    assert cpu.work_items(np.array([1000] * 1000)) == 16  # 65 tensors of 1,000 to an item
    with pytest.raises(ValueError, match="negative"):
        cpu.work_items(np.array([5, -1]))


@pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                    reason="fork and Linux's schedstat")
@pytest.mark.parametrize("gauge", _gauges())
def test_a_forked_child_measures_its_own_thread(gauge):
    cpu_shared, _ = gauge
    # The child inherits its parent's open statistics file, which names the parent's thread:
    # the parent says "shared" and then waits for the child, so only the child's own
    # statistics can say "quiet" once it has stopped the busy processes and spun alone.
    with busy_processes(2 * _cores()) as busy:
        cpu_shared()
        _spin(0.25)
        assert cpu_shared() is True
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                for p in busy:
                    os.kill(p.pid, signal.SIGKILL)
                time.sleep(0.1)
                cpu_shared()
                _spin(0.25)
                code = 0 if cpu_shared() is False else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
