// What this build of the CPU library was compiled with, for `python -m gradkern info`.
#pragma once

#include <string>

namespace gradkern {

struct BuildInfo {
  std::string compiler;
  std::string flags;
  bool openmp;
  std::string simd;   // instruction-set extensions the compiler was allowed to use
  int max_threads;
};

BuildInfo build_info();

}  // namespace gradkern
