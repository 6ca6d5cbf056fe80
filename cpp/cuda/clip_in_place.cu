// Scale-then-clamp on the GPU, one grid over every chunk, no host sync.
//
// The coefficient is read from device memory (it is usually the result of the norm kernel that
// just ran): a chunk whose coefficient is >= 1 and that needs no clamping returns before it
// reads anything, so a clip-by-norm that does not clip costs one small launch and no traffic.
// Clamping compares magnitude bits and stores only the 16-byte vectors (or, in a tail, the
// elements) that change; NaN stays NaN.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "element_bits.cuh"
#include "persistent_grid.cuh"
#include "gradkern/cuda_ops.h"
#include "gradkern/low_precision.h"

namespace gradkern::cuda {
namespace {

constexpr int kThreads = 256;

// clip_value as each dtype's nearest value (what torch's clamp compares against): the magnitude
// bits for the clamp-only path and the value for the scale path. Index: DType code.
struct Bounds {
  std::uint64_t bits[4];
  double value[4];
  bool clamp;
};

Bounds make_bounds(double clip_value) {
  Bounds b{};
  b.clamp = !std::isinf(clip_value);
  const float f = static_cast<float>(clip_value);
  b.value[0] = f;
  b.bits[0] = float_to_bits(f) & 0x7fffffffu;
  b.value[1] = clip_value;
  std::uint64_t d;
  std::memcpy(&d, &clip_value, sizeof d);
  b.bits[1] = d & 0x7fffffffffffffffull;
  const std::uint16_t h = float_to_f16(f), bf = float_to_bf16(f);
  b.bits[2] = h & 0x7fffu;
  b.value[2] = f16_to_float(h);
  b.bits[3] = bf & 0x7fffu;
  b.value[3] = bf16_to_float(bf);
  if (!b.clamp) {
    for (double& v : b.value) v = std::numeric_limits<double>::infinity();
  }
  return b;
}

// x[i] = op(x[i]) for i in [0, n), this thread's share, through 16-byte loads where x is
// aligned (one 2-byte access per bf16 element would take eight times the instructions). A vector
// is stored only when one of its elements changed, an element of the tail only when it changed.
template <class B, class Op>
__device__ void update_chunk(B* x, std::int64_t n, const Op& op) {
  constexpr int kVec = 16 / sizeof(B);
  std::int64_t done = 0;
  if ((reinterpret_cast<std::uintptr_t>(x) & 15) == 0) {
    const std::int64_t n_vec = n / kVec;
    uint4* v = reinterpret_cast<uint4*>(x);
    for (std::int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
      uint4 w = v[i];
      B lanes[kVec];
      memcpy(lanes, &w, sizeof w);
      bool changed = false;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const B out = op(lanes[j]);
        changed |= out != lanes[j];
        lanes[j] = out;
      }
      if (changed) {
        memcpy(&w, lanes, sizeof w);
        v[i] = w;
      }
    }
    done = n_vec * kVec;
  }
  for (std::int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    const B bits = x[i];
    const B out = op(bits);
    if (out != bits) x[i] = out;
  }
}

template <class F>
__device__ void clamp_chunk(typename F::bits_t* x, std::int64_t n, std::uint64_t bound) {
  using B = typename F::bits_t;
  constexpr B kSign = static_cast<B>(~static_cast<B>(F::kMask));
  const B limit = static_cast<B>(bound);
  update_chunk(x, n, [limit](B bits) -> B {
    const B mag = bits & static_cast<B>(F::kMask);
    return mag > limit && mag <= static_cast<B>(F::kInf) ? static_cast<B>((bits & kSign) | limit)
                                                           : bits;
  });
}

template <class F>
__device__ void scale_clamp_chunk(typename F::bits_t* x, std::int64_t n, double coef, double bound) {
  using B = typename F::bits_t;
  using C = typename F::compute;
  const C k = static_cast<C>(coef), c = static_cast<C>(bound);
  update_chunk(x, n, [k, c](B bits) -> B {
    C v = F::load(bits) * k;
    v = v > c ? c : v;  // NaN compares false both times and stays NaN
    v = v < -c ? -c : v;
    return F::store(v);
  });
}

__global__ void __launch_bounds__(kThreads)
clip_chunks(DeviceTable t, const double* coef, std::int64_t n_coef, Bounds bounds) {
  for (std::int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const std::int64_t tensor = t.chunk_tensor[c];
    const double k = n_coef == 0 ? 1.0 : coef[n_coef == 1 ? 0 : tensor];
    const bool scale = !(k >= 1.0);  // a NaN coefficient scales, poisoning the tensor as torch does
    if (!scale && !bounds.clamp) continue;
    const std::int64_t begin = t.chunk_begin[c];
    const std::int64_t n = min(begin + t.chunk_elems, t.numel[tensor]) - begin;
    const std::int8_t code = t.dtype[tensor];
    with_format(code, [&](auto fmt) {
      using F = decltype(fmt);
      auto* x = reinterpret_cast<typename F::bits_t*>(t.data[tensor]) + begin;
      if (scale) {
        scale_clamp_chunk<F>(x, n, k, bounds.value[code]);
      } else {
        clamp_chunk<F>(x, n, bounds.bits[code]);
      }
    });
  }
}

}  // namespace

void clip_in_place(const DeviceTable& table, const double* coef, std::int64_t n_coef,
                   double clip_value, int sm_count, std::uintptr_t stream_handle) {
  if (table.n_chunks == 0) return;
  const Bounds bounds = make_bounds(clip_value);
  if (n_coef == 0 && !bounds.clamp) return;
  static const int per_sm = resident_blocks_per_sm(clip_chunks, kThreads);
  const std::int64_t blocks = persistent_grid(per_sm, sm_count, table.n_chunks);
  clip_chunks<<<static_cast<unsigned>(blocks), kThreads, 0,
                reinterpret_cast<cudaStream_t>(stream_handle)>>>(table, coef, n_coef, bounds);
}

}  // namespace gradkern::cuda
