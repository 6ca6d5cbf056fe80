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

The same under ``torch.amp.GradScaler`` (``amp=True``), where torch's recipe unscales the
gradients first (a read-write pass) and the fused kernel is given ``grad_scale`` even
unclipped.

With ``max_norm=1`` both clipped sides really clip (the gradients are standard normal, their
norm ~1e4); with ``max_norm=1e30`` neither has anything to clip. Each call starts from the same
gradients (restored between calls, outside the timing). A fused kernel given ``grad_scale``
writes the gradients back, divided: where the coefficient cannot be known without a host
read (a GPU), or is below 1, that write is part of the folded clip's cost.
"""

from __future__ import annotations

import torch
from torch import nn

from gradkern import Monitor

from .scenarios import gpt2_small_shapes

CLIPPING = 1.0  # the gradients' norm is ~1e4: both sides scale them
NOTHING_TO_CLIP = 1e30  # both sides compute the norm and leave the gradients alone
AMP_SCALE = 2.0 ** 16  # GradScaler's initial scale


def fused_step_times(layers: int, device: str, repeats: int, best_times,
                     max_norm: float = CLIPPING, amp: bool = False) -> dict[str, float]:
    """Best seconds of each way of stepping (see the module docstring): ``torch_clip``,
    ``gradkern``, ``unclipped``, ``read``. ``best_times`` is the bench's interleaved timer.

    ``amp``: the gradients are scaled, and every step goes through a ``torch.amp.GradScaler``
    (its inf check included), as in fp16 mixed precision: torch's recipe is ``unscale_``, then
    ``clip_grad_norm_``, then ``scaler.step``; the unclipped step is ``scaler.step`` alone,
    which hands the fused kernel ``grad_scale``, so the write-back is part of it too."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
              for shape in gpt2_small_shapes(layers)]
    scale = AMP_SCALE if amp else 1.0
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * scale
    saved = [p.grad.clone() for p in params]

    def restore():
        for p, s in zip(params, saved):
            p.grad.copy_(s)

    torch_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    gk_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    scalers = {opt: torch.amp.GradScaler(device, init_scale=AMP_SCALE, growth_interval=10**9)
               for opt in (torch_opt, gk_opt)} if amp else {}
    for scaler in scalers.values():
        scaler.scale(torch.ones((), device=device))  # (a scaler makes its scale at first use)
    monitor = Monitor(nn.ParameterList(params), gk_opt, clip=max_norm, detectors=None,
                      track_updates=False, scaler=scalers.get(gk_opt))

    def step(opt):
        if amp:
            scalers[opt].step(opt)
            scalers[opt].update()
        else:
            opt.step()

    def torch_clip():
        if amp:
            scalers[torch_opt].unscale_(torch_opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        step(torch_opt)

    large = [p.grad for p in params if p.numel() >= 1 << 16]  # the bytes; one call each
    try:
        times = best_times([torch_clip, lambda: step(gk_opt), lambda: step(torch_opt),
                            lambda: [g.sum() for g in large]], repeats, device, restore)
    finally:
        monitor.close()
    return dict(zip(("torch_clip", "gradkern", "unclipped", "read"), times))
