"""The fused-step rows of ``gradkern bench``: clipping inside a fused optimizer step.

One optimizer step over GPT-2-small shapes with ``torch.optim.AdamW(fused=True)``, the
gradients given (no forward or backward), four ways in turn within every repeat:

* torch: ``clip_grad_norm_(params, 1.0)`` then the step: a read pass for the norm, a
  read-write pass to scale, then the step;
* gradkern: the step under ``gk.Monitor(clip=1.0)``: the Monitor's one read pass, its clip
  coefficient folded into the step's ``grad_scale`` (the fused kernel applies it);
* the unclipped step alone, and one read pass over the gradients (torch's ``sum`` of each of
  64 Ki elements or more: nearly all the bytes, without the small tensors' per-call cost),
  which together are the goal for the clipped step.

With ``max_norm=1`` both clipped sides really clip (the gradients are standard normal, their
norm ~1e4); with ``max_norm=1e30`` neither has anything to clip. Each call starts from the same
gradients (restored between calls, outside the timing). A fused kernel given ``grad_scale``
writes the gradients back, divided: where the coefficient cannot be known without a host
read (a GPU), or is below 1, that write is part of the folded clip's cost.
"""

from __future__ import annotations

import torch
from torch import nn

from .monitor import Monitor
from .scenarios import gpt2_small_shapes

CLIPPING = 1.0  # the gradients' norm is ~1e4: both sides scale them
NOTHING_TO_CLIP = 1e30  # both sides compute the norm and leave the gradients alone


def fused_step_times(layers: int, device: str, repeats: int, best_times,
                     max_norm: float = CLIPPING) -> dict[str, float]:
    """Best seconds of each way of stepping (see the module docstring): ``torch_clip``,
    ``gradkern``, ``unclipped``, ``read``. ``best_times`` is the bench's interleaved timer."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
              for shape in gpt2_small_shapes(layers)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device)
    saved = [p.grad.clone() for p in params]

    def restore():
        for p, s in zip(params, saved):
            p.grad.copy_(s)

    torch_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    gk_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    monitor = Monitor(nn.ParameterList(params), gk_opt, clip=max_norm, detectors=None,
                      track_updates=False)

    def torch_clip():
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        torch_opt.step()

    large = [p.grad for p in params if p.numel() >= 1 << 16]  # the bytes; one call each
    try:
        times = best_times([torch_clip, gk_opt.step, torch_opt.step,
                            lambda: [g.sum() for g in large]], repeats, device, restore)
    finally:
        monitor.close()
    return dict(zip(("torch_clip", "gradkern", "unclipped", "read"), times))
