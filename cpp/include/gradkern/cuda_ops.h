// The CUDA operations. Plain C++ types only: the binding needs no CUDA headers and the .cu
// files need no pybind11. Every pointer is a device pointer, allocated by the caller (torch's
// caching allocator); the kernels never allocate, never synchronize, and run on the stream
// passed in (torch's current stream), so they are safe to capture in a CUDA graph.
#pragma once

#include <cstdint>

#include "gradkern/ops.h"

namespace gradkern::cuda {

// The tensor table and its chunk plan, in device memory.
struct DeviceTable {
  const std::uint64_t* data;   // [n_tensors] base addresses
  const std::int64_t* numel;   // [n_tensors]
  const std::int8_t* dtype;    // [n_tensors] DType codes
  const std::int64_t* chunk_tensor;  // [n_chunks] tensor of each chunk
  const std::int64_t* chunk_begin;   // [n_chunks] first element of each chunk
  const std::int64_t* first_chunk;   // [n_tensors + 1] chunks of tensor t: [first_chunk[t], first_chunk[t+1])
  std::int64_t n_tensors;
  std::int64_t n_chunks;
  std::int64_t chunk_elems;    // kChunkElems
};

// Outputs, one entry per tensor, and the per-chunk partials that pass 1 writes and pass 2 folds
// per tensor: callers allocate kWorkspaceWords * n_chunks 8-byte words.
constexpr int kWorkspaceWords = 5;

struct CudaStatsOut {
  double* power_sum;        // [n_tensors]
  double* max_abs;          // [n_tensors]
  std::int64_t* nonfinite;  // [n_tensors]
  std::int64_t* zeros;      // [n_tensors]
  void* workspace;          // [kWorkspaceWords * n_chunks] 8-byte words
};

// Same semantics as the CPU tensor_stats (ops.h). Deterministic: no float atomics; every sum is
// taken in a fixed order that depends only on the table.
void tensor_stats(const DeviceTable& table, NormKind kind, double p, CudaStatsOut out,
                  int sm_count, std::uintptr_t stream);

// Same semantics as the CPU clip_in_place, with coef in device memory (n_coef = 0: no
// scaling; 1: one for all; n_tensors: per tensor). A chunk whose coefficient is >= 1 and that
// needs no clamping returns before reading anything.
void clip_in_place(const DeviceTable& table, const double* coef, std::int64_t n_coef,
                   double clip_value, int sm_count, std::uintptr_t stream);

// The last CUDA error as text ("" when none), cleared.
const char* take_last_error();

}  // namespace gradkern::cuda
