"""The chunk plan on the Python side (the numba and CUDA backends build it here; the C++ CPU
backend builds the same one in cpp/cpu/chunk_plan.cpp)."""

from __future__ import annotations

import numpy as np

from ._constants import CHUNK_ELEMS


def chunk_plan(numel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor of each chunk, first element of each chunk, first chunk of each tensor).

    Chunks of tensor t are ``first_chunk[t]`` to ``first_chunk[t + 1]`` (exclusive); empty
    tensors have none.
    """
    per_tensor = (numel + CHUNK_ELEMS - 1) // CHUNK_ELEMS
    first_chunk = np.zeros(len(numel) + 1, dtype=np.int64)
    np.cumsum(per_tensor, out=first_chunk[1:])
    chunk_tensor = np.repeat(np.arange(len(numel), dtype=np.int64), per_tensor)
    chunk_begin = (np.arange(first_chunk[-1], dtype=np.int64) - first_chunk[chunk_tensor]) * CHUNK_ELEMS
    return chunk_tensor, chunk_begin, first_chunk
