"""numba-cuda twins of cpp/cuda/tensor_stats.cu and cpp/cuda/clip_in_place.cu.

The same plan as the compiled kernels: a persistent grid over the (tensor, chunk) work items,
one thread block per chunk at a time, a fixed-order tree inside the block, then one thread per
tensor that folds its chunk partials in chunk order. No float atomics, so results are bitwise
reproducible. Elements are read as magnitude bits (the pattern with the sign cleared): they
order like |x| as integers and every pattern above infinity's is a NaN, so one integer max gives
max |g| and says whether a NaN is present. Power sums accumulate in fp64 for every dtype.

Tensors arrive as raw device addresses in a table, so one launch covers every tensor whatever its
dtype. The loads and stores are four small LLVM intrinsics. Under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU with those intrinsics replaced by
ctypes reads and writes of host memory; the test suite uses that to check the kernels' logic on a
machine without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, types

from .._constants import BF16, CHUNK_ELEMS, F16, F32, F64, NormKind

# Plain ints, which Numba folds into the kernels as constants.
KIND_NONE, KIND_L1, KIND_L2, KIND_MIN_ABS, KIND_POWER = map(int, (
    NormKind.NONE, NormKind.L1, NormKind.L2, NormKind.MIN_ABS, NormKind.POWER))
THREADS = 256  # threads per block; the block tree below assumes a power of two
NO_MIN = (1 << 63) - 1  # identity of the min-magnitude fold (magnitudes never reach it)

# A magnitude shifted into a double's exponent and mantissa fields, times 2^(1023 - bias), is
# the value exactly, subnormals included.
_F32_SHIFT, _F32_SCALE = 29, 2.0**896
_F16_SHIFT, _F16_SCALE = 42, 2.0**1008
_BF16_SHIFT, _BF16_SCALE = 45, 2.0**896

SIMULATED = bool(getattr(config, "ENABLE_CUDASIM", 0))

if SIMULATED:  # pragma: no cover - exercised in a subprocess by tests/sim_numba_cuda_kernels.py
    import ctypes
    import struct

    # Zero-extended narrow loads, signed 64-bit ones: the int64 values the compiled kernels see.
    _CTYPES = {2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_int64}

    def _loader(width):
        kind = _CTYPES[width]
        return lambda address, index: int(kind.from_address(int(address) + width * int(index)).value)

    def _storer(width):
        kind = _CTYPES[width]

        def store(address, index, bits):
            bits = int(bits) & ((1 << (8 * width)) - 1)  # the low bits, as a truncating store
            if width == 8 and bits >= 1 << 63:
                bits -= 1 << 64
            kind.from_address(int(address) + width * int(index)).value = bits

        return store

    _load16, _load32, _load64 = _loader(2), _loader(4), _loader(8)
    _store16, _store32, _store64 = _storer(2), _storer(4), _storer(8)

    def _f64_from_bits(bits):
        return struct.unpack("<d", struct.pack("<Q", int(bits) & (2**64 - 1)))[0]

    def _bits_of_f64(value):
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]

    def _f32_from_bits(bits):
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def _bits_of_f32(value):
        return int(np.float32(value).view(np.uint32))

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    _GLOBAL = 1  # NVVM's global address space: plain ld.global / st.global, not generic ones

    def _loader(bits):
        @intrinsic
        def load(typingctx, address, index):
            """Element ``index`` of the ``bits``-wide array at ``address``, zero-extended."""
            if not isinstance(address, types.Integer) or not isinstance(index, types.Integer):
                return None

            def codegen(context, builder, signature, args):
                base = builder.inttoptr(args[0], ir.PointerType(ir.IntType(bits), _GLOBAL))
                value = builder.load(builder.gep(base, [args[1]]))
                return builder.zext(value, ir.IntType(64)) if bits < 64 else value

            return types.int64(address, index), codegen

        return load

    def _storer(bits):
        @intrinsic
        def store(typingctx, address, index, value):
            """Writes the low ``bits`` of ``value`` to element ``index`` at ``address``."""
            if not all(isinstance(a, types.Integer) for a in (address, index, value)):
                return None

            def codegen(context, builder, signature, args):
                base = builder.inttoptr(args[0], ir.PointerType(ir.IntType(bits), _GLOBAL))
                narrow = builder.trunc(args[2], ir.IntType(bits)) if bits < 64 else args[2]
                builder.store(narrow, builder.gep(base, [args[1]]))
                return context.get_dummy_value()

            return types.none(address, index, value), codegen

        return store

    def _bitcast(accepts, target, llvm_source, llvm_target, widen):
        @intrinsic
        def cast(typingctx, value):
            if not accepts(value):
                return None

            def codegen(context, builder, signature, args):
                arg = args[0]
                if llvm_source is not None:  # narrow an int64 to the float's width first
                    arg = builder.trunc(arg, llvm_source)
                out = builder.bitcast(arg, llvm_target)
                return builder.zext(out, ir.IntType(64)) if widen else out

            return target(value), codegen

        return cast

    _load16, _load32, _load64 = _loader(16), _loader(32), _loader(64)
    _store16, _store32, _store64 = _storer(16), _storer(32), _storer(64)

    def _is_int64(t):
        return isinstance(t, types.Integer) and t.bitwidth == 64

    _f64_from_bits = _bitcast(_is_int64, types.float64, None, ir.DoubleType(), False)
    _bits_of_f64 = _bitcast(lambda t: t == types.float64, types.int64, None, ir.IntType(64), False)
    _f32_from_bits = _bitcast(_is_int64, types.float32, ir.IntType(32), ir.FloatType(), False)
    _bits_of_f32 = _bitcast(lambda t: t == types.float32, types.int64, None, ir.IntType(32), True)


@cuda.jit(device=True, inline=True)
def _larger(a, b):
    return a if a > b else b


@cuda.jit(device=True, inline=True)
def _smaller(a, b):
    return a if a < b else b


@cuda.jit(device=True, inline=True)
def _format_bits(code):
    """(all bits but the sign, the infinity pattern) of a ``code`` element."""
    if code == F32:
        return 0x7FFFFFFF, 0x7F800000
    if code == F64:
        return 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000
    if code == F16:
        return 0x7FFF, 0x7C00
    return 0x7FFF, 0x7F80


@cuda.jit(device=True, inline=True)
def _load_bits(code, address, i):
    if code == F32:
        return _load32(address, i)
    if code == F64:
        return _load64(address, i)
    return _load16(address, i)


@cuda.jit(device=True, inline=True)
def _store_bits(code, address, i, bits):
    if code == F32:
        _store32(address, i, bits)
    elif code == F64:
        _store64(address, i, bits)
    else:
        _store16(address, i, bits)


@cuda.jit(device=True, inline=True)
def _decode(code, mag):
    """The float64 value of magnitude bits ``mag`` of a ``code`` element."""
    _, inf = _format_bits(code)
    if mag >= inf:
        return math.inf if mag == inf else math.nan
    if code == F32:
        return _f64_from_bits(mag << _F32_SHIFT) * _F32_SCALE
    if code == F64:
        return _f64_from_bits(mag)
    if code == F16:
        return _f64_from_bits(mag << _F16_SHIFT) * _F16_SCALE
    return _f64_from_bits(mag << _BF16_SHIFT) * _BF16_SCALE


@cuda.jit(device=True, inline=True)
def _power(kind, v, p):
    if kind == KIND_L1:
        return v
    if kind == KIND_L2:
        return v * v
    if kind == KIND_POWER:
        return v**p
    return 0.0


@cuda.jit(cache=True)
def chunk_partials(addresses, numels, codes, chunk_tensor, chunk_begin, kind, p,
                   part_acc, part_bits):
    """Pass 1: block b reduces chunks b, b + gridDim.x, ... into ``part_acc[c]`` (power sum)
    and ``part_bits[:, c]`` (max magnitude, min magnitude, non-finite count, zero count)."""
    s_acc = cuda.shared.array(THREADS, types.float64)
    s_top = cuda.shared.array(THREADS, types.int64)
    s_low = cuda.shared.array(THREADS, types.int64)
    s_bad = cuda.shared.array(THREADS, types.int64)
    s_zero = cuda.shared.array(THREADS, types.int64)
    tid = cuda.threadIdx.x
    c = cuda.blockIdx.x
    while c < chunk_tensor.shape[0]:
        t = chunk_tensor[c]
        begin = chunk_begin[c]
        end = _smaller(begin + CHUNK_ELEMS, numels[t])
        code = codes[t]
        address = addresses[t]
        mask, inf = _format_bits(code)
        acc = 0.0
        top = 0
        low = NO_MIN
        bad = 0
        zero = 0
        i = begin + tid
        while i < end:
            mag = _load_bits(code, address, i) & mask
            top = _larger(top, mag)
            low = _smaller(low, mag)
            bad += mag >= inf
            zero += mag == 0
            if kind != KIND_NONE and kind != KIND_MIN_ABS:
                acc += _power(kind, _decode(code, mag), p)
            i += THREADS
        s_acc[tid] = acc
        s_top[tid] = top
        s_low[tid] = low
        s_bad[tid] = bad
        s_zero[tid] = zero
        cuda.syncthreads()
        half = THREADS // 2
        while half > 0:
            if tid < half:
                s_acc[tid] += s_acc[tid + half]
                s_top[tid] = _larger(s_top[tid], s_top[tid + half])
                s_low[tid] = _smaller(s_low[tid], s_low[tid + half])
                s_bad[tid] += s_bad[tid + half]
                s_zero[tid] += s_zero[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            part_acc[c] = s_acc[0]
            part_bits[0, c] = s_top[0]
            part_bits[1, c] = s_low[0]
            part_bits[2, c] = s_bad[0]
            part_bits[3, c] = s_zero[0]
        cuda.syncthreads()  # the shared arrays are reused by this block's next chunk
        c += cuda.gridDim.x


@cuda.jit(cache=True)
def fold_tensors(codes, first_chunk, kind, part_acc, part_bits,
                 out_power, out_max, out_nonfinite, out_zeros):
    """Pass 2: thread t folds tensor t's chunk partials in chunk order."""
    t = cuda.grid(1)
    if t >= codes.shape[0]:
        return
    acc = 0.0
    top = 0
    low = NO_MIN
    bad = 0
    zero = 0
    for c in range(first_chunk[t], first_chunk[t + 1]):
        acc += part_acc[c]
        top = _larger(top, part_bits[0, c])
        low = _smaller(low, part_bits[1, c])
        bad += part_bits[2, c]
        zero += part_bits[3, c]
    code = codes[t]
    has_nan = top > _format_bits(code)[1]
    power = acc
    if kind == KIND_MIN_ABS:
        power = math.inf if low == NO_MIN else _decode(code, low)
    elif kind == KIND_NONE:
        power = 0.0
    out_power[t] = math.nan if has_nan else power
    out_max[t] = math.nan if has_nan else _decode(code, top)
    out_nonfinite[t] = bad
    out_zeros[t] = zero


# ---- clip ---------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _float_to_bf16_bits(f):
    """Round a float32 to bf16 bits, to nearest even (NaN stays a quiet NaN)."""
    u = _bits_of_f32(f)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 0x40) & 0xFFFF
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


@cuda.jit(device=True, inline=True)
def _float_to_half_bits(f):
    """Round a float32 to fp16 bits, to nearest even (overflow to inf, subnormals kept)."""
    u = _bits_of_f32(f)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:
        return sign | 0x7C00
    if a < 0x38800000:  # fp16 subnormal: let the float adder round it
        shifted = _f32_from_bits(a) + np.float32(0.5)
        return sign | (_bits_of_f32(shifted) - 0x3F000000)
    # rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even
    r = a - 0x38000000 + 0xFFF + ((a >> 13) & 1)
    return sign | (r >> 13)


@cuda.jit(device=True, inline=True)
def _scale_clamp(code, address, i, k, bound):
    """x[i] = clamp(x[i] * k, -bound, bound) computed in the dtype's compute type; NaN stays."""
    if code == F64:
        v = _f64_from_bits(_load64(address, i)) * k
        v = bound if v > bound else v
        v = -bound if v < -bound else v
        _store64(address, i, _bits_of_f64(v))
        return
    c = np.float32(bound)
    if code == F32:
        v32 = _f32_from_bits(_load32(address, i)) * np.float32(k)
    else:
        bits = _load16(address, i)
        negative = bits & 0x8000
        m = _decode(code, bits & 0x7FFF)
        v32 = np.float32(-m if negative else m) * np.float32(k)
    v32 = c if v32 > c else v32
    v32 = -c if v32 < -c else v32
    if code == F32:
        _store32(address, i, _bits_of_f32(v32))
    elif code == F16:
        _store16(address, i, _float_to_half_bits(v32))
    else:
        _store16(address, i, _float_to_bf16_bits(v32))


@cuda.jit(cache=True)
def clip_chunks(addresses, numels, codes, chunk_tensor, chunk_begin, coef, bound_bits,
                bound_value, clamp):
    """Scale (where the coefficient is not >= 1) then clamp, chunk by chunk, in place.

    ``coef`` holds one coefficient for all tensors or one per tensor, in device memory: a chunk
    whose coefficient is >= 1 and that needs no clamp returns before it reads anything.
    ``bound_bits[code]`` / ``bound_value[code]``: the clamp bound in each dtype. Clamping alone
    compares magnitude bits and writes only the elements that change; NaN stays NaN.
    """
    tid = cuda.threadIdx.x
    c = cuda.blockIdx.x
    while c < chunk_tensor.shape[0]:
        t = chunk_tensor[c]
        k = coef[0] if coef.shape[0] == 1 else coef[t]
        scale = not (k >= 1.0)  # a NaN coefficient scales, poisoning the tensor as torch does
        if scale or clamp:
            begin = chunk_begin[c]
            end = _smaller(begin + CHUNK_ELEMS, numels[t])
            code = codes[t]
            address = addresses[t]
            mask, inf = _format_bits(code)
            bound = bound_bits[code]
            i = begin + tid
            while i < end:
                if scale:
                    _scale_clamp(code, address, i, k, bound_value[code])
                else:
                    bits = _load_bits(code, address, i)
                    mag = bits & mask
                    if mag > bound and mag <= inf:  # +-inf clamps too; NaN stays
                        _store_bits(code, address, i, (bits ^ mag) | bound)
                i += THREADS
        c += cuda.gridDim.x
