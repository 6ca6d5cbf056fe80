"""The CUDA backend's import guard: gradkern._cuda, built from cpp/cuda/ when nvcc was found.

The module is compiled and imported here so that a broken CUDA build is reported by
``gk.backends()`` instead of failing ``import gradkern``. Its kernels come with the CUDA issue;
until then CUDA tensors take the torch backend.
"""

from __future__ import annotations

try:
    from .. import _cuda
except ImportError as exc:
    _cuda = None
    IMPORT_ERROR: str | None = f"gradkern._cuda is not in this build ({exc})"
else:
    IMPORT_ERROR = None

KERNELS_READY = False  # flips when cpp/cuda/ carries the multi-tensor kernels


def runtime_info() -> dict | None:
    """Build and run-time facts of the CUDA module, or None if it is not compiled in."""
    return None if _cuda is None else dict(_cuda.runtime_info())
