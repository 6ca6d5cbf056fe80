// How many blocks a persistent grid (each block loops over work items) should launch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace gradkern::cuda {

// Blocks of `threads` threads of `kernel` that one multiprocessor holds at once. A persistent grid
// must not launch more than all multiprocessors hold: the extra blocks would start only when
// others finish their whole share and then run their own share alone, close to doubling the
// time (36 registers a thread fit 7 blocks of 256 on a Hopper SM, not 8).
template <class Kernel>
int resident_blocks_per_sm(Kernel kernel, int threads) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0) != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for the launch check
    blocks = 1;
  }
  return std::max(blocks, 1);
}

// The grid for `items` work items: every resident slot busy, no block without work.
inline std::int64_t persistent_grid(int blocks_per_sm, int sm_count, std::int64_t items) {
  return std::min<std::int64_t>(items, std::int64_t{blocks_per_sm} * sm_count);
}

}  // namespace gradkern::cuda
