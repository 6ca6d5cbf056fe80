"""Numba twins of cpp/cpu/tensor_stats.cpp, cpp/cpu/isa/fast_kernels.cpp,
cpp/cpu/clip_in_place.cpp and the work-item count of cpp/cpu/chunk_plan.cpp.

Same chunk plan and fp64 partials as the C++ kernels, chunks folded in order, so results do
not depend on the thread count. As in C++, the common kinds (p = 1, 2, inf, 0) of finite
chunks take a fast loop over the magnitude bits (|x| with the sign cleared: one integer max
gives max |g| and flags NaN/inf); that loop lets LLVM split the fp64 sum into vector lanes
(``fastmath={"reassoc"}``) and widens every element to fp64, where the C++ loop adds fp32,
fp16 and bf16 terms in short fp32 runs first: the two agree to the C++ loop's error bound
(4.8e-7), not bit for bit. Other kinds and chunks with NaN/inf take the exact 16-lane loop.
Tensors arrive as raw addresses, as in C++; fp16/bf16 are read through their bit patterns.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from .._constants import BF16, CHUNK_ELEMS, F16, F32, F64, NormKind

# Plain ints, which Numba folds into the kernels as constants.
KIND_NONE, KIND_L1, KIND_L2, KIND_MIN_ABS, KIND_POWER = map(int, (
    NormKind.NONE, NormKind.L1, NormKind.L2, NormKind.MIN_ABS, NormKind.POWER))


@intrinsic
def _as_pointer(typingctx, address):
    """An integer address as a void*, so that carray can view the memory behind it."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

    return types.voidptr(address), codegen


def _bitcast(source, target, llvm_target):
    """An intrinsic that reinterprets a ``source`` value's bits as ``target`` (same width)."""

    @intrinsic
    def cast(typingctx, value):
        if value != source:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_target)

        return target(value), codegen

    return cast


_f32_bits = _bitcast(types.float32, types.uint32, ir.IntType(32))
_bits_f32 = _bitcast(types.uint32, types.float32, ir.FloatType())
_bits_f64 = _bitcast(types.uint64, types.float64, ir.DoubleType())


def _half_to_float_table() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


def _bf16_to_float_table() -> np.ndarray:
    return (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)


HALF_TABLE = _half_to_float_table()
BF16_TABLE = _bf16_to_float_table()


@njit(cache=True, inline="always")
def _float_to_bf16(f):
    u = _f32_bits(np.float32(f))
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@njit(cache=True, inline="always")
def _float_to_half(f):
    u = _f32_bits(np.float32(f))
    sign = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint16(0x7E00))
    if a >= np.uint32(0x477FF000):
        return np.uint16(sign | np.uint16(0x7C00))
    if a < np.uint32(0x38800000):
        shifted = _bits_f32(np.uint32(a)) + np.float32(0.5)
        return np.uint16(sign | np.uint16(_f32_bits(shifted) - np.uint32(0x3F000000)))
    r = a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & np.uint32(1))
    return np.uint16(sign | np.uint16(r >> np.uint32(13)))


@njit(cache=True, inline="always")
def _accumulate(acc, a, kind, p):
    if kind == KIND_L1:
        return acc + a
    if kind == KIND_L2:
        return acc + a * a
    if kind == KIND_POWER:
        return acc + a**p
    if kind == KIND_MIN_ABS:
        return a if a < acc else acc
    return acc


def _abs_at(x, table, i):
    """|x[i]| as float64; uint16 arrays hold fp16/bf16 bits, decoded through ``table``."""


@overload(_abs_at, inline="always")
def _abs_at_impl(x, table, i):
    if x.dtype == types.uint16:
        return lambda x, table, i: np.float64(abs(table[x[i]]))
    return lambda x, table, i: np.float64(abs(x[i]))


@njit(cache=True)
def _reduce(x, table, kind, p, max_finite):
    """One chunk. ``x`` is a float32/float64 array, or uint16 bits read through ``table``.

    Element i + j of each block of 16 goes to power-sum lane j, as in the C++ kernel; max |g| and
    the counts are exact whatever the order.
    """
    n = x.shape[0]
    identity = np.inf if kind == KIND_MIN_ABS else 0.0
    lanes = np.full(16, identity)
    max_abs = 0.0
    nonfinite = 0
    zeros = 0
    nans = 0
    for i in range(0, n + 15 - (n + 15) % 16, 16):
        for j in range(16):
            if i + j < n:
                a = _abs_at(x, table, i + j)
                lanes[j] = _accumulate(lanes[j], a, kind, p)
                max_abs = a if a > max_abs else max_abs
                nonfinite += not (a <= max_finite)
                zeros += a == 0.0
                nans += a != a
    total = identity
    for j in range(16):
        if kind == KIND_MIN_ABS:
            total = lanes[j] if lanes[j] < total else total
        else:
            total += lanes[j]
    return total, max_abs, nonfinite, zeros, nans > 0


# ---- the fast loop: finite chunks, kinds none / l1 / l2 ------------------------------------
# Each returns (power sum, max magnitude bits, zero count); the caller checks the bits against
# the format's infinity pattern and decodes max |g| from them. The zero count stays uint32 at
# every step: left to Numba's integer typing it widens to int64, and the vectorized loop then
# counts in 4-wide int64 lanes (64 Ki fp32 in L2: 1.8 G elements/s per thread against 2.4).

_REASSOC = {"reassoc"}  # only reassociation: no FMA contraction, no NaN/inf assumptions


@njit(cache=True, fastmath=_REASSOC)
def _fast_f32(u, kind):
    top = np.uint32(0)
    zeros = np.uint32(0)  # a chunk holds at most 2^16 elements
    s = 0.0
    for i in range(u.shape[0]):
        m = np.uint32(u[i] & np.uint32(0x7FFFFFFF))  # numba widens small ints; narrow back
        top = max(top, m)
        zeros = np.uint32(zeros + np.uint32(m == 0))
        v = np.float64(_bits_f32(m))
        if kind == KIND_L2:
            s += v * v
        elif kind == KIND_L1:
            s += v
    return s, np.float64(_bits_f32(top)), top >= np.uint32(0x7F800000), np.int64(zeros)


@njit(cache=True, fastmath=_REASSOC)
def _fast_f64(u, kind):
    top = np.uint64(0)
    zeros = np.uint32(0)  # a chunk holds at most 2^16 elements
    s = 0.0
    for i in range(u.shape[0]):
        m = np.uint64(u[i] & np.uint64(0x7FFFFFFFFFFFFFFF))
        top = max(top, m)
        zeros = np.uint32(zeros + np.uint32(m == 0))
        v = _bits_f64(m)
        if kind == KIND_L2:
            s += v * v
        elif kind == KIND_L1:
            s += v
    return s, _bits_f64(top), top >= np.uint64(0x7FF0000000000000), np.int64(zeros)


@njit(cache=True, fastmath=_REASSOC)
def _fast_half(u, kind, is_bf16):
    """fp16 magnitudes become floats exactly as exponent+mantissa placed in a float times
    2^112 (subnormals included); bf16 magnitudes are the top half of a float."""
    top = np.uint32(0)
    zeros = np.uint32(0)  # a chunk holds at most 2^16 elements
    s = 0.0
    shift = np.uint32(16) if is_bf16 else np.uint32(13)
    scale = np.float32(1.0) if is_bf16 else np.float32(2.0**112)
    for i in range(u.shape[0]):
        m = np.uint32(u[i] & np.uint16(0x7FFF))
        top = max(top, m)
        zeros = np.uint32(zeros + np.uint32(m == 0))
        v = np.float64(_bits_f32(np.uint32(m << shift)) * scale)
        if kind == KIND_L2:
            s += v * v
        elif kind == KIND_L1:
            s += v
    inf_bits = np.uint32(0x7F80) if is_bf16 else np.uint32(0x7C00)
    top_value = np.float64(_bits_f32(np.uint32(top << shift)) * scale)
    return s, top_value, top >= inf_bits, np.int64(zeros)


@njit(cache=True)
def _reduce_chunk(address, code, n, kind, p):
    """(power sum, max |g|, non-finite count, zero count, has NaN) of one chunk."""
    fast = kind == KIND_NONE or kind == KIND_L1 or kind == KIND_L2
    if code == F32:
        if fast:
            s, mx, nonfinite, zeros = _fast_f32(carray(_as_pointer(address), (n,), np.uint32), kind)
            if not nonfinite:
                return s, mx, 0, zeros, False
        x32 = carray(_as_pointer(address), (n,), np.float32)
        return _reduce(x32, HALF_TABLE, kind, p, np.float32(3.4028234663852886e38))
    if code == F64:
        if fast:
            s, mx, nonfinite, zeros = _fast_f64(carray(_as_pointer(address), (n,), np.uint64), kind)
            if not nonfinite:
                return s, mx, 0, zeros, False
        x64 = carray(_as_pointer(address), (n,), np.float64)
        return _reduce(x64, HALF_TABLE, kind, p, np.float64(1.7976931348623157e308))
    x16 = carray(_as_pointer(address), (n,), np.uint16)
    if fast:
        s, mx, nonfinite, zeros = _fast_half(x16, kind, code == BF16)
        if not nonfinite:
            return s, mx, 0, zeros, False
    tbl = HALF_TABLE if code == F16 else BF16_TABLE
    return _reduce(x16, tbl, kind, p, np.float32(3.4028234663852886e38))


@njit(cache=True)
def work_items(numels):
    """How many work items the C++ chunk plan packs these tensors into: their chunks in order,
    a new item wherever the next chunk would take the current one past CHUNK_ELEMS elements
    (so a full chunk is an item of its own, and tiny tensors share one). The passes count
    these to decide whether a team is worth waking (``numba_cpu.runs_alone``)."""
    items = 0
    in_item = 0
    for t in range(numels.size):
        left = numels[t]
        while left > 0:
            n = min(left, CHUNK_ELEMS)
            if in_item > 0 and in_item + n > CHUNK_ELEMS:
                items += 1
                in_item = 0
            in_item += n
            left -= n
    return items + 1 if in_item > 0 else items


@njit(parallel=True, cache=True)
def tensor_stats(addresses, numels, codes, chunk_tensor, chunk_begin, first_chunk, kind, p,
                 out_power, out_max, out_nonfinite, out_zeros):
    n_chunks = chunk_tensor.shape[0]
    c_power = np.empty(n_chunks)
    c_max = np.empty(n_chunks)
    c_nonfinite = np.empty(n_chunks, dtype=np.int64)
    c_zeros = np.empty(n_chunks, dtype=np.int64)
    c_nan = np.empty(n_chunks, dtype=np.bool_)
    chunk = CHUNK_ELEMS
    for c in prange(n_chunks):
        t = chunk_tensor[c]
        b = chunk_begin[c]
        n = min(chunk, numels[t] - b)
        code = codes[t]
        size = 8 if code == F64 else (4 if code == F32 else 2)
        r = _reduce_chunk(addresses[t] + size * b, code, n, kind, p)
        c_power[c], c_max[c], c_nonfinite[c], c_zeros[c], c_nan[c] = r
    for t in range(numels.shape[0]):
        acc = np.inf if kind == KIND_MIN_ABS else 0.0
        mx = 0.0
        nf = 0
        nz = 0
        nan = False
        for c in range(first_chunk[t], first_chunk[t + 1]):
            if kind == KIND_MIN_ABS:
                acc = min(acc, c_power[c])
            else:
                acc += c_power[c]
            mx = max(mx, c_max[c])
            nf += c_nonfinite[c]
            nz += c_zeros[c]
            nan = nan or c_nan[c]
        out_power[t] = np.nan if nan else acc
        out_max[t] = np.nan if nan else mx
        out_nonfinite[t] = nf
        out_zeros[t] = nz


@njit(cache=True)
def _clip_float(x, coef, c, scale):
    if scale:
        k = x.dtype.type(coef)
        for i in range(x.shape[0]):
            v = x[i] * k
            x[i] = min(max(v, -c), c) if v == v else v
    else:
        for i in range(x.shape[0]):
            v = x[i]
            if v > c:
                x[i] = c
            elif v < -c:
                x[i] = -c


@njit(cache=True)
def _clip_bits(x, table, is_bf16, coef, c, scale):
    k = np.float32(coef)
    hi = _float_to_bf16(c) if is_bf16 else _float_to_half(c)
    lo = _float_to_bf16(-c) if is_bf16 else _float_to_half(-c)
    for i in range(x.shape[0]):
        v = table[x[i]]
        if scale:
            v = v * k
            if v > c:
                v = c
            elif v < -c:
                v = -c
            x[i] = _float_to_bf16(v) if is_bf16 else _float_to_half(v)
        elif v > c:
            x[i] = hi
        elif v < -c:
            x[i] = lo


@njit(parallel=True, cache=True)
def clip_in_place(addresses, numels, codes, chunk_tensor, chunk_begin, coef, clip_value):
    """``clip_value`` must already be rounded to each dtype by the caller (see numba_cpu)."""
    chunk = CHUNK_ELEMS
    for c in prange(chunk_tensor.shape[0]):
        t = chunk_tensor[c]
        b = chunk_begin[c]
        n = min(chunk, numels[t] - b)
        k = coef[0] if coef.shape[0] == 1 else coef[t]
        scale = not (k >= 1.0)
        code = codes[t]
        bound = clip_value[code]
        if not scale and bound == np.inf:
            continue
        if code == F32:
            x32 = carray(_as_pointer(addresses[t] + 4 * b), (n,), np.float32)
            _clip_float(x32, k, np.float32(bound), scale)
        elif code == F64:
            x64 = carray(_as_pointer(addresses[t] + 8 * b), (n,), np.float64)
            _clip_float(x64, k, bound, scale)
        else:
            x16 = carray(_as_pointer(addresses[t] + 2 * b), (n,), np.uint16)
            tbl = HALF_TABLE if code == F16 else BF16_TABLE
            _clip_bits(x16, tbl, code == BF16, k, np.float32(bound), scale)
