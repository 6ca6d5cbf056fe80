#include "gradkern/build_info.h"

#include "gradkern/fast_kernels.h"
#include "gradkern/parallel.h"

#ifndef GRADKERN_CXX_FLAGS
#define GRADKERN_CXX_FLAGS ""
#endif

namespace gradkern {

BuildInfo build_info() {
  BuildInfo info;
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#elif defined(_MSC_VER)
  info.compiler = "msvc " + std::to_string(_MSC_VER);
#else
  info.compiler = "unknown";
#endif
  info.flags = GRADKERN_CXX_FLAGS;
#ifdef GRADKERN_WITH_OPENMP
  info.openmp = true;
#else
  info.openmp = false;
#endif
  std::string simd;
#if defined(__AVX512F__)
  simd += "avx512f ";
#endif
#if defined(__AVX2__)
  simd += "avx2 ";
#endif
#if defined(__AVX__)
  simd += "avx ";
#endif
#if defined(__F16C__)
  simd += "f16c ";
#endif
#if defined(__SSE4_2__)
  simd += "sse4.2 ";
#endif
#if defined(__SSE2__)
  simd += "sse2 ";
#endif
#if defined(__ARM_NEON)
  simd += "neon ";
#endif
  if (!simd.empty()) simd.pop_back();
  info.simd = simd.empty() ? "none" : simd;
  info.kernel_isas = "baseline";
#if defined(GRADKERN_HAVE_AVX2_KERNELS)
  info.kernel_isas += " avx2";
#endif
  info.active_isa = fast_kernels().isa;
  info.reads_ahead = fast_kernels().reads_ahead;
  info.max_threads = max_threads();
  info.cpu_share_measurable = cpu_share_measurable();
  return info;
}

}  // namespace gradkern
