// One parallel-for for the whole library, chosen at build time (OpenMP or serial).
#pragma once

#include <cstdint>

#ifdef GRADKERN_WITH_OPENMP
#include <omp.h>
#endif

namespace gradkern {

// Calls body(i) for i in [0, n). Items are handed out dynamically because chunk sizes differ
// (one huge tensor next to thousands of tiny ones); each body writes only its own outputs, so
// the result does not depend on which thread ran what.
template <class Body>
void parallel_for(std::int64_t n, const Body& body) {
#ifdef GRADKERN_WITH_OPENMP
  if (n > 1 && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(dynamic, 4)
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) body(i);
}

inline int max_threads() {
#ifdef GRADKERN_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace gradkern
