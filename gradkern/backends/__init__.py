"""Backend discovery and dispatch.

Backends, best first for each device: ``cpp`` (compiled C++/OpenMP, CPU), ``cuda`` (compiled
CUDA kernels), ``numba`` (JIT fallback, CPU), ``numba_cuda`` (JIT fallback, CUDA), ``torch``
(pure-torch reference, any device).
A backend that is missing or broken is reported by :func:`backends`, never raised at import.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .base import Backend, RawStats

__all__ = ["Backend", "BackendInfo", "RawStats", "backends", "build_info", "set_backend",
           "get_backend", "backend_for"]

_ORDER = {"cpu": ("cpp", "numba", "torch"), "cuda": ("cuda", "numba_cuda", "torch")}
_NAMES = ("cpp", "cuda", "numba", "numba_cuda", "torch")


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`backends` says about one backend.

    Attributes:
        compiled: its code is present in this installation (extension built, package importable).
        usable: it can run on this machine now.
        reason: why it is not usable ('' when it is).
    """

    compiled: bool
    usable: bool
    reason: str


def _probe(name: str) -> tuple[BackendInfo, Backend | None]:
    if name == "torch":
        from .reference import TorchBackend

        return BackendInfo(True, True, ""), TorchBackend()
    if name == "cpp":
        from . import cpp

        if cpp.IMPORT_ERROR:
            return BackendInfo(False, False, cpp.IMPORT_ERROR), None
        return BackendInfo(True, True, ""), cpp.CppBackend()
    if name == "numba":
        try:
            from .numba_cpu import NumbaBackend

            return BackendInfo(True, True, ""), NumbaBackend()
        except Exception as exc:  # numba missing, or an llvmlite/numpy mismatch
            return BackendInfo(False, False, f"numba did not import: {exc}"), None
    if name == "cuda":
        from . import cuda

        if cuda.IMPORT_ERROR:
            return BackendInfo(False, False, cuda.IMPORT_ERROR), None
        info = cuda.runtime_info()
        if not cuda.KERNELS_READY:
            why = "the CUDA module is built without its kernels (rebuild gradkern)"
            return BackendInfo(True, False, why), None
        if info["device_count"] == 0:
            why = f"no CUDA device: {info['error'] or 'none found'}"
            return BackendInfo(True, False, why), None
        if not torch.cuda.is_available():
            why = "torch has no CUDA support here (CPU build of torch, or no driver)"
            return BackendInfo(True, False, why), None
        return BackendInfo(True, True, ""), cuda.CudaBackend()
    if name == "numba_cuda":
        return _probe_numba_cuda()
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(_NAMES)}")


def _probe_numba_cuda() -> tuple[BackendInfo, Backend | None]:
    try:
        from numba import cuda as numba_cuda
    except Exception as exc:  # numba missing, or its CUDA target broken
        return BackendInfo(False, False, f"numba.cuda did not import: {exc}"), None
    if not torch.cuda.is_available():
        why = "torch has no CUDA support here (CPU build of torch, or no driver)"
        return BackendInfo(True, False, why), None
    try:
        available = numba_cuda.is_available()
    except Exception as exc:  # a driver numba cannot load
        available, why = False, f"numba.cuda cannot reach the GPU: {exc}"
    else:
        why = "numba.cuda finds no usable GPU or driver (see numba -s)"
    if not available:
        return BackendInfo(True, False, why), None
    try:
        from .numba_cuda import NumbaCudaBackend

        backend = NumbaCudaBackend()
    except Exception as exc:  # e.g. an llvmlite that cannot lower the kernels' intrinsics
        return BackendInfo(True, False, f"numba-cuda kernels did not load: {exc}"), None
    why = numba_cuda_compile_error(numba_cuda)
    if why:
        return BackendInfo(True, False, why), None
    return BackendInfo(True, True, ""), backend


def numba_cuda_compile_error(numba_cuda) -> str:
    """Why ``numba_cuda`` cannot compile a kernel here ('' when it can), found by compiling a
    one-line kernel to PTX (well under a second, and the first real compile skips the part it
    shares). numba-cuda imports and finds the GPU without ever loading its lowering registries, so
    a release that does not match the installed numpy fails only then: numba-cuda 0.30.4 with
    numpy 2.5.2 raises AttributeError for ``np.row_stack`` at the first compile (seen on an H100)."""

    def touch(a):
        a[0] = 0.0

    from numba import types

    try:
        numba_cuda.compile_ptx(touch, (types.float64[:],))
    except Exception as exc:
        import numpy

        return (f"numba-cuda cannot compile kernels here ({type(exc).__name__}: {exc}); it may "
                f"not support numpy {numpy.__version__}")
    return ""


_probed: dict[str, tuple[BackendInfo, Backend | None]] = {}
_forced: str | None = None
_dispatch_cache: dict[str, Backend] = {}


def _get(name: str) -> tuple[BackendInfo, Backend | None]:
    if name not in _probed:
        _probed[name] = _probe(name)
    return _probed[name]


def backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is compiled in, usable, and why not.

    Example:
        >>> import gradkern as gk
        >>> gk.backends()["torch"].usable
        True
    """
    return {name: _get(name)[0] for name in _NAMES}


def _check_name(name: str) -> None:
    if name not in _NAMES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(_NAMES)}")


def set_backend(name: str | None) -> str | None:
    """Force a backend for every op (``None``: automatic choice); returns the previous choice.

    A forced backend serves the devices it supports; tensors on other devices keep the automatic
    choice. The environment variable ``GRADKERN_BACKEND`` sets the initial value.

    Raises:
        ValueError: for an unknown name. RuntimeError: for a backend that is not usable here.

    Example:
        >>> import gradkern as gk
        >>> previous = gk.set_backend("torch")
        >>> gk.set_backend(previous)
        'torch'
    """
    global _forced, _forced_by_env
    if name is not None:
        _check_name(name)
        info = _get(name)[0]
        if not info.usable:
            raise RuntimeError(f"backend {name!r} is not usable: {info.reason}")
    previous, _forced, _forced_by_env = _forced, name, False
    _dispatch_cache.clear()
    return previous


def get_backend() -> str | None:
    """The forced backend name, or None for the automatic choice."""
    return _forced


def backend_for(device: torch.device) -> Backend:
    """The backend that runs ops on tensors of ``device``."""
    key = device.type
    cached = _dispatch_cache.get(key)
    if cached is not None:
        return cached
    if _forced is not None and _forced_by_env and not _get(_forced)[0].usable:
        _warn_env_backend()
    order = _ORDER.get(key, ("torch",))
    if _forced is not None and (_forced in order or _forced == "torch"):
        info = _get(_forced)[0]
        if not info.usable:
            raise RuntimeError(f"the forced backend {_forced!r} is not usable: {info.reason}")
        order = (_forced,)
    for name in order:
        info, impl = _get(name)
        if info.usable and impl is not None:
            _dispatch_cache[key] = impl
            return impl
    raise RuntimeError(f"no usable backend for {key} tensors")  # unreachable: torch always works


def build_info(device: torch.device | str | None = None) -> dict:
    """What was compiled into this installation, and how tensor tables are read here.

    Keys: ``cpu_build`` (compiler, flags, OpenMP, SIMD levels of the C++ module; None when it
    is not built), ``cuda_build`` (CUDA runtime, architectures, devices; None when not built),
    ``table_reader`` (how a CPU tensor's table row is read: directly from torch's memory or
    through its getters, and why) and ``cuda_table_reader`` (the same for ``device``'s GPU,
    default the current one; None without a GPU). Finding out how rows are read probes torch
    with a few tensors, once per device.

    Example:
        >>> import gradkern as gk
        >>> sorted(gk.build_info())
        ['cpu_build', 'cuda_build', 'cuda_table_reader', 'table_reader']
    """
    from .. import _native, _table
    from .cuda import runtime_info

    cuda_device = None
    if torch.cuda.is_available() and _native.cpu is not None:
        cuda_device = torch.device(device if device is not None else "cuda")
        if cuda_device.type != "cuda":
            cuda_device = torch.device("cuda")
    return {
        "cpu_build": None if _native.cpu is None else dict(_native.cpu.build_info()),
        "cuda_build": runtime_info(),
        "table_reader": _table.reader_report(),
        "cuda_table_reader": None if cuda_device is None else _table.reader_report(cuda_device),
    }


_forced_by_env = False
_warned_env = False


def _warn_env_backend() -> None:
    """Once: GRADKERN_BACKEND names a backend that cannot run here. (Checked at the first op,
    not at import, where probing a CUDA backend would cost the import its speed.)"""
    global _warned_env
    if not _warned_env:
        _warned_env = True
        warnings.warn(f"GRADKERN_BACKEND={_forced} names a backend that is not usable here "
                      f"({_get(_forced)[0].reason}); ops on its devices raise, other devices "
                      "keep the automatic choice", RuntimeWarning, stacklevel=3)


def _init_from_env() -> None:
    global _forced, _forced_by_env
    name = os.environ.get("GRADKERN_BACKEND", "").strip() or None
    if name is not None:
        _check_name(name)  # a typo in the variable should not silently mean "automatic"
    _forced, _forced_by_env = name, name is not None


_init_from_env()
