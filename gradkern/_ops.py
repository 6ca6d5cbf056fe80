"""The kernels as ``torch.library`` custom ops, for code that runs inside ``torch.compile``.

Two ops, registered from Python (the extension is not built against libtorch):

* ``gradkern::tensor_stats(grads, norm_type)``: the fused read pass: per-tensor power sum,
  max |g| (float64), non-finite and zero counts (int64), one entry per gradient, on the first
  gradient's device;
* ``gradkern::clip_in_place(grads, coef, clip_value)``: scale by ``coef`` (one for all, or one
  per gradient; where < 1) then clamp to ``[-clip_value, clip_value]``, in place. Its mutation
  is declared, so inductor hands it the gradients themselves (no copies).

Each has a fake implementation (shapes and dtypes only) for tracing. Eager calls never go
through the dispatcher: it costs 20-120 us a call, more than a small clip itself. The public
functions take these ops only while compiling (see :mod:`gradkern._compiled`).
"""

# No ``from __future__ import annotations`` here: torch.library reads the annotations to infer
# each op's schema.

from typing import Optional

import torch

from . import _engine
from ._norms import parse_norm_type


@torch.library.custom_op("gradkern::tensor_stats", mutates_args=())
def tensor_stats(grads: list[torch.Tensor], norm_type: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = parse_norm_type(norm_type)
    _, raw, _ = _engine.tabulate_stats(list(grads), None, spec, counts=False)
    # outputs must not alias anything the caller holds: the engine's are fresh tensors
    return raw.power_sum, raw.max_abs, raw.nonfinite, raw.zeros


@tensor_stats.register_fake
def _(grads, norm_type):
    n, device = len(grads), grads[0].device
    wide = torch.empty(n, dtype=torch.float64, device=device)
    count = torch.empty(n, dtype=torch.int64, device=device)
    return wide, torch.empty_like(wide), count, torch.empty_like(count)


@torch.library.custom_op("gradkern::clip_in_place", mutates_args=("grads",))
def clip_in_place(grads: list[torch.Tensor], coef: Optional[torch.Tensor],
                  clip_value: float) -> None:
    _engine.clip_in_place(_engine.tabulate(list(grads)), coef, clip_value)


@clip_in_place.register_fake
def _(grads, coef, clip_value):
    return None
