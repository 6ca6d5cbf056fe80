// What this build of the CPU library was compiled with, for `python -m gradkern info`.
#pragma once

#include <string>

namespace gradkern {

struct BuildInfo {
  std::string compiler;
  std::string flags;
  bool openmp;
  std::string simd;         // extensions the baseline build was allowed to use
  std::string kernel_isas;  // builds of the hot loops compiled in (cpp/cpu/isa/)
  std::string active_isa;   // the one this CPU runs
  bool reads_ahead;         // whether its read loops prefetch ahead (cpp/cpu/fast_kernels.cpp)
  int max_threads;
  bool cpu_share_measurable;  // whether passes can tell shared cores (gradkern/cpu_share.h)
};

BuildInfo build_info();

}  // namespace gradkern
