// Device-side views of the four dtypes as bit patterns, shared by the CUDA kernels.
//
// As on the CPU, the kernels read magnitude bits (the pattern with the sign cleared): they order
// like |x| as unsigned integers, and every pattern above the infinity pattern is a NaN, so one
// integer max gives max |g| and says whether NaN is present.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gradkern/tensor_table.h"

namespace gradkern::cuda {

template <DType D>
struct Format;

template <>
struct Format<DType::f32> {
  using bits_t = std::uint32_t;
  static constexpr std::uint64_t kMask = 0x7fffffffu, kInf = 0x7f800000u;
  __device__ static double value(std::uint64_t mag) { return __uint_as_float(static_cast<unsigned>(mag)); }
  __device__ static float load(bits_t b) { return __uint_as_float(b); }
  __device__ static bits_t store(float v) { return __float_as_uint(v); }
  using compute = float;
};

template <>
struct Format<DType::f64> {
  using bits_t = std::uint64_t;
  static constexpr std::uint64_t kMask = 0x7fffffffffffffffull, kInf = 0x7ff0000000000000ull;
  __device__ static double value(std::uint64_t mag) { return __longlong_as_double(static_cast<long long>(mag)); }
  __device__ static double load(bits_t b) { return __longlong_as_double(static_cast<long long>(b)); }
  __device__ static bits_t store(double v) { return static_cast<bits_t>(__double_as_longlong(v)); }
  using compute = double;
};

template <>
struct Format<DType::bf16> {
  using bits_t = std::uint16_t;
  static constexpr std::uint64_t kMask = 0x7fffu, kInf = 0x7f80u;
  __device__ static double value(std::uint64_t mag) { return __uint_as_float(static_cast<unsigned>(mag) << 16); }
  __device__ static float load(bits_t b) { return __uint_as_float(static_cast<unsigned>(b) << 16); }
  __device__ static bits_t store(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  using compute = float;
};

template <>
struct Format<DType::f16> {
  using bits_t = std::uint16_t;
  static constexpr std::uint64_t kMask = 0x7fffu, kInf = 0x7c00u;
  __device__ static double value(std::uint64_t mag) {
    if (mag >= kInf) return mag == kInf ? __longlong_as_double(0x7ff0000000000000ll) : __longlong_as_double(0x7ff8000000000000ll);
    // exponent and mantissa placed in a float and rescaled by 2^112: exact, subnormals included
    return __uint_as_float(static_cast<unsigned>(mag) << 13) * 0x1p112f;
  }
  __device__ static float load(bits_t b) { return __half2float(__ushort_as_half(b)); }
  __device__ static bits_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
  using compute = float;
};

// Calls fn(Format<D>{}) for the dtype code (device side).
template <class Fn>
__device__ void with_format(std::int8_t code, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::f32: fn(Format<DType::f32>{}); break;
    case DType::f64: fn(Format<DType::f64>{}); break;
    case DType::f16: fn(Format<DType::f16>{}); break;
    case DType::bf16: fn(Format<DType::bf16>{}); break;
  }
}

}  // namespace gradkern::cuda
