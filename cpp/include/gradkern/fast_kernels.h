// The hot inner loops, compiled once per instruction set and picked at run time.
//
// cpp/cpu/isa/fast_kernels.cpp is compiled twice: for the compiler's baseline and with AVX2
// (the way ATen builds its CPU_CAPABILITY kernels). fast_kernels() returns the table for the CPU
// the process runs on. Both builds do the same arithmetic in the same order (fixed lanes, fixed
// runs, no FMA contraction), so they give bitwise identical results.
#pragma once

#include <cstdint>

#include "gradkern/ops.h"
#include "gradkern/tensor_table.h"

namespace gradkern {

// Lanes of the power-sum accumulators: element i of a chunk always goes to lane i % kLanes, and
// the lanes are folded in lane order. The Numba twin uses the same lanes.
constexpr int kLanes = 16;

// Result of the fast stats loop over one chunk. When usable is false the other fields are
// meaningless and the caller re-reduces the chunk on the exact path: the chunk holds NaN or
// +-inf, or (fp32, fp16, bf16 power sums) its max |g| lies outside the range where the loop's
// fp32 runs keep their error bound (see cpp/cpu/isa/fast_kernels.cpp).
struct FastStats {
  double power_sum;
  double max_abs;
  std::int64_t zeros;
  bool usable;
};

// Kinds with a fast loop: none (inf-norm and 0-norm need only max|g| and zeros), l1 and l2.
constexpr bool has_fast_stats(NormKind k) {
  return k == NormKind::none || k == NormKind::l1 || k == NormKind::l2;
}

struct FastKernels {
  const char* isa;
  bool reads_ahead;  // the read loops prefetch 1 KiB ahead (cpp/cpu/isa/fast_kernels.cpp)
  // [dtype code][kind: none, l1, l2]
  FastStats (*stats[4][3])(const void* x, std::int64_t n);
  // Clamp |x| to the dtype value whose magnitude bits are bound_bits, writing only what
  // changes; NaN stays NaN.
  void (*clamp[4])(void* x, std::int64_t n, std::uint64_t bound_bits);
  // x = clamp(x * coef, -bound, bound), computed in the dtype's compute precision.
  void (*scale_clamp[4])(void* x, std::int64_t n, double coef, double bound);
};

// Each build's table with and without the read-ahead prefetches (same results either way).
const FastKernels& fast_kernels_baseline(bool read_ahead);
#if defined(GRADKERN_HAVE_AVX2_KERNELS)
const FastKernels& fast_kernels_avx2(bool read_ahead);
#endif

// The best table this CPU can run (decided once): the widest build it supports, reading ahead
// where that was measured to pay.
const FastKernels& fast_kernels();

}  // namespace gradkern
