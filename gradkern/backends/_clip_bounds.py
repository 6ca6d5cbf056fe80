"""The clamp bound of clip-by-value in each gradient dtype, for the Numba twins (the C++ and
CUDA kernels compute the same on their side)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._constants import DTYPE_CODES


def clip_bounds(clip_value: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """``clip_value`` in each dtype (indexed by dtype code), as the clamp kernels take it:
    (magnitude bits, value as float64, whether to clamp at all). fp16 and bf16 round through
    fp32, their compute type, as the C++ and CUDA kernels do (cpp/cpu/clip_in_place.cpp,
    cpp/cuda/clip_in_place.cu)."""
    bits = np.zeros(4, dtype=np.int64)
    values = np.full(4, math.inf)
    if math.isinf(clip_value):
        return bits, values, False
    as_f32 = torch.tensor(clip_value, dtype=torch.float32)
    rounded = {torch.float32: as_f32, torch.float64: torch.tensor(clip_value, dtype=torch.float64),
               torch.float16: as_f32.to(torch.float16), torch.bfloat16: as_f32.to(torch.bfloat16)}
    int_view = {torch.float32: torch.int32, torch.float64: torch.int64,
                torch.float16: torch.int16, torch.bfloat16: torch.int16}
    sign_clear = {torch.float32: 0x7FFFFFFF, torch.float64: 0x7FFFFFFFFFFFFFFF,
                  torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF}
    for dtype, code in DTYPE_CODES.items():
        r = rounded[dtype]
        bits[code] = int(r.view(int_view[dtype]).item()) & sign_clear[dtype]
        values[code] = abs(r.item())
    return bits, values, True
