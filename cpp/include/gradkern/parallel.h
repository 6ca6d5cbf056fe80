// One parallel-for for the whole library, chosen at build time (OpenMP or serial).
#pragma once

#include <cstdint>
#include <thread>

#include "gradkern/constants.h"
#include "gradkern/cpu_share.h"

#ifdef GRADKERN_WITH_OPENMP
#include <omp.h>
#endif

namespace gradkern {

// Calls body(i) for i in [0, n). Items are handed out dynamically, in runs of consecutive items
// that shrink towards the end (OpenMP's guided schedule): each thread streams through long
// stretches of memory, and the last small runs still balance threads that fell behind. Callers
// make items of similar size. Each body writes only its own outputs, so the result does not
// depend on which thread ran what.
// Why not one item at a time: threads taking turns over consecutive 256 KiB chunks read 4 x 64M
// fp32 at 77-85% of a torch sum over the same memory whenever the host's memory was fast (~50
// GB/s), against 92-95% with guided runs (equal at ~33 GB/s).
template <class Body>
void parallel_for(std::int64_t n, const Body& body) {
#ifdef GRADKERN_WITH_OPENMP
  if (n > 1 && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(guided)
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) body(i);
}

// kMinParallelRanges (gradkern/constants.h): fewer ranges run on the calling thread. The
// callers' ranges are work items of up to kChunkElems (64K) elements, so this is a pass over at
// most 256K elements, which one thread reads (1 MiB of fp32) in tens of us. Going parallel for
// it costs more than that: right after a torch op, torch's own OpenMP threads still spin on the
// same cores, and the stats of a tiny model's 102 gradients (28K elements) took a mean of 334 us
// with threads against 139 us on the calling thread, with tails of 5 ms against 1 ms for
// clip_grad_norm_ (2 cores, builds alternated).
//
// kMinParallelRangesShared: when the cores are shared (cpu_shared()), fewer ranges run on the
// calling thread too: 32M elements, ~10 ms on one core. A team member that is not running when
// the pass starts, or is preempted in it, holds the whole team at its end for a scheduler slice
// or two. With three busy processes beside the loop on 2 cores: over 1,000 x 1,000 fp32 the
// calling thread alone took a median of 0.5-0.8 ms and a p90 of 0.8-8.7 ms, two threads 0.7-4.4
// ms and 7.9-16 ms; 8 x 4M (512 ranges) came out even; a total norm over GPT-2-small shapes
// (124M elements) took 33-35 ms with two threads and 40-46 ms on the calling thread, as the
// second thread still wins the process a second share of the cores. Helpers that join a pass
// only if they are running (no barrier for late ones) did no better over 1,000 x 1,000 (median
// 1.1-1.4 ms): a helper preempted inside its claim holds the pass just the same.

// Calls body(i) for every i in [bounds[k], bounds[k + 1]) for each of the n_ranges ranges. A range
// runs in order on one thread; ranges are handed out dynamically. Grouping many tiny items into
// one range keeps the scheduling cost per item negligible. The same bodies run whichever thread
// runs them, so a serial pass gives the same bits.
template <class Body>
void parallel_for_ranges(const std::int64_t* bounds, std::int64_t n_ranges, const Body& body) {
  const auto range = [&](std::int64_t k) {
    for (std::int64_t i = bounds[k]; i < bounds[k + 1]; ++i) body(i);
  };
  if (n_ranges < kMinParallelRanges ||
      (n_ranges < kMinParallelRangesShared && cpu_shared())) {
    for (std::int64_t k = 0; k < n_ranges; ++k) range(k);
    return;
  }
  parallel_for(n_ranges, range);
}

// Runs caller_first() and then body() on the calling thread while the other threads run body()
// alone: for a producer that only the calling thread may run (it reads Python objects) and
// consumers that start on its output at once. body() must return once the work is done.
template <class First, class Body>
void run_with_helpers(const First& caller_first, const Body& body) {
#ifdef GRADKERN_WITH_OPENMP
  if (omp_get_max_threads() > 1) {
#pragma omp parallel
    {
      if (omp_get_thread_num() == 0) caller_first();  // the master thread is the caller
      body();
    }
    return;
  }
#endif
  caller_first();
  body();
}

// A spin-wait hint: lets the other hardware thread of the core run while this one waits.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A bounded spin for a thread that waits on another: a short spin covers the common wait (a
// producer a few microseconds from its next publication); past it, every try yields the core, so
// a waiter whose producer was descheduled hands the core over instead of burning its slice.
class SpinWait {
 public:
  void operator()() {
    if (spins_ < kSpinsBeforeYield) {
      ++spins_;
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
  void reset() { spins_ = 0; }

 private:
  static constexpr int kSpinsBeforeYield = 1024;  // ~20-60 us of pause instructions
  int spins_ = 0;
};

inline int max_threads() {
#ifdef GRADKERN_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace gradkern
