// Picks the fast-kernel build for the CPU this process runs on.
#include "gradkern/fast_kernels.h"

#include <cstdlib>
#include <cstring>

namespace gradkern {
namespace {

// Whether the read loops should prefetch ahead of the hardware prefetcher. Measured to pay on
// AMD's CPU family 23 (Zen, Zen+, Zen 2) and to cost 6-22% on Zen 4; other CPUs get the plain
// loops, which read as fast as a plain sum where measured. GRADKERN_CPU_READ_AHEAD=1 or 0
// overrides the choice (same results either way: the prefetches only move cache lines).
bool read_ahead_pays() {
  if (const char* forced = std::getenv("GRADKERN_CPU_READ_AHEAD")) {
    return std::strcmp(forced, "0") != 0;
  }
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_is("znver1") || __builtin_cpu_is("znver2");
#else
  return false;
#endif
}

const FastKernels& pick() {
  const bool ahead = read_ahead_pays();
  // GRADKERN_CPU_ISA=baseline forces the portable build (the tests use it to check that both
  // builds give the same bits).
  const char* forced = std::getenv("GRADKERN_CPU_ISA");
  const bool baseline_only = forced != nullptr && std::strcmp(forced, "baseline") == 0;
#if defined(GRADKERN_HAVE_AVX2_KERNELS)
  if (!baseline_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return fast_kernels_avx2(ahead);
  }
#else
  (void)baseline_only;
#endif
  return fast_kernels_baseline(ahead);
}

}  // namespace

const FastKernels& fast_kernels() {
  static const FastKernels& table = pick();
  return table;
}

}  // namespace gradkern
