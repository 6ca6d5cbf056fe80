"""The numbers the kernels and the Python layer must agree on, in one place for Python.

Their C++ and CUDA home is ``cpp/include/gradkern/constants.h``. Every Python user (the table
readers, the norm arithmetic, the chunk plan, both Numba twins) takes them from here, and
``tests/test_constants.py`` checks that the compiled modules agree.
"""

from __future__ import annotations

from enum import IntEnum

import torch

# The dtype code of each tensor-table entry (``DType`` in constants.h).
F32, F64, F16, BF16 = 0, 1, 2, 3
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: F32,
    torch.float64: F64,
    torch.float16: F16,
    torch.bfloat16: BF16,
}
DTYPES_BY_CODE: tuple[torch.dtype, ...] = tuple(sorted(DTYPE_CODES, key=DTYPE_CODES.get))


class NormKind(IntEnum):
    """What the stats pass accumulates besides max |g| and the counts (``NormKind`` in
    constants.h)."""

    NONE = 0  # inf-norm and 0-"norm": answered by max |g| and the zero count
    L1 = 1
    L2 = 2
    MIN_ABS = 3  # the -inf "norm"
    POWER = 4  # any other p


# Elements per chunk of work (``kChunkElems``): results depend on this partition, never on the
# thread count, which makes them reproducible bit for bit.
CHUNK_ELEMS = 1 << 16

# When a pass goes parallel (``kMinParallelRanges`` and the rest): a pass over fewer work items of
# up to CHUNK_ELEMS elements than MIN_PARALLEL_RANGES runs on the calling thread; one under
# MIN_PARALLEL_RANGES_SHARED does too when the cores are shared, that is when the calling thread,
# over at least SHARE_WINDOW_NS of its runnable time, waited for a core more than
# 1/SHARED_RUN_PER_WAIT as long as it ran.
MIN_PARALLEL_RANGES = 4
MIN_PARALLEL_RANGES_SHARED = 512
SHARE_WINDOW_NS = 4_000_000
SHARED_RUN_PER_WAIT = 3
