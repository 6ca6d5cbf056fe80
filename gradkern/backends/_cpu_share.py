"""Whether the cores are shared, for the Numba backend: the twin of ``cpp/cpu/cpu_share.cpp``.

The Numba backend runs where the C++ module is not built, so it reads the same statistics with
the same rule itself: the calling thread's run time and run-queue wait from Linux's
``/proc/thread-self/schedstat`` (about 2 us from Python, at most once per window). The cores
count as shared when, over at least ``SHARE_WINDOW_NS`` of the thread's runnable time since the
previous verdict, it waited for a core more than ``1 / SHARED_RUN_PER_WAIT`` as long as it ran;
until that much has passed the previous verdict stands. Where the file is missing (another OS,
a kernel without ``CONFIG_SCHED_INFO``) the answer is always False.

Example:
    >>> from gradkern.backends._cpu_share import cpu_shared
    >>> cpu_shared()  # a quiet machine
    False
"""

from __future__ import annotations

import os
import threading
import time

from .._constants import SHARE_WINDOW_NS, SHARED_RUN_PER_WAIT

__all__ = ["cpu_shared", "cpu_share_measurable", "thread_times"]

_SCHEDSTAT = "/proc/thread-self/schedstat"


class _ThreadGauge:
    """One per thread: the file names the thread that opened it, and each thread has its own
    window. A fork's child inherits the descriptor, which still names the parent's thread, so the
    gauge reopens it in a process other than its own."""

    def __init__(self) -> None:
        self.fd = -1
        self._open()

    def _open(self) -> None:
        self.pid = os.getpid()
        self.verdict = False
        self.opened = time.monotonic_ns()
        try:
            self.fd = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1
            return
        first = self._read()
        if first is None:
            self._close()
        else:
            self.run, self.wait = first

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:  # its thread has ended
        self._close()

    def _read(self) -> tuple[int, int] | None:
        """``(ns on a cpu, ns waiting on a run queue)``; the file holds those and a count of
        timeslices."""
        try:
            run, wait = os.pread(self.fd, 96, 0).split()[:2]
            return int(run), int(wait)
        except (OSError, ValueError):
            return None

    def measurable(self) -> bool:
        return self.fd >= 0 and self.pid == os.getpid()

    def _in_this_process(self) -> None:
        if os.getpid() != self.pid:
            self._close()
            self._open()

    def times(self) -> tuple[int, int] | None:
        self._in_this_process()
        return self._read() if self.fd >= 0 else None

    def shared(self) -> bool:
        self._in_this_process()
        if self.fd < 0:
            return False
        # A thread is runnable for no longer than the wall time that passes, so the window
        # cannot be complete before SHARE_WINDOW_NS of it: no read needed.
        now = time.monotonic_ns()
        if now - self.opened < SHARE_WINDOW_NS:
            return self.verdict
        reading = self._read()
        if reading is None:
            return self.verdict
        run, wait = reading
        d_run, d_wait = run - self.run, wait - self.wait
        if d_run + d_wait >= SHARE_WINDOW_NS:
            self.verdict = SHARED_RUN_PER_WAIT * d_wait > d_run
            self.run, self.wait, self.opened = run, wait, now
        return self.verdict


_threads = threading.local()


def _gauge() -> _ThreadGauge:
    gauge = getattr(_threads, "gauge", None)
    if gauge is None:
        gauge = _threads.gauge = _ThreadGauge()
    return gauge


def cpu_shared() -> bool:
    """True when the calling thread, over its recent past, spent more than a third as long
    waiting for a core as running on one: other runnable threads outnumber the cores."""
    return _gauge().shared()


def cpu_share_measurable() -> bool:
    """Whether :func:`cpu_shared` can see anything on this host."""
    return _gauge().measurable()


def thread_times() -> tuple[int, int] | None:
    """The calling thread's ``(ns on a core, ns waiting for one)`` since it started, from the
    same statistics the verdict reads; None where they cannot be read. The difference of two
    readings taken around a call tells whether the thread lost its core during the call.

    Example:
        >>> before = thread_times()
        >>> sum(range(10**6))
        499999500000
        >>> after = thread_times()
        >>> after is None or after[0] >= before[0]
        True
    """
    return _gauge().times()
