"""gradkern: fused gradient statistics and clipping for PyTorch training loops.

Example:
    >>> import torch, gradkern as gk
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> total = gk.clip_(model.parameters(), max_norm=1.0)   # norm before clipping
    >>> stats = gk.grad_stats(model.named_parameters())       # per-tensor, on the device
"""

from .backends import backends, build_info, get_backend, set_backend
from .clipping import clip_, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
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
