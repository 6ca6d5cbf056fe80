// How each storage dtype is read as a compute value and written back.
//
// fp16/bf16/fp32 are computed in fp32 (every fp16/bf16 value is exact in fp32); fp64 in fp64.
#pragma once

#include <cstdint>

#include "gradkern/low_precision.h"
#include "gradkern/tensor_table.h"

namespace gradkern {

struct F32Access {
  using storage = float;
  using compute = float;
  static compute load(storage v) { return v; }
  static storage store(compute v) { return v; }
};

struct F64Access {
  using storage = double;
  using compute = double;
  static compute load(storage v) { return v; }
  static storage store(compute v) { return v; }
};

struct F16Access {
  using storage = std::uint16_t;
  using compute = float;
  static compute load(storage v) { return f16_to_float(v); }
  static storage store(compute v) { return float_to_f16(v); }
};

struct BF16Access {
  using storage = std::uint16_t;
  using compute = float;
  static compute load(storage v) { return bf16_to_float(v); }
  static storage store(compute v) { return float_to_bf16(v); }
};

// Calls fn.template operator()<Access>() for the dtype code.
template <class Fn>
void dispatch_dtype(std::int8_t code, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::f32: fn(F32Access{}); break;
    case DType::f64: fn(F64Access{}); break;
    case DType::f16: fn(F16Access{}); break;
    case DType::bf16: fn(BF16Access{}); break;
  }
}

}  // namespace gradkern
