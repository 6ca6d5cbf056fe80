"""The numba-cuda kernels run under numba's CUDA simulator, against float64 torch.

Not collected by default: numba must start in simulator mode, so test_numba_cuda_kernels.py runs
this file in a subprocess with NUMBA_ENABLE_CUDASIM=1. The simulator runs each GPU thread as a
Python thread and the kernels' loads and stores as ctypes reads and writes of host memory, so
the tensors here are CPU tensors and small: the chunk size and block size are shrunk (100
elements, 32 threads) so that chunk boundaries, block tails and multi-chunk folds are all hit.
"""

import math

import numpy as np
import pytest
import torch
from numba import cuda

from gradkern import _chunks
from gradkern._constants import DTYPE_CODES
from gradkern.backends import _numba_cuda_kernels as k
from gradkern.backends._clip_bounds import clip_bounds

assert k.SIMULATED, "run with NUMBA_ENABLE_CUDASIM=1"

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KINDS = {"none": (0, 0.0), "l1": (1, 1.0), "l2": (2, 2.0), "min_abs": (3, -math.inf),
         "power": (4, 3.0)}


@pytest.fixture(autouse=True)
def small_launch_geometry(monkeypatch):
    monkeypatch.setattr(k, "CHUNK_ELEMS", 100)
    monkeypatch.setattr(_chunks, "CHUNK_ELEMS", 100)
    monkeypatch.setattr(k, "THREADS", 32)


def table(tensors):
    addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    numel = np.array([t.numel() for t in tensors], dtype=np.int64)
    codes = np.array([DTYPE_CODES[t.dtype] for t in tensors], dtype=np.int8)
    return (addresses, numel, codes, *_chunks.chunk_plan(numel))


def run_stats(tensors, kind, p, blocks=3):
    addresses, numel, codes, chunk_tensor, chunk_begin, first_chunk = table(tensors)
    n_chunks = max(len(chunk_tensor), 1)
    part_acc, part_bits = np.zeros(n_chunks), np.zeros((4, n_chunks), dtype=np.int64)
    n = len(tensors)
    out = (np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
    if len(chunk_tensor):
        k.chunk_partials[blocks, k.THREADS](addresses, numel, codes, chunk_tensor, chunk_begin,
                                            kind, p, part_acc, part_bits)
    k.fold_tensors[(n + k.THREADS - 1) // k.THREADS, k.THREADS](
        codes, first_chunk, kind, part_acc, part_bits, *out)
    return out


def reference_stats(t, kind, p):
    a = t.double().abs()
    has_nan = bool(a.isnan().any())
    if kind == 1:
        power = a.sum()
    elif kind == 2:
        power = (a * a).sum()
    elif kind == 4:
        power = (a**p).sum()
    elif kind == 3:
        power = a.min() if a.numel() else torch.tensor(math.inf)
    else:
        power = torch.tensor(0.0)
    top = a.masked_fill(a.isnan(), 0.0).max() if a.numel() else torch.tensor(0.0)
    return (math.nan if has_nan else float(power), math.nan if has_nan else float(top),
            int((~a.isfinite()).sum()), int((a == 0).sum()))


def grads(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = (0, 1, 31, 100, 101, 257)
    out = [(torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype) for n in sizes]
    out[4][::7] = 0
    out[5][:20] = (torch.rand(20, generator=gen, dtype=torch.float64) * 1e-7).to(dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind_name", KINDS)
def test_stats_match_float64_torch(dtype, kind_name):
    kind, p = KINDS[kind_name]
    tensors = grads(dtype, seed=DTYPE_CODES[dtype])
    power, top, bad, zeros = run_stats(tensors, kind, p)
    for i, t in enumerate(tensors):
        want = reference_stats(t, kind, p)
        assert power[i] == pytest.approx(want[0], rel=1e-12, abs=0), (i, "power")
        assert top[i] == want[1], (i, "max")
        assert (bad[i], zeros[i]) == want[2:], i


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_where_placed(dtype):
    tensors = grads(dtype, seed=7)[1:]
    tensors[1][3] = math.inf
    tensors[2][99] = -math.inf
    tensors[3][0] = math.nan
    tensors[4][200] = math.nan
    tensors[4][201] = math.inf
    for kind, p in KINDS.values():
        power, top, bad, zeros = run_stats(tensors, kind, p)
        for i, t in enumerate(tensors):
            want = reference_stats(t, kind, p)
            assert power[i] == pytest.approx(want[0], rel=1e-12, abs=0, nan_ok=True), (i, kind)
            assert top[i] == pytest.approx(want[1], nan_ok=True), (i, kind)
            assert (bad[i], zeros[i]) == want[2:]


@cuda.jit
def decode_each(code, magnitudes, out):
    for i in range(magnitudes.shape[0]):  # one thread: the simulator is slow at barriers
        out[i] = k._decode(code, magnitudes[i])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_magnitude_bit_pattern_decodes_exactly(dtype):
    magnitudes = torch.arange(0x8000, dtype=torch.int64)
    out = np.zeros(0x8000)
    decode_each[1, 1](DTYPE_CODES[dtype], magnitudes.numpy(), out)
    want = magnitudes.to(torch.int16).view(dtype).double()
    assert torch.equal(torch.from_numpy(out).isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(torch.from_numpy(out)[finite], want[finite])


def run_clip(tensors, coef, clip_value):
    addresses, numel, codes, chunk_tensor, chunk_begin, _ = table(tensors)
    bits, values, clamp = clip_bounds(clip_value)
    k.clip_chunks[3, k.THREADS](addresses, numel, codes, chunk_tensor, chunk_begin,
                                np.asarray(coef, dtype=np.float64), bits, values, clamp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_then_clamp_matches_torch(dtype):
    tensors = grads(dtype, seed=11)
    tensors[3][4] = math.nan
    coefs = [0.5, 0.25, 1.0, 0.3, 2.0, math.nan]  # 1.0 and 2.0: left alone
    want = []
    for t, c in zip(tensors, coefs):
        w = t.clone()
        if not c >= 1.0:
            w.mul_(c)
        want.append(w.clamp_(-0.7, 0.7).where(~w.isnan(), w))
    run_clip(tensors, coefs, 0.7)
    for got, w in zip(tensors, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_only_writes_what_changes(dtype):
    tensors = grads(dtype, seed=13)
    tensors[2][0] = math.inf
    tensors[2][1] = -math.inf
    tensors[2][2] = math.nan
    want = [t.clamp(-0.1, 0.1).where(~t.isnan(), t) for t in tensors]
    run_clip(tensors, [1.0], 0.1)
    for got, w in zip(tensors, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0, equal_nan=True)


def test_one_global_coefficient_and_no_clamp():
    tensors = grads(torch.float32, seed=17)
    want = [t * np.float32(0.125) for t in tensors]
    run_clip(tensors, [0.125], math.inf)
    for got, w in zip(tensors, want):
        assert torch.equal(got, w)
