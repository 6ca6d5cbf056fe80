#include "gradkern/tensor_table.h"

namespace gradkern {

ChunkPlan plan_chunks(const TensorTable& table) {
  ChunkPlan plan;
  plan.first_chunk.resize(static_cast<std::size_t>(table.size) + 1);
  std::int64_t total = 0;
  for (std::int64_t t = 0; t < table.size; ++t) {
    plan.first_chunk[t] = total;
    total += (table.numel[t] + kChunkElems - 1) / kChunkElems;
  }
  plan.first_chunk[table.size] = total;
  plan.chunks.reserve(static_cast<std::size_t>(total));
  for (std::int64_t t = 0; t < table.size; ++t) {
    for (std::int64_t b = 0; b < table.numel[t]; b += kChunkElems) {
      const std::int64_t e = b + kChunkElems < table.numel[t] ? b + kChunkElems : table.numel[t];
      plan.chunks.push_back({t, b, e});
    }
  }
  return plan;
}

}  // namespace gradkern
