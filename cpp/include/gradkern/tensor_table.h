// The tensor table: the only thing the kernels know about tensors.
//
// Python hands over three parallel arrays (addresses, element counts, dtype codes). The kernels
// never see torch, so one build of the library serves every torch version.
#pragma once

#include <cstdint>
#include <vector>

#include "gradkern/constants.h"  // DType, kChunkElems

namespace gradkern {

constexpr int element_size(std::int8_t code) {
  return code == static_cast<std::int8_t>(DType::f64)   ? 8
         : code == static_cast<std::int8_t>(DType::f32) ? 4
                                                        : 2;
}

struct TensorTable {
  const std::uint64_t* data;  // base address of each tensor's contiguous storage
  const std::int64_t* numel;  // element count of each tensor
  const std::int8_t* dtype;   // DType code of each tensor
  std::int64_t size;          // number of tensors
};

struct Chunk {
  std::int64_t tensor;  // index into the table
  std::int64_t begin;   // first element of the chunk
  std::int64_t end;     // one past the last element
};

// Chunks of every tensor in table order; chunks of tensor t are contiguous, starting at
// first_chunk[t] (first_chunk has size+1 entries). Consecutive chunks are grouped into work
// items of at most kChunkElems elements (a full chunk is an item of its own; thousands of tiny
// tensors share items): item k covers chunks [item_begin[k], item_begin[k + 1]).
struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<std::int64_t> first_chunk;
  std::vector<std::int64_t> item_begin;

  std::int64_t n_items() const { return static_cast<std::int64_t>(item_begin.size()) - 1; }
};

ChunkPlan plan_chunks(const TensorTable& table);

}  // namespace gradkern
