"""The compiled-step row of ``gradkern bench``: ``torch.compile`` over a training step that ends
in a clip.

One function does the forward pass, the backward pass and ``clip_grad_norm_(params, 1.0)``,
compiled with the default backend (inductor); it is built twice, once with torch's clip and once
with gradkern's (which reaches the compiled graph through its custom ops), and the two run in
turn within every repeat. The model is a stack of 1,024-wide linear layers with GELU (8.4M
parameters, batch 64): small enough to compile in seconds on a CPU, large enough that the clip
is a real pass over the gradients. Compilation happens in the untimed first call.
"""

from __future__ import annotations

import torch
from torch import nn

import gradkern as gk


WIDTH, DEPTH, BATCH = 1024, 8, 64


def compiled_step_times(device: str, repeats: int, best_times) -> tuple[float, float, int]:
    """(torch's compiled step, gradkern's compiled step) in seconds, and the gradient bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH),
                                                              nn.GELU())]).to(device)
    params = list(model.parameters())
    x = torch.randn(BATCH, WIDTH, device=device)

    def step_with(clip_grad_norm_):
        def step():
            model(x).pow(2).mean().backward()
            return clip_grad_norm_(params, 1.0)
        return torch.compile(step)

    torch_step = step_with(torch.nn.utils.clip_grad_norm_)
    gradkern_step = step_with(gk.clip_grad_norm_)

    def zero():
        for p in params:
            p.grad = None

    t_torch, t_gk = best_times([torch_step, gradkern_step], repeats, device, zero)
    return t_torch, t_gk, sum(p.numel() * p.element_size() for p in params)
