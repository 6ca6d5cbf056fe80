"""The compiled modules, loaded in one place.

``gradkern._cpu`` (the C++ CPU kernels and the C table readers) loads with the package: it is
small and every call uses it. ``gradkern._cuda`` loads the first time a CUDA backend is probed.
A module that is missing or broken is None here, with the reason kept for
:func:`gradkern.backends`: ``import gradkern`` never fails for it, and every op still has the
Numba and torch backends.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"gradkern.{name}"), None
    except ImportError as exc:
        return None, f"gradkern.{name} did not import: {exc}"


cpu, CPU_ERROR = _load("_cpu")

_cuda: tuple[ModuleType | None, str | None] | None = None


def cuda() -> tuple[ModuleType | None, str | None]:
    """``(module, error)`` for ``gradkern._cuda``, imported on the first call."""
    global _cuda
    if _cuda is None:
        _cuda = _load("_cuda")
    return _cuda
