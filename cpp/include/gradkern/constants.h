// The numbers the kernels and gradkern's Python layer must agree on, in one place for C++ and
// CUDA. Their Python home is gradkern/_constants.py; both compiled modules export these values
// (src/export_constants.h) and tests/test_constants.py checks every copy against them.
#pragma once

#include <cstdint>

namespace gradkern {

// The dtype code of each tensor-table entry.
enum class DType : std::int8_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Which power sum the stats pass accumulates besides max |g|, non-finite and zero counts.
enum class NormKind : std::int32_t {
  none = 0,     // nothing beyond the fixed statistics (inf-norm, 0-"norm")
  l1 = 1,       // sum |g|
  l2 = 2,       // sum g^2
  min_abs = 3,  // min |g| (the -inf "norm")
  power = 4,    // sum |g|^p for any other p
};

// Work is cut into chunks of at most kChunkElems elements. The partition depends only on the
// tensor sizes, never on the thread count, which is what makes results bitwise reproducible.
constexpr std::int64_t kChunkElems = std::int64_t{1} << 16;

// When a pass goes parallel. A pass over fewer work items (of up to kChunkElems elements) than
// kMinParallelRanges runs on the calling thread; one over fewer than kMinParallelRangesShared does
// too when the cores are shared: when the calling thread, over at least kShareWindowNs of its
// runnable time, waited for a core more than 1/kSharedRunPerWait as long as it ran. Why these
// values, with what was measured: gradkern/parallel.h and cpp/cpu/cpu_share.cpp.
constexpr std::int64_t kMinParallelRanges = 4;
constexpr std::int64_t kMinParallelRangesShared = 512;
constexpr std::int64_t kShareWindowNs = 4'000'000;
constexpr std::int64_t kSharedRunPerWait = 3;

}  // namespace gradkern
