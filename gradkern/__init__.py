"""gradkern: fused gradient statistics and clipping for PyTorch training loops.

Example:
    >>> import torch, gradkern as gk
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> total = gk.clip_(model.parameters(), max_norm=1.0)   # norm before clipping
    >>> stats = gk.grad_stats(model.named_parameters())       # per-tensor, on the device

Where each decision lives (a call goes down this list, once):

The API
    clipping        the drop-ins for torch's clipping functions, and ``clip_``
    stats           ``grad_stats`` and ``find_nonfinite``
    clippers        clippers with state (``ClipByNorm``, ``AGC``, ``AutoClip``, ``ZClip``...)
    monitor         ``Monitor``: hooks into the optimizer's step, the on-device ring of
                    statistics, the host pipeline that feeds detectors and sinks
    detectors       the rules that turn per-layer statistics into events
    events          what an event says, and the remedies it suggests
    layers          which parameters make up which layer
    sinks           where records and events go (JSON Lines, TensorBoard, W&B, MLflow)
    distributed     one gradient set split across ranks: packed collectives, DTensor meshes
    integrations    Lightning, transformers' Trainer, Accelerate
    tools           the ``gradkern`` command (bench, demo, report, info); never imported here

Underneath
    _params         reading a ``parameters`` argument as torch does
    _grad_set       one gradient set per call: plain, DTensor or sharded over a group; what
                    is read and what is written; its statistics, reductions and writes
    _norms          norm arithmetic: norm types, per-tensor and total norms, the clip
                    coefficient, result dtypes, the errors about norms
    _engine         validating and gathering tensors by device, running the backend
    _table          turning tensors into the flat table the kernels read
    _constants      the numbers shared with the kernels (``cpp/include/gradkern/constants.h``)
    _native         the one loader of the compiled modules
    _torch_layout   where torch keeps a tensor's metadata, probed on first use
    _chunks         the chunk plan of the Numba and CUDA backends
    _optimizer_step how the Monitor takes part in a plain, closure, or fused step
    _ops, _compiled the kernels as custom ops, and the graph paths ``torch.compile`` traces
    backends        ``cpp``, ``cuda``, ``numba``, ``numba_cuda`` and the ``torch`` reference
"""

from .backends import backends, build_info, get_backend, set_backend
from .clipping import (clip_, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_,
                       get_total_norm)
from .clippers import AGC, AutoClip, ClipByNorm, ClipByValue, Clipper, ZClip
from . import detectors, sinks
from .events import Event
from .monitor import Monitor
from .stats import GradStats, find_nonfinite, grad_stats

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "ClipByNorm",
    "ClipByValue",
    "Clipper",
    "Event",
    "GradStats",
    "Monitor",
    "ZClip",
    "backends",
    "build_info",
    "clip_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "detectors",
    "find_nonfinite",
    "get_backend",
    "get_total_norm",
    "grad_stats",
    "set_backend",
    "sinks",
]
