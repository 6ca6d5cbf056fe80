// Fused per-tensor statistics on the GPU: one launch reads every chunk of every tensor once,
// a second (tiny) launch folds the chunk partials of each tensor in chunk order.
//
// Pass 1 is a persistent grid: block b takes chunks b, b + gridDim.x, ... Each thread
// accumulates a fixed, strided subset of its chunk (16-byte vector loads when the chunk is
// aligned), then the block combines its threads in a fixed tree. Pass 2 gives each tensor one
// warp: lane j folds chunks j, j + 32, ... and the warp combines in a fixed tree. No float
// atomics anywhere: results depend only on the table, so they are bitwise reproducible.
// Power sums accumulate in fp64 for every dtype.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "element_bits.cuh"
#include "persistent_grid.cuh"
#include "gradkern/cuda_ops.h"

namespace gradkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr std::uint64_t kNoMin = ~std::uint64_t{0};

struct Partial {
  double acc;             // power sum (l1, l2, power)
  std::uint64_t top;      // max magnitude bits
  std::uint64_t low;      // min magnitude bits (min_abs)
  long long nonfinite;
  long long zeros;
};

__device__ Partial identity() { return Partial{0.0, 0, kNoMin, 0, 0}; }

__device__ Partial combine(Partial a, const Partial& b) {
  a.acc += b.acc;
  a.top = b.top > a.top ? b.top : a.top;
  a.low = b.low < a.low ? b.low : a.low;
  a.nonfinite += b.nonfinite;
  a.zeros += b.zeros;
  return a;
}

__device__ Partial shuffle_down(const Partial& p, int offset) {
  Partial q;
  q.acc = __shfl_down_sync(0xffffffffu, p.acc, offset);
  q.top = __shfl_down_sync(0xffffffffu, p.top, offset);
  q.low = __shfl_down_sync(0xffffffffu, p.low, offset);
  q.nonfinite = __shfl_down_sync(0xffffffffu, p.nonfinite, offset);
  q.zeros = __shfl_down_sync(0xffffffffu, p.zeros, offset);
  return q;
}

// Lane 0 ends with the fold of the warp, always in the same tree order.
__device__ Partial warp_reduce(Partial p) {
  for (int offset = 16; offset > 0; offset /= 2) p = combine(p, shuffle_down(p, offset));
  return p;
}

// One thread's statistics over its share of one chunk, kept in the format's own width: 32-bit
// magnitudes for fp32/fp16/bf16 and 32-bit counts (a chunk has at most 2^16 elements). 64-bit
// integer compares and adds are several instructions each on a GPU, and with eight bf16 values
// per 16-byte load the per-element work, not memory, set the pace. The minimum magnitude is
// tracked only for the -inf norm, the one kind that reads it.
template <class F, NormKind K>
struct ThreadStats {
  using Mag = std::conditional_t<sizeof(typename F::bits_t) == 8, std::uint64_t, std::uint32_t>;
  static constexpr Mag kMask = static_cast<Mag>(F::kMask), kInf = static_cast<Mag>(F::kInf);
  static constexpr Mag kNone = ~Mag{0};

  double acc = 0.0;
  Mag top = 0, low = kNone;
  unsigned nonfinite = 0, zeros = 0;

  __device__ void add(typename F::bits_t bits, double p) {
    const Mag mag = static_cast<Mag>(bits) & kMask;
    top = mag > top ? mag : top;
    if constexpr (K == NormKind::min_abs) low = mag < low ? mag : low;
    nonfinite += mag >= kInf;
    zeros += mag == 0;
    if constexpr (K == NormKind::l1 || K == NormKind::l2 || K == NormKind::power) {
      const double v = F::value(mag);
      if constexpr (K == NormKind::l1) acc += v;
      if constexpr (K == NormKind::l2) acc += v * v;
      if constexpr (K == NormKind::power) acc += pow(v, p);
    }
  }

  __device__ void add_vector(const uint4& w, double p) {
    using B = typename F::bits_t;
    constexpr int kLanes = 16 / sizeof(B);
    B lanes[kLanes];
    memcpy(lanes, &w, sizeof w);
#pragma unroll
    for (int j = 0; j < kLanes; ++j) add(lanes[j], p);
  }

  __device__ Partial widen() const {
    return Partial{acc, top, low == kNone ? kNoMin : low, nonfinite, zeros};
  }
};

template <class F, NormKind K>
__device__ Partial thread_partial(const void* base, std::int64_t begin, std::int64_t n, double p) {
  using B = typename F::bits_t;
  const B* x = static_cast<const B*>(base) + begin;
  ThreadStats<F, K> s;
  constexpr int kVec = 16 / sizeof(B);
  std::int64_t done = 0;
  if ((reinterpret_cast<std::uintptr_t>(x) & 15) == 0) {
    const std::int64_t n_vec = n / kVec;
    const uint4* v = reinterpret_cast<const uint4*>(x);
    const std::int64_t stride = blockDim.x;
    std::int64_t i = threadIdx.x;
    // Two loads in flight per thread before either is used; the elements are still added in
    // the same order as one vector at a time.
    for (; i + stride < n_vec; i += 2 * stride) {
      const uint4 w0 = __ldg(v + i), w1 = __ldg(v + i + stride);
      s.add_vector(w0, p);
      s.add_vector(w1, p);
    }
    if (i < n_vec) s.add_vector(__ldg(v + i), p);
    done = n_vec * kVec;
  }
  for (std::int64_t i = done + threadIdx.x; i < n; i += blockDim.x) s.add(x[i], p);
  return s.widen();
}

template <NormKind K>
__global__ void __launch_bounds__(kThreads) chunk_partials(DeviceTable t, double p, Partial* out) {
  __shared__ Partial warp_sums[kThreads / 32];
  for (std::int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const std::int64_t tensor = t.chunk_tensor[c];
    const std::int64_t begin = t.chunk_begin[c];
    const std::int64_t end = min(begin + t.chunk_elems, t.numel[tensor]);
    const void* base = reinterpret_cast<const void*>(t.data[tensor]);
    Partial s = identity();
    with_format(t.dtype[tensor], [&](auto fmt) {
      s = thread_partial<decltype(fmt), K>(base, begin, end - begin, p);
    });
    s = warp_reduce(s);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      Partial total = identity();
      for (int w = 0; w < kThreads / 32; ++w) total = combine(total, warp_sums[w]);
      out[c] = total;
    }
    __syncthreads();  // warp_sums is reused by the next chunk
  }
}

template <NormKind K>
__global__ void fold_tensors(DeviceTable t, const Partial* parts, CudaStatsOut out) {
  const std::int64_t tensor = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (tensor >= t.n_tensors) return;  // whole warps exit together
  Partial s = identity();
  for (std::int64_t c = t.first_chunk[tensor] + lane; c < t.first_chunk[tensor + 1]; c += 32) {
    s = combine(s, parts[c]);
  }
  s = warp_reduce(s);
  if (lane != 0) return;
  with_format(t.dtype[tensor], [&](auto fmt) {
    using F = decltype(fmt);
    const bool has_nan = s.top > F::kInf;
    const double nan = __longlong_as_double(0x7ff8000000000000ll);
    double power = s.acc;
    if constexpr (K == NormKind::min_abs) {
      power = s.low == kNoMin ? __longlong_as_double(0x7ff0000000000000ll) : F::value(s.low);
    }
    if constexpr (K == NormKind::none) power = 0.0;
    out.power_sum[tensor] = has_nan ? nan : power;
    out.max_abs[tensor] = has_nan ? nan : F::value(s.top);
    out.nonfinite[tensor] = s.nonfinite;
    out.zeros[tensor] = s.zeros;
  });
}

template <NormKind K>
void launch(const DeviceTable& t, double p, CudaStatsOut out, int sm_count, cudaStream_t stream) {
  auto* parts = static_cast<Partial*>(out.workspace);
  if (t.n_chunks > 0) {
    static const int per_sm = resident_blocks_per_sm(chunk_partials<K>, kThreads);
    const std::int64_t blocks = persistent_grid(per_sm, sm_count, t.n_chunks);
    chunk_partials<K><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(t, p, parts);
  }
  if (t.n_tensors > 0) {
    const std::int64_t warps_per_block = kThreads / 32;
    const std::int64_t blocks = (t.n_tensors + warps_per_block - 1) / warps_per_block;
    fold_tensors<K><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(t, parts, out);
  }
}

}  // namespace

static_assert(sizeof(Partial) == 40, "workspace is 5 words per chunk");

void tensor_stats(const DeviceTable& table, NormKind kind, double p, CudaStatsOut out,
                  int sm_count, std::uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (kind) {
    case NormKind::none: launch<NormKind::none>(table, p, out, sm_count, stream); break;
    case NormKind::l1: launch<NormKind::l1>(table, p, out, sm_count, stream); break;
    case NormKind::l2: launch<NormKind::l2>(table, p, out, sm_count, stream); break;
    case NormKind::min_abs: launch<NormKind::min_abs>(table, p, out, sm_count, stream); break;
    case NormKind::power: launch<NormKind::power>(table, p, out, sm_count, stream); break;
  }
}

const char* take_last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace gradkern::cuda
