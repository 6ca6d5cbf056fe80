// fp16 and bf16 <-> fp32 conversions in portable C++ (no F16C), round-to-nearest-even.
//
// The build does not assume any instruction set beyond the compiler's default, so the half
// conversion is done with integer arithmetic. It is exact for every input, NaN and inf included.
//
// The functions are `static`: the per-ISA kernel file (cpp/cpu/isa/) is compiled with AVX2 and
// without, and an external inline copy built with AVX2 could otherwise be the one the linker
// keeps for the baseline code.
#pragma once

#include <cstdint>
#include <cstring>

namespace gradkern {

static inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

static inline float bf16_to_float(std::uint16_t h) { return bits_to_float(std::uint32_t{h} << 16); }

static inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

static inline float f16_to_float(std::uint16_t h) {
  // Place the half's exponent and mantissa in a float and rescale by 2^112: exact for normals
  // and subnormals alike; inf/NaN are patched.
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t em = h & 0x7fffu;
  float mag = bits_to_float(em << 13) * 0x1p112f;
  if (em >= 0x7c00u) mag = bits_to_float(0x7f800000u | (std::uint32_t{em & 0x3ffu} << 13));
  return bits_to_float(float_to_bits(mag) | sign);
}

static inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = float_to_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;       // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;      // rounds to inf (>= 65520)
  if (a < 0x38800000u) {                            // subnormal half or zero
    // Adding 0.5 (2^-1) aligns the half subnormal step (2^-24) with the float ulp of 0.5;
    // the FPU then rounds to nearest even for us.
    const float shifted = bits_to_float(a) + 0.5f;
    return sign | static_cast<std::uint16_t>(float_to_bits(shifted) - 0x3f000000u);
  }
  std::uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  return sign | static_cast<std::uint16_t>(r >> 13);
}

}  // namespace gradkern
