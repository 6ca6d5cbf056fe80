// Picks the fast-kernel build for the CPU this process runs on.
#include "gradkern/fast_kernels.h"

#include <cstdlib>
#include <cstring>

namespace gradkern {
namespace {

const FastKernels& pick() {
  // GRADKERN_CPU_ISA=baseline forces the portable build (the tests use it to check that both
  // builds give the same bits).
  const char* forced = std::getenv("GRADKERN_CPU_ISA");
  const bool baseline_only = forced != nullptr && std::strcmp(forced, "baseline") == 0;
#if defined(GRADKERN_HAVE_AVX2_KERNELS)
  if (!baseline_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return fast_kernels_avx2();
  }
#else
  (void)baseline_only;
#endif
  return fast_kernels_baseline();
}

}  // namespace

const FastKernels& fast_kernels() {
  static const FastKernels& table = pick();
  return table;
}

}  // namespace gradkern
