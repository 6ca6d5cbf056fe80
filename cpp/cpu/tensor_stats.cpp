// Fused per-tensor statistics in one read pass: a power sum for the norm, max |g|, the count of
// non-finite values and the count of exact zeros.
//
// Each chunk is reduced with kLanes independent accumulators (so the compiler can vectorize
// without being allowed to reassociate), the lanes are folded in a fixed order, and the chunks of
// a tensor are folded in chunk order: the result is identical run to run and for any thread count.
// Power sums accumulate in fp64 whatever the input dtype.
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "gradkern/element_access.h"
#include "gradkern/ops.h"
#include "gradkern/parallel.h"
#include "gradkern/simd_clones.h"

namespace gradkern {
namespace {

constexpr int kLanes = 16;  // the Numba twin uses the same lanes

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

// Hot path for the common norms (p = 1, 2, inf, 0) on fp32/fp16/bf16: fixed-width blocks of
// kWide lanes that the compiler vectorizes (built for AVX2 and the baseline, picked at run time).
// It keeps only the power sum, max |g| and the zero count; a non-finite power sum (or sentinel)
// means the chunk holds NaN/inf, and the chunk is then re-reduced exactly by reduce_chunk while it
// is still in cache. Squares of fp32 values are exact in fp64, so the fp64 lane sums are the same
// accuracy as the exact path.
constexpr int kWide = kLanes;

template <class Access, NormKind K>
GRADKERN_SIMD_CLONES Partial reduce_chunk_fast(const typename Access::storage* x, std::int64_t n) {
  double acc[kWide] = {};
  float sentinel[kWide] = {};
  float max_abs[kWide] = {};
  std::int32_t zeros[kWide] = {};
  const std::int64_t n_main = n - n % kWide;
  for (std::int64_t i = 0; i < n_main; i += kWide) {
    float a[kWide];
    for (int j = 0; j < kWide; ++j) a[j] = std::fabs(Access::load(x[i + j]));
    for (int j = 0; j < kWide; ++j) {
      if constexpr (K == NormKind::l2) acc[j] += static_cast<double>(a[j]) * a[j];
      if constexpr (K == NormKind::l1) acc[j] += a[j];
      if constexpr (K == NormKind::none) sentinel[j] += a[j] * 0.0f;  // NaN iff a is NaN/inf
    }
    for (int j = 0; j < kWide; ++j) max_abs[j] = a[j] > max_abs[j] ? a[j] : max_abs[j];
    for (int j = 0; j < kWide; ++j) zeros[j] += (a[j] == 0.0f);
  }
  // The tail goes through the same lanes, element i to lane i - n_main, as in reduce_chunk.
  for (std::int64_t i = n_main; i < n; ++i) {
    const int j = static_cast<int>(i - n_main);
    const float a = std::fabs(Access::load(x[i]));
    if constexpr (K == NormKind::l2) acc[j] += static_cast<double>(a) * a;
    if constexpr (K == NormKind::l1) acc[j] += a;
    if constexpr (K == NormKind::none) sentinel[j] += a * 0.0f;
    max_abs[j] = a > max_abs[j] ? a : max_abs[j];
    zeros[j] += (a == 0.0f);
  }
  Partial r{0.0, 0.0, 0, 0, false};
  float sent = 0.0f;
  for (int j = 0; j < kWide; ++j) {
    r.power_sum += acc[j];
    sent += sentinel[j];
    r.max_abs = max_abs[j] > r.max_abs ? max_abs[j] : r.max_abs;
    r.zeros += zeros[j];
  }
  // Flag for the caller: this chunk needs the exact path (it holds NaN or inf).
  r.has_nan = !std::isfinite(r.power_sum) || !std::isfinite(sent);
  return r;
}

template <class Access, NormKind K>
Partial reduce_chunk_best(const typename Access::storage* x, std::int64_t n, double p) {
  constexpr bool fast_kind = K == NormKind::l1 || K == NormKind::l2 || K == NormKind::none;
  if constexpr (fast_kind && std::is_same_v<typename Access::compute, float>) {
    const Partial r = reduce_chunk_fast<Access, K>(x, n);
    if (!r.has_nan) return r;
  }
  return reduce_chunk<Access, K>(x, n, p);
}

template <NormKind K>
Partial reduce_chunk_any(const TensorTable& table, const Chunk& c, double p) {
  Partial r{};
  dispatch_dtype(table.dtype[c.tensor], [&](auto access) {
    using A = decltype(access);
    const auto* base = reinterpret_cast<const typename A::storage*>(table.data[c.tensor]);
    r = reduce_chunk_best<A, K>(base + c.begin, c.end - c.begin, p);
  });
  return r;
}

template <NormKind K>
void tensor_stats_impl(const TensorTable& table, double p, TensorStatsOut out) {
  const ChunkPlan plan = plan_chunks(table);
  std::vector<Partial> partials(plan.chunks.size());
  parallel_for(static_cast<std::int64_t>(plan.chunks.size()), [&](std::int64_t i) {
    partials[i] = reduce_chunk_any<K>(table, plan.chunks[i], p);
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
