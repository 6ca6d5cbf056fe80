// The hot loops of tensor_stats and clip_in_place, written with GCC/Clang vector extensions.
//
// This file is compiled once per instruction set (CMake defines GRADKERN_ISA to `baseline` or
// `avx2` and adds the matching -m flags). Everything here has internal linkage so that no AVX2
// code can leak into the baseline build through the linker; the only exported symbol is
// fast_kernels_<ISA>().
//
// The trick that keeps the stats loop short: for IEEE formats the magnitude bits |x| (the bit
// pattern with the sign cleared) order exactly like |x| as integers, and every pattern above the
// infinity pattern is a NaN. One integer max over the magnitude bits therefore gives max|g| and
// says whether the chunk holds NaN or inf; an integer compare with zero counts the zeros. Only
// the power sum needs floating point.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "gradkern/fast_kernels.h"
#include "gradkern/low_precision.h"

#ifndef GRADKERN_ISA
#error "compile this file with -DGRADKERN_ISA=<name>"
#endif
#define GRADKERN_CONCAT2(a, b) a##b
#define GRADKERN_CONCAT(a, b) GRADKERN_CONCAT2(a, b)
#define GRADKERN_STRINGIFY2(a) #a
#define GRADKERN_STRINGIFY(a) GRADKERN_STRINGIFY2(a)

namespace gradkern {
namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef std::int32_t i32x8 __attribute__((vector_size(32)));
typedef std::int64_t i64x4 __attribute__((vector_size(32)));
typedef std::uint16_t u16x8 __attribute__((vector_size(16)));

template <class To, class From>
inline To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between different sizes");
  To out;
  __builtin_memcpy(&out, &v, sizeof out);
  return out;
}

template <class V>
inline V load(const void* p) {  // unaligned
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// fp32 -> fp64 of four lanes. GCC 12 splits __builtin_convertvector(f32x4 -> f64x4) into two
// 128-bit converts, so the AVX build says what it wants.
inline f64x4 widen(f32x4 f) {
#if defined(__AVX__)
  return reinterpret_cast<f64x4>(_mm256_cvtps_pd(reinterpret_cast<__m128>(f)));
#else
  return __builtin_convertvector(f, f64x4);
#endif
}
inline f64x4 low_half_f64(f32x8 f) { return widen(__builtin_shufflevector(f, f, 0, 1, 2, 3)); }
inline f64x4 high_half_f64(f32x8 f) { return widen(__builtin_shufflevector(f, f, 4, 5, 6, 7)); }

// ---- element formats -----------------------------------------------------------------------
// Each format reads kBlock = 16 elements as kVecs magnitude vectors, turns magnitudes into
// values, and knows its infinity pattern. 32-bit formats hold 8 magnitudes per vector.

constexpr int kBlock = kLanes;

// 16-bit formats are widened to int32 lanes (zero-extended, so the sign is bit 15).
inline void load_u16_bits(const std::uint16_t* x, i32x8 b[2]) {
  b[0] = __builtin_convertvector(load<u16x8>(x), i32x8);
  b[1] = __builtin_convertvector(load<u16x8>(x + 8), i32x8);
}
inline void store_u16_bits(std::uint16_t* x, const i32x8 b[2]) {
  const u16x8 lo = __builtin_convertvector(b[0], u16x8), hi = __builtin_convertvector(b[1], u16x8);
  __builtin_memcpy(x, &lo, sizeof lo);
  __builtin_memcpy(x + 8, &hi, sizeof hi);
}

template <class Storage>
struct Narrow {  // fp32, fp16, bf16: magnitudes in int32 lanes, values computed in fp32
  using storage = Storage;
  using mag_t = std::int32_t;
  using MagVec = i32x8;
  static constexpr int kVecs = 2;
};

struct F32Fmt : Narrow<float> {
  using bits_t = std::uint32_t;
  static constexpr mag_t kInfBits = 0x7f800000;
  static void load_bits(const storage* x, MagVec b[2]) {
    b[0] = load<i32x8>(x);
    b[1] = load<i32x8>(x + 8);
  }
  static void store_bits(storage* x, const MagVec b[2]) {
    __builtin_memcpy(x, &b[0], sizeof b[0]);
    __builtin_memcpy(x + 8, &b[1], sizeof b[1]);
  }
  static f32x8 values(MagVec m) { return bit_cast<f32x8>(m); }
  static double value(mag_t m) { return bit_cast<float>(m); }
};

struct BF16Fmt : Narrow<std::uint16_t> {
  using bits_t = std::uint16_t;
  static constexpr mag_t kInfBits = 0x7f80;
  static void load_bits(const storage* x, MagVec b[2]) { load_u16_bits(x, b); }
  static void store_bits(storage* x, const MagVec b[2]) { store_u16_bits(x, b); }
  static f32x8 values(MagVec m) { return bit_cast<f32x8>(m << 16); }
  static double value(mag_t m) { return bit_cast<float>(m << 16); }
};

struct F16Fmt : Narrow<std::uint16_t> {
  using bits_t = std::uint16_t;
  static constexpr mag_t kInfBits = 0x7c00;
  static void load_bits(const storage* x, MagVec b[2]) { load_u16_bits(x, b); }
  static void store_bits(storage* x, const MagVec b[2]) { store_u16_bits(x, b); }
  // Exponent and mantissa placed in a float, rescaled by 2^112: exact for finite halves,
  // subnormals included (only finite chunks reach here).
  static f32x8 values(MagVec m) { return bit_cast<f32x8>(m << 13) * 0x1p112f; }
  static double value(mag_t m) { return bit_cast<float>(m << 13) * 0x1p112f; }
};

struct F64Fmt {
  using storage = double;
  using bits_t = std::uint64_t;
  using mag_t = std::int64_t;
  using MagVec = i64x4;
  static constexpr int kVecs = 4;
  static constexpr mag_t kInfBits = 0x7ff0000000000000;
  static void load_bits(const storage* x, MagVec b[4]) {
    for (int v = 0; v < 4; ++v) b[v] = load<i64x4>(x + 4 * v);
  }
  static void store_bits(storage* x, const MagVec b[4]) {
    for (int v = 0; v < 4; ++v) __builtin_memcpy(x + 4 * v, &b[v], sizeof b[v]);
  }
  static void values_f64(const MagVec m[4], f64x4 out[4]) {
    for (int v = 0; v < 4; ++v) out[v] = bit_cast<f64x4>(m[v]);
  }
  static double value(mag_t m) { return bit_cast<double>(m); }
};

template <class Fmt>
constexpr typename Fmt::mag_t kMagMask = Fmt::kInfBits | (Fmt::kInfBits - 1);

// A block's magnitude bits: its bit patterns with the sign cleared.
template <class Fmt>
inline void load_mags(const typename Fmt::storage* x, typename Fmt::MagVec m[Fmt::kVecs]) {
  Fmt::load_bits(x, m);
  for (int v = 0; v < Fmt::kVecs; ++v) m[v] &= kMagMask<Fmt>;
}

template <class Fmt>
inline typename Fmt::mag_t mag_of(const typename Fmt::storage* x) {
  typename Fmt::bits_t b;
  __builtin_memcpy(&b, x, sizeof b);
  using Mag = typename Fmt::mag_t;
  return static_cast<Mag>(b) & kMagMask<Fmt>;
}

template <NormKind K, class V>
inline V power_term(V a) {
  if constexpr (K == NormKind::l2) return a * a;
  return a;  // l1
}

// ---- reading ahead -------------------------------------------------------------------------

// Both read loops can ask for the lines kReadAheadBytes ahead of the block they are on, into
// L1. It pays on one family and costs on another, so each ISA build holds both tables and
// fast_kernels() picks one per CPU (see cpp/cpu/fast_kernels.cpp).
// - EPYC of CPU family 23 (Zen, Zen 2), reading 22-27 GB/s: the hardware prefetcher alone left
//   the clamp's test loop at 20-21 ms over 124M fp32 (2 threads) against 18.7 ms for a plain fp32
//   sum; 512 B or 1 KiB ahead brought it to 17.6-18.5 ms, and the clamp with 1% outliers from
//   27.5 to 23.6-24.2 ms (2-4 KiB ahead into L2: no better than none).
// - Zen 4 (same harness, 124M fp32): the prefetches cost 7-22% on one thread (stats 22.4-23.9
//   ms against 19.7-20.8, the clamp's test loop 22.3-23.3 against 19.9-20.2) and 6-20% on two;
//   without them the loops read as fast as a plain fp32 sum (19.5-20.6 ms).
constexpr std::int64_t kReadAheadBytes = 1024;

template <class Fmt, bool kAhead>
__attribute__((always_inline)) inline void read_ahead(const typename Fmt::storage* block) {
  if constexpr (!kAhead) return;
  constexpr std::int64_t kBlockBytes = kBlock * sizeof(typename Fmt::storage);
  const char* p = reinterpret_cast<const char*>(block) + kReadAheadBytes;
  for (std::int64_t b = 0; b < kBlockBytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// ---- stats ---------------------------------------------------------------------------------

// Narrow formats (fp32, fp16, bf16) add their power terms in fp32 over a run of kRunBlocks
// blocks, then widen the 16 run sums and add them to the fp64 lanes. Widening every element
// (four fp32 -> fp64 converts and four fp64 adds per block) held the loop to 3.1 G elements/s per
// thread on that family-23 EPYC (a plain fp32 sum reads 12 G/s in L2); with runs it does 4.7 for
// p = 2 and 5.9 for p = 1, one fp32 multiply and add per 8 elements. Each run sum is a sum
// of at most 8 positive terms, each term within 2^-24 of exact, so it is within 8 x 2^-24
// (4.8e-7) of exact, and so is the total: the norm is within 2.4e-7 (p = 2) or 4.8e-7 (p = 1).
constexpr int kRunBlocks = 8;

// The fp32 run sums are trusted only where no term can overflow (|x| < 2^60, so x^2 < 2^120
// and 8 of them stay finite) and no term that matters can be subnormal (max |x| >= 2^-40, so
// the sum is at least 2^-80 and every term below 2^-126, even flushed to zero, is below 2^-30
// of it). Other finite chunks are re-reduced exactly in fp64 by the caller; a chunk of zeros
// is exact either way.
constexpr double kRunMin = 0x1p-40, kRunMax = 0x1p60;

template <class Fmt, NormKind K, bool kAhead>
FastStats stats(const void* data, std::int64_t n) {
  using MagVec = typename Fmt::MagVec;
  using Mag = typename Fmt::mag_t;
  constexpr int kV = Fmt::kVecs;
  constexpr bool kNarrow = !std::is_same_v<Fmt, F64Fmt>;
  const auto* x = static_cast<const typename Fmt::storage*>(data);

  f64x4 s0 = {}, s1 = {}, s2 = {}, s3 = {};  // lanes 0-3, 4-7, 8-11, 12-15
  f32x8 run0 = {}, run1 = {};                // narrow formats: the run's lanes 0-7, 8-15
  MagVec max_mag[kV] = {};
  MagVec zeros[kV] = {};  // counts down: a true vector compare is -1
  auto block = [&](const typename Fmt::storage* p) {
    read_ahead<Fmt, kAhead>(p);
    MagVec m[kV];
    load_mags<Fmt>(p, m);
    for (int v = 0; v < kV; ++v) {
      max_mag[v] = m[v] > max_mag[v] ? m[v] : max_mag[v];
      zeros[v] += m[v] == 0;
    }
    if constexpr (K != NormKind::none && kNarrow) {
      const f32x8 a = Fmt::values(m[0]), b = Fmt::values(m[1]);
      run0 += power_term<K>(a);
      run1 += power_term<K>(b);
    } else if constexpr (K != NormKind::none) {
      f64x4 a[4];
      Fmt::values_f64(m, a);
      s0 += power_term<K>(a[0]);
      s1 += power_term<K>(a[1]);
      s2 += power_term<K>(a[2]);
      s3 += power_term<K>(a[3]);
    }
  };
  // Ends a run: its sums join the fp64 lanes (lane order unchanged: lane j holds element i of
  // the chunk for i % 16 == j).
  auto end_run = [&] {
    if constexpr (K != NormKind::none && kNarrow) {
      s0 += low_half_f64(run0);
      s1 += high_half_f64(run0);
      s2 += low_half_f64(run1);
      s3 += high_half_f64(run1);
      run0 = f32x8{};
      run1 = f32x8{};
    }
  };
  const std::int64_t n_main = n - n % kBlock;
  constexpr std::int64_t kRun = std::int64_t{kRunBlocks} * kBlock;
  const std::int64_t n_runs = n_main - n_main % kRun;
  for (std::int64_t r = 0; r < n_runs; r += kRun) {
    // Unrolled whole, the run's 16 vectors spill out of the 16 AVX registers.
#pragma GCC unroll 2
    for (int k = 0; k < kRunBlocks; ++k) block(x + r + k * kBlock);
    end_run();
  }
  for (std::int64_t i = n_runs; i < n_main; i += kBlock) block(x + i);
  // The tail runs as one more block padded with +0: element i still lands in lane i % 16, adding
  // +0 leaves a lane sum unchanged, and the padding zeros are taken off the count below.
  const std::int64_t tail = n - n_main;
  if (tail) {
    typename Fmt::storage padded[kBlock] = {};
    __builtin_memcpy(padded, x + n_main, static_cast<std::size_t>(tail) * sizeof(padded[0]));
    block(padded);
  }
  end_run();  // the last, shorter run (an empty one adds +0)

  // Fold the vectors once (through memory, so the loop above keeps them in registers).
  constexpr int kW = static_cast<int>(sizeof(MagVec) / sizeof(Mag));
  MagVec top_vec = max_mag[0], zero_vec = zeros[0];
  for (int v = 1; v < kV; ++v) {
    top_vec = max_mag[v] > top_vec ? max_mag[v] : top_vec;
    zero_vec += zeros[v];
  }
  Mag tops[kW], zero_lanes[kW];
  __builtin_memcpy(tops, &top_vec, sizeof tops);
  __builtin_memcpy(zero_lanes, &zero_vec, sizeof zero_lanes);
  Mag top = 0;
  std::int64_t zero_count = tail ? tail - kBlock : 0;
  for (int l = 0; l < kW; ++l) {
    top = tops[l] > top ? tops[l] : top;
    zero_count -= zero_lanes[l];
  }
  FastStats r{0.0, 0.0, zero_count, top < Fmt::kInfBits};
  if (!r.usable) return r;
  r.max_abs = Fmt::value(top);
  if constexpr (K != NormKind::none && kNarrow) {
    r.usable = top == 0 || (r.max_abs >= kRunMin && r.max_abs < kRunMax);
  }
  const f64x4 sums[4] = {s0, s1, s2, s3};
  double lanes[kLanes];
  __builtin_memcpy(lanes, sums, sizeof lanes);
  for (int j = 0; j < kLanes; ++j) r.power_sum += lanes[j];  // fixed lane order
  return r;
}

// ---- clamp ---------------------------------------------------------------------------------

// True when any bit of v is set: one vptest on AVX (a lane-by-lane extract costs more than the
// rest of the clamp loop).
template <class V>
inline bool any_set(V v) {
#if defined(__AVX__)
  const __m256i bits = bit_cast<__m256i>(v);
  return !_mm256_testz_si256(bits, bits);
#else
  const auto bits = bit_cast<i64x4>(v);
  return (bits[0] | bits[1] | bits[2] | bits[3]) != 0;
#endif
}

// Whether some magnitude in the block at x exceeds the bound. A NaN passes this test too and is
// sorted out in clamp_block, so the test that runs over every block stays at five vector ops.
template <class Fmt>
inline bool block_needs_clamp(const typename Fmt::storage* x, typename Fmt::mag_t bound) {
  typename Fmt::MagVec b[Fmt::kVecs], above = {};
  Fmt::load_bits(x, b);
  for (int v = 0; v < Fmt::kVecs; ++v) above |= (b[v] & kMagMask<Fmt>) > bound;
  return any_set(above);
}

// Gives every element of the block beyond the bound (and not NaN) the bound, with its sign;
// stores the block only if that changed an element (a block flagged for a NaN alone is left).
template <class Fmt>
inline void clamp_block(typename Fmt::storage* x, typename Fmt::mag_t bound) {
  using MagVec = typename Fmt::MagVec;
  constexpr auto kMask = kMagMask<Fmt>;
  MagVec b[Fmt::kVecs], changed = {};
  Fmt::load_bits(x, b);
  for (int v = 0; v < Fmt::kVecs; ++v) {
    const MagVec m = b[v] & kMask;
    const MagVec outside = (m > bound) & (m <= Fmt::kInfBits);
    const MagVec clamped = (b[v] & ~kMask) | bound;
    b[v] = (outside & clamped) | (~outside & b[v]);
    changed |= outside;
  }
  if (any_set(changed)) Fmt::store_bits(x, b);
}

// Clamps in blocks of 16 and stores only the blocks that change: with few outliers this is one
// read pass that dirties few cache lines.
// It runs in two steps per 64 blocks (4 KiB of fp32): the first tests every block and sets a bit
// per block that needs a change, with no branch; the second clamps the flagged blocks, now in
// L1. Branching per block instead mispredicts on each block with an outlier (~14% of blocks at
// 1% outliers), and each miss also throws away the loads in flight: on 124M fp32 values with 1%
// outliers (2 threads on a 2-core Zen 4) that loop took 15.5-16.3 ms against 10.7-11.9 ms with
// none; the two steps take 11.3-12.2 ms. AVX2 masked stores (vpmaskmovd) measured 2x slower
// still, and storing every block back (torch's single clamp pass) is slower than both.
template <class Fmt, bool kAhead>
void clamp(void* data, std::int64_t n, std::uint64_t bound_bits) {
  using Mag = typename Fmt::mag_t;
  using Bits = typename Fmt::bits_t;
  constexpr Mag kMask = kMagMask<Fmt>;
  constexpr std::int64_t kGroup = 64 * kBlock;  // one flag bit per block in a 64-bit word
  auto* x = static_cast<typename Fmt::storage*>(data);
  const Mag bound = static_cast<Mag>(bound_bits);

  const std::int64_t n_main = n - n % kBlock;
  for (std::int64_t g = 0; g < n_main; g += kGroup) {
    auto* group = x + g;
    const int blocks = static_cast<int>(n_main - g < kGroup ? (n_main - g) / kBlock : 64);
    std::uint64_t flagged = 0;
    for (int j = 0; j < blocks; ++j) {
      read_ahead<Fmt, kAhead>(group + j * kBlock);
      flagged |= static_cast<std::uint64_t>(block_needs_clamp<Fmt>(group + j * kBlock, bound)) << j;
    }
    while (flagged != 0) {
      clamp_block<Fmt>(group + __builtin_ctzll(flagged) * kBlock, bound);
      flagged &= flagged - 1;
    }
  }
  for (std::int64_t i = n_main; i < n; ++i) {
    const Mag m = mag_of<Fmt>(x + i);
    if (m > bound && m <= Fmt::kInfBits) {
      Bits bits;
      __builtin_memcpy(&bits, x + i, sizeof bits);
      bits = static_cast<Bits>((bits & static_cast<Bits>(~kMask)) | static_cast<Bits>(bound));
      __builtin_memcpy(x + i, &bits, sizeof bits);
    }
  }
}

// ---- scale then clamp ----------------------------------------------------------------------
// Every element is rewritten here (the coefficient is < 1), so this is one read+write pass; the
// compiler vectorizes the fp32/fp64 loops, the half formats go through the portable converters.

template <class T>
inline T clamp_value(T v, T c) {
  v = v > c ? c : v;  // NaN compares false both times and stays NaN
  return v < -c ? -c : v;
}

template <class Fmt>
void scale_clamp(void* data, std::int64_t n, double coef, double bound) {
  auto* x = static_cast<typename Fmt::storage*>(data);
  if constexpr (sizeof(typename Fmt::storage) == 2) {
    constexpr bool bf16 = std::is_same_v<Fmt, BF16Fmt>;
    const float k = static_cast<float>(coef), c = static_cast<float>(bound);
    for (std::int64_t i = 0; i < n; ++i) {
      const float v = clamp_value((bf16 ? bf16_to_float(x[i]) : f16_to_float(x[i])) * k, c);
      x[i] = bf16 ? float_to_bf16(v) : float_to_f16(v);
    }
  } else {
    using T = typename Fmt::storage;
    const T k = static_cast<T>(coef), c = static_cast<T>(bound);
    for (std::int64_t i = 0; i < n; ++i) x[i] = clamp_value(x[i] * k, c);
  }
}

// ---- the table -----------------------------------------------------------------------------

template <class Fmt, bool kAhead>
void fill(FastKernels& t, DType d) {
  const int i = static_cast<int>(d);
  t.stats[i][0] = &stats<Fmt, NormKind::none, kAhead>;
  t.stats[i][1] = &stats<Fmt, NormKind::l1, kAhead>;
  t.stats[i][2] = &stats<Fmt, NormKind::l2, kAhead>;
  t.clamp[i] = &clamp<Fmt, kAhead>;
  t.scale_clamp[i] = &scale_clamp<Fmt>;
}

template <bool kAhead>
FastKernels make_table() {
  FastKernels t{};
  t.isa = GRADKERN_STRINGIFY(GRADKERN_ISA);
  t.reads_ahead = kAhead;
  fill<F32Fmt, kAhead>(t, DType::f32);
  fill<F64Fmt, kAhead>(t, DType::f64);
  fill<F16Fmt, kAhead>(t, DType::f16);
  fill<BF16Fmt, kAhead>(t, DType::bf16);
  return t;
}

}  // namespace

const FastKernels& GRADKERN_CONCAT(fast_kernels_, GRADKERN_ISA)(bool read_ahead) {
  static const FastKernels plain = make_table<false>(), ahead = make_table<true>();
  return read_ahead ? ahead : plain;
}

}  // namespace gradkern
