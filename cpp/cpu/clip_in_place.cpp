// Scale-then-clamp in one pass over each tensor.
//
// A tensor whose coefficient is >= 1 is not scaled at all, and clamping writes only the elements
// that change: a clip that does not clip costs one read pass and dirties no cache line.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "gradkern/element_access.h"
#include "gradkern/ops.h"
#include "gradkern/fast_kernels.h"
#include "gradkern/parallel.h"
#include "gradkern/prefetch.h"

namespace gradkern {
namespace {

// The clip bound is the dtype's own value nearest clip_value: what torch's clamp compares against.
template <class Access>
typename Access::storage bound_in_dtype(double clip_value) {
  return Access::store(static_cast<typename Access::compute>(clip_value));
}

// ... and its magnitude bits, which is what the clamp loop compares.
template <class Access>
std::uint64_t bound_bits(double clip_value) {
  const typename Access::storage v = bound_in_dtype<Access>(clip_value);
  using Bits = std::conditional_t<sizeof v == 8, std::uint64_t,
                                  std::conditional_t<sizeof v == 4, std::uint32_t, std::uint16_t>>;
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  return static_cast<Bits>(b & (static_cast<Bits>(~Bits{0}) >> 1));
}

}  // namespace

void clip_in_place(const TensorTable& table, const double* coef, std::int64_t n_coef,
                   double clip_value) {
  const ChunkPlan plan = plan_chunks(table);
  const FastKernels& fast = fast_kernels();
  const bool clamp = !std::isinf(clip_value);
  parallel_for_ranges(plan.item_begin.data(), plan.n_items(), [&](std::int64_t i) {
    const Chunk& ch = plan.chunks[i];
    const double k = coef == nullptr ? 1.0 : coef[n_coef == 1 ? 0 : ch.tensor];
    const bool scale = !(k >= 1.0);  // a NaN coefficient scales, poisoning the tensor as torch does
    if (!scale && !clamp) return;
    prefetch_ahead(table, plan, i);
    const std::int8_t dtype = table.dtype[ch.tensor];
    dispatch_dtype(dtype, [&](auto access) {
      using A = decltype(access);
      auto* x = reinterpret_cast<typename A::storage*>(table.data[ch.tensor]) + ch.begin;
      const std::int64_t n = ch.end - ch.begin;
      if (scale) {
        const double c = clamp ? static_cast<double>(A::load(bound_in_dtype<A>(clip_value)))
                               : std::numeric_limits<double>::infinity();
        fast.scale_clamp[dtype](x, n, k, c);
      } else {
        fast.clamp[dtype](x, n, bound_bits<A>(clip_value));
      }
    });
  });
}

}  // namespace gradkern
