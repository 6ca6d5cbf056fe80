// Fused per-tensor statistics in one read pass: a power sum for the norm, max |g|, the count of
// non-finite values and the count of exact zeros.
//
// Each chunk is reduced with kLanes independent accumulators (so the compiler can vectorize
// without being allowed to reassociate), the lanes are folded in a fixed order, and the chunks of
// a tensor are folded in chunk order: the result is identical run to run and for any thread count.
// Chunk partials are fp64 whatever the input dtype (the fast loop adds fp32, fp16 and bf16 power
// terms in runs of 8 per lane in fp32 first: see cpp/cpu/isa/fast_kernels.cpp).
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
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

// The common kinds (p = 1, 2, inf, 0) take the vectorized loop of cpp/cpu/isa/fast_kernels.cpp
// (the same lanes; fp32 runs for narrow formats, within 4.8e-7 of reduce_chunk). A chunk the
// loop cannot vouch for (NaN or inf, or magnitudes outside its fp32 range) is re-reduced here
// exactly while it is still in cache.
template <class Access, NormKind K>
Partial reduce_chunk_best(const FastKernels& fast, std::int8_t dtype,
                          const typename Access::storage* x, std::int64_t n, double p) {
  if constexpr (has_fast_stats(K)) {
    const FastStats f = fast.stats[dtype][static_cast<int>(K)](x, n);
    if (f.usable) return Partial{f.power_sum, f.max_abs, 0, f.zeros, false};
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

// Folds the partial of the next chunk of a tensor into r. Chunks are always folded in order.
template <NormKind K>
inline void fold(Partial& r, const Partial& c) {
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

template <NormKind K>
constexpr Partial empty_partial() {
  return Partial{power_identity<K>(), 0.0, 0, 0, false};
}

inline void write(const Partial& r, std::int64_t t, TensorStatsOut out) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  out.power_sum[t] = r.has_nan ? kNaN : r.power_sum;
  out.max_abs[t] = r.has_nan ? kNaN : r.max_abs;
  out.nonfinite[t] = r.nonfinite;
  out.zeros[t] = r.zeros;
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
  for (std::int64_t t = 0; t < table.size; ++t) {
    Partial r = empty_partial<K>();
    for (std::int64_t i = plan.first_chunk[t]; i < plan.first_chunk[t + 1]; ++i) {
      fold<K>(r, partials[i]);
    }
    write(r, t, out);
  }
}

// ---- the same statistics while the table is still being read ---------------------------------
//
// For thousands of small tensors, reading the table from Python is a good part of the work (a
// third of the reduction when rows are read directly, more than all of it through torch's
// getters), and only the calling thread can read it. So the caller reads and publishes rows while
// the other threads reduce what is published; once the table is read the caller reduces too.
// Each small tensor is reduced whole by one thread, chunk by chunk in order, exactly as
// tensor_stats_impl folds it, so the results are the same bits. Tensors of more than one chunk
// wait for the chunk-parallel pass after the read, so one large tensor never runs on one thread.

// Below this many rows the table is read first (a few us per hundred rows), then reduced: the
// pass then knows its size, and a small one (a small model's gradients) stays on the calling
// thread instead of waking the others (see kMinParallelRanges). A model of a few hundred
// parameter tensors loses only the overlap of that short read.
constexpr std::int64_t kStreamMinRows = 512;
constexpr std::int64_t kPublishRows = 16;     // rows the reader reads between publications
// Rows a reducer takes at a time. Only the last kTensorsAhead of them have their data prefetched
// in time, and each claim moves `claimed` between cores: on 10,000 x 1,000 fp32, get_total_norm
// took 3.1-3.6 ms with 32 and 3.7-4.5 ms with 8 (2-core EPYC VM, runs alternated).
constexpr std::int64_t kClaimRows = 32;
constexpr std::int64_t kTensorsAhead = 4;     // data prefetch distance, in tensors

inline bool streamed(const TensorTable& table, std::int64_t t) {
  return table.numel[t] <= kChunkElems;
}

template <NormKind K>
void reduce_streamed_rows(const FastKernels& fast, const TensorTable& table, double p,
                          std::int64_t begin, std::int64_t end, TensorStatsOut out) {
  for (std::int64_t t = begin; t < end; ++t) {
    if (t + kTensorsAhead < end) prefetch_tensor(table, t + kTensorsAhead);
    if (!streamed(table, t)) continue;
    Partial r = empty_partial<K>();
    if (table.numel[t] > 0) fold<K>(r, reduce_chunk_any<K>(fast, table, {t, 0, table.numel[t]}, p));
    write(r, t, out);
  }
}

// The rows the stream left out (more than one chunk), reduced chunk-parallel as a table of their
// own and written back to their places.
template <NormKind K>
void reduce_large_rows(const TensorTable& table, double p, TensorStatsOut out) {
  std::vector<std::int64_t> rows;
  for (std::int64_t t = 0; t < table.size; ++t) {
    if (!streamed(table, t)) rows.push_back(t);
  }
  if (rows.empty()) return;
  const auto n = static_cast<std::int64_t>(rows.size());
  std::vector<std::uint64_t> data(n);
  std::vector<std::int64_t> numel(n), nonfinite(n), zeros(n);
  std::vector<std::int8_t> dtype(n);
  std::vector<double> power_sum(n), max_abs(n);
  for (std::int64_t i = 0; i < n; ++i) {
    data[i] = table.data[rows[i]];
    numel[i] = table.numel[rows[i]];
    dtype[i] = table.dtype[rows[i]];
  }
  tensor_stats_impl<K>(TensorTable{data.data(), numel.data(), dtype.data(), n}, p,
                       TensorStatsOut{power_sum.data(), max_abs.data(), nonfinite.data(),
                                      zeros.data()});
  for (std::int64_t i = 0; i < n; ++i) {
    out.power_sum[rows[i]] = power_sum[i];
    out.max_abs[rows[i]] = max_abs[i];
    out.nonfinite[rows[i]] = nonfinite[i];
    out.zeros[rows[i]] = zeros[i];
  }
}

template <NormKind K>
bool tensor_stats_streaming_impl(TableSource& source, const TensorTable& table, double p,
                                 TensorStatsOut out) {
  const std::int64_t n = table.size;
  // On shared cores the table is read first too: the pass then knows its size, and the size
  // decides whether helpers are worth waiting for (see kMinParallelRangesShared).
  if (max_threads() < 2 || n < kStreamMinRows || cpu_shared()) {
    const bool complete = source.fill(0, n) == n;
    source.done();
    if (complete) tensor_stats_impl<K>(table, p, out);
    return complete;
  }
  const FastKernels& fast = fast_kernels();
  std::atomic<std::int64_t> published{0};  // rows [0, published) are read and valid
  std::atomic<std::int64_t> claimed{0};    // rows [0, claimed) are taken by a reducer
  std::atomic<bool> reading{true};
  bool complete = true;
  run_with_helpers(
      [&] {  // the calling thread: read, then help reduce
        for (std::int64_t b = 0; b < n; b += kPublishRows) {
          const std::int64_t e = b + kPublishRows < n ? b + kPublishRows : n;
          if (source.fill(b, e) != e - b) {
            complete = false;
            break;
          }
          published.store(e, std::memory_order_release);
        }
        reading.store(false, std::memory_order_release);
        source.done();
      },
      [&] {  // every thread, the caller after its reading: reduce published rows until none is left
        SpinWait wait;
        for (;;) {
          const bool more_coming = reading.load(std::memory_order_acquire);
          const std::int64_t ready = published.load(std::memory_order_acquire);
          std::int64_t begin = claimed.load(std::memory_order_relaxed);
          if (begin >= ready) {
            if (!more_coming) return;
            wait();
            continue;
          }
          const std::int64_t end = begin + kClaimRows < ready ? begin + kClaimRows : ready;
          if (claimed.compare_exchange_weak(begin, end, std::memory_order_relaxed)) {
            reduce_streamed_rows<K>(fast, table, p, begin, end, out);
            wait.reset();
          }
        }
      });
  if (!complete) return false;
  reduce_large_rows<K>(table, p, out);
  return true;
}

// Calls fn(std::integral_constant<NormKind, K>{}) for the K that kind names.
template <class Fn>
auto with_kind(NormKind kind, const Fn& fn) {
  switch (kind) {
    case NormKind::l1: return fn(std::integral_constant<NormKind, NormKind::l1>{});
    case NormKind::l2: return fn(std::integral_constant<NormKind, NormKind::l2>{});
    case NormKind::min_abs: return fn(std::integral_constant<NormKind, NormKind::min_abs>{});
    case NormKind::power: return fn(std::integral_constant<NormKind, NormKind::power>{});
    case NormKind::none: break;
  }
  return fn(std::integral_constant<NormKind, NormKind::none>{});
}

}  // namespace

void tensor_stats(const TensorTable& table, NormKind kind, double p, TensorStatsOut out) {
  with_kind(kind, [&](auto k) { tensor_stats_impl<decltype(k)::value>(table, p, out); });
}

bool tensor_stats_streaming(TableSource& source, const TensorTable& table, NormKind kind,
                            double p, TensorStatsOut out) {
  return with_kind(kind, [&](auto k) {
    return tensor_stats_streaming_impl<decltype(k)::value>(source, table, p, out);
  });
}

}  // namespace gradkern
