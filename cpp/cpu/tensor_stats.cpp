// Fused per-tensor statistics in one read pass: a power sum for the norm, max |g|, the count of
// non-finite values and the count of exact zeros.
//
// Each chunk is reduced with kLanes independent accumulators (so the compiler can vectorize
// without being allowed to reassociate), the lanes are folded in a fixed order, and the chunks of
// a tensor are folded in chunk order: the result is identical run to run and for any thread count.
// Power sums accumulate in fp64 whatever the input dtype.
#include <cmath>
#include <limits>
#include <vector>

#include "gradkern/element_access.h"
#include "gradkern/fast_kernels.h"
#include "gradkern/ops.h"
#include "gradkern/parallel.h"
#include "gradkern/prefetch.h"

namespace gradkern {
namespace {

struct Partial {
  double power_sum;
  double max_abs;
  std::int64_t nonfinite;
  std::int64_t zeros;
  bool has_nan;
};

template <NormKind K>
inline void accumulate_power(double& acc, double a, double p) {
  if constexpr (K == NormKind::l1) acc += a;
  if constexpr (K == NormKind::l2) acc += a * a;
  if constexpr (K == NormKind::power) acc += std::pow(a, p);
  if constexpr (K == NormKind::min_abs) acc = a < acc ? a : acc;
}

template <NormKind K>
constexpr double power_identity() {
  return K == NormKind::min_abs ? std::numeric_limits<double>::infinity() : 0.0;
}

template <class Access, NormKind K>
Partial reduce_chunk(const typename Access::storage* x, std::int64_t n, double p) {
  using C = typename Access::compute;
  constexpr C kMaxFinite = std::numeric_limits<C>::max();
  double acc[kLanes];
  C max_abs[kLanes];
  std::int32_t nonfinite[kLanes], zeros[kLanes], nan[kLanes];  // a chunk holds < 2^31 elements
  for (int j = 0; j < kLanes; ++j) {
    acc[j] = power_identity<K>();
    max_abs[j] = 0;
    nonfinite[j] = zeros[j] = nan[j] = 0;
  }
  const std::int64_t n_main = n - n % kLanes;
  auto step = [&](int j, C v) {
    const C a = std::fabs(v);
    accumulate_power<K>(acc[j], static_cast<double>(a), p);
    max_abs[j] = a > max_abs[j] ? a : max_abs[j];  // NaN never wins here; has_nan restores it
    nonfinite[j] += !(a <= kMaxFinite);
    zeros[j] += (a == C(0));
    nan[j] += (a != a);
  };
  for (std::int64_t i = 0; i < n_main; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) step(j, Access::load(x[i + j]));
  }
  for (std::int64_t i = n_main; i < n; ++i) step(static_cast<int>(i - n_main), Access::load(x[i]));

  Partial r{power_identity<K>(), 0.0, 0, 0, false};
  for (int j = 0; j < kLanes; ++j) {
    if constexpr (K == NormKind::min_abs) {
      r.power_sum = acc[j] < r.power_sum ? acc[j] : r.power_sum;
    } else {
      r.power_sum += acc[j];
    }
    r.max_abs = max_abs[j] > r.max_abs ? max_abs[j] : r.max_abs;
    r.nonfinite += nonfinite[j];
    r.zeros += zeros[j];
    r.has_nan = r.has_nan || nan[j] != 0;
  }
  return r;
}

// The common kinds (p = 1, 2, inf, 0) of finite chunks take the vectorized loop of
// cpp/cpu/isa/fast_kernels.cpp, which uses the same lanes and the same fp64 arithmetic as
// reduce_chunk, so both give the same bits. A chunk with NaN or inf is re-reduced here exactly
// while it is still in cache.
template <class Access, NormKind K>
Partial reduce_chunk_best(const FastKernels& fast, std::int8_t dtype,
                          const typename Access::storage* x, std::int64_t n, double p) {
  if constexpr (has_fast_stats(K)) {
    const FastStats f = fast.stats[dtype][static_cast<int>(K)](x, n);
    if (f.finite) return Partial{f.power_sum, f.max_abs, 0, f.zeros, false};
  }
  return reduce_chunk<Access, K>(x, n, p);
}

template <NormKind K>
Partial reduce_chunk_any(const FastKernels& fast, const TensorTable& table, const Chunk& c,
                         double p) {
  Partial r{};
  const std::int8_t dtype = table.dtype[c.tensor];
  dispatch_dtype(dtype, [&](auto access) {
    using A = decltype(access);
    const auto* base = reinterpret_cast<const typename A::storage*>(table.data[c.tensor]);
    r = reduce_chunk_best<A, K>(fast, dtype, base + c.begin, c.end - c.begin, p);
  });
  return r;
}

template <NormKind K>
void tensor_stats_impl(const TensorTable& table, double p, TensorStatsOut out) {
  const ChunkPlan plan = plan_chunks(table);
  std::vector<Partial> partials(plan.chunks.size());
  const FastKernels& fast = fast_kernels();
  parallel_for_ranges(plan.item_begin.data(), plan.n_items(), [&](std::int64_t i) {
    prefetch_ahead(table, plan, i);
    partials[i] = reduce_chunk_any<K>(fast, table, plan.chunks[i], p);
  });
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  for (std::int64_t t = 0; t < table.size; ++t) {
    Partial r{power_identity<K>(), 0.0, 0, 0, false};
    for (std::int64_t i = plan.first_chunk[t]; i < plan.first_chunk[t + 1]; ++i) {
      const Partial& c = partials[i];
      if constexpr (K == NormKind::min_abs) {
        r.power_sum = c.power_sum < r.power_sum ? c.power_sum : r.power_sum;
      } else {
        r.power_sum += c.power_sum;
      }
      r.max_abs = c.max_abs > r.max_abs ? c.max_abs : r.max_abs;
      r.nonfinite += c.nonfinite;
      r.zeros += c.zeros;
      r.has_nan = r.has_nan || c.has_nan;
    }
    out.power_sum[t] = r.has_nan ? kNaN : r.power_sum;
    out.max_abs[t] = r.has_nan ? kNaN : r.max_abs;
    out.nonfinite[t] = r.nonfinite;
    out.zeros[t] = r.zeros;
  }
}

}  // namespace

void tensor_stats(const TensorTable& table, NormKind kind, double p, TensorStatsOut out) {
  switch (kind) {
    case NormKind::none: tensor_stats_impl<NormKind::none>(table, p, out); break;
    case NormKind::l1: tensor_stats_impl<NormKind::l1>(table, p, out); break;
    case NormKind::l2: tensor_stats_impl<NormKind::l2>(table, p, out); break;
    case NormKind::min_abs: tensor_stats_impl<NormKind::min_abs>(table, p, out); break;
    case NormKind::power: tensor_stats_impl<NormKind::power>(table, p, out); break;
  }
}

}  // namespace gradkern
