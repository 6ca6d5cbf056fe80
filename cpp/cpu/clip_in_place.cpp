// Scale-then-clamp in one pass over each tensor.
//
// A tensor whose coefficient is >= 1 is not scaled at all, and clamping writes only the elements
// that change: a clip that does not clip costs one read pass and dirties no cache line.
#include <cmath>
#include <limits>

#include "gradkern/element_access.h"
#include "gradkern/ops.h"
#include "gradkern/parallel.h"
#include "gradkern/simd_clones.h"

namespace gradkern {
namespace {

constexpr std::int64_t kBlock = 64;

// Clamp to [-c, c], touching memory only where a value changes. Blocks are first tested with a
// branch-free (vectorizable) scan; the rare blocks that hold an outlier are then fixed one by one.
template <class Access>
GRADKERN_SIMD_CLONES void clamp_chunk(typename Access::storage* x, std::int64_t n, typename Access::compute c) {
  using C = typename Access::compute;
  const typename Access::storage hi = Access::store(c), lo = Access::store(-c);
  for (std::int64_t b = 0; b < n; b += kBlock) {
    const std::int64_t e = b + kBlock < n ? b + kBlock : n;
    int outside = 0;
    for (std::int64_t i = b; i < e; ++i) {
      const C v = Access::load(x[i]);
      outside |= (v > c) | (v < -c);
    }
    if (!outside) continue;
    for (std::int64_t i = b; i < e; ++i) {
      const C v = Access::load(x[i]);
      if (v > c) x[i] = hi;
      else if (v < -c) x[i] = lo;
    }
  }
}

template <class Access>
GRADKERN_SIMD_CLONES void scale_clamp_chunk(typename Access::storage* x, std::int64_t n, typename Access::compute coef,
                       typename Access::compute c) {
  using C = typename Access::compute;
  for (std::int64_t i = 0; i < n; ++i) {
    C v = Access::load(x[i]) * coef;
    v = v > c ? c : v;
    v = v < -c ? -c : v;
    x[i] = Access::store(v);
  }
}

template <class Access>
typename Access::compute round_to_dtype(double v) {
  return Access::load(Access::store(static_cast<typename Access::compute>(v)));
}

}  // namespace

void clip_in_place(const TensorTable& table, const double* coef, std::int64_t n_coef,
                   double clip_value) {
  const ChunkPlan plan = plan_chunks(table);
  parallel_for(static_cast<std::int64_t>(plan.chunks.size()), [&](std::int64_t i) {
    const Chunk& ch = plan.chunks[i];
    const double k = coef == nullptr ? 1.0 : coef[n_coef == 1 ? 0 : ch.tensor];
    const bool scale = !(k >= 1.0);
    const bool clamp = !std::isinf(clip_value);
    if (!scale && !clamp) return;
    dispatch_dtype(table.dtype[ch.tensor], [&](auto access) {
      using A = decltype(access);
      using C = typename A::compute;
      auto* x = reinterpret_cast<typename A::storage*>(table.data[ch.tensor]) + ch.begin;
      // The bound is the dtype's own value nearest clip_value, as torch's clamp uses.
      const C c = clamp ? round_to_dtype<A>(clip_value) : std::numeric_limits<C>::infinity();
      if (scale) {
        scale_clamp_chunk<A>(x, ch.end - ch.begin, static_cast<C>(k), c);
      } else {
        clamp_chunk<A>(x, ch.end - ch.begin, c);
      }
    });
  });
}

}  // namespace gradkern
