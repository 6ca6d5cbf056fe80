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
  plan.item_begin.push_back(0);
  std::int64_t in_item = 0;
  for (std::size_t i = 0; i < plan.chunks.size(); ++i) {
    const std::int64_t n = plan.chunks[i].end - plan.chunks[i].begin;
    if (in_item > 0 && in_item + n > kChunkElems) {
      plan.item_begin.push_back(static_cast<std::int64_t>(i));
      in_item = 0;
    }
    in_item += n;
  }
  plan.item_begin.push_back(static_cast<std::int64_t>(plan.chunks.size()));
  if (plan.chunks.empty()) plan.item_begin.pop_back();  // no items at all
  return plan;
}

}  // namespace gradkern
