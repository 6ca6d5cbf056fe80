// Scale-then-clamp on the GPU, one grid over every chunk, no host sync.
//
// The coefficient is read from device memory (it is usually the result of the norm kernel that
// just ran): a chunk whose coefficient is >= 1 and that needs no clamping returns before it
// reads anything, so a clip-by-norm that does not clip costs one small launch and no traffic.
// Clamping compares magnitude bits and writes only the elements that change; NaN stays NaN.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "element_bits.cuh"
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

template <class F>
__device__ void clamp_chunk(typename F::bits_t* x, std::int64_t n, std::uint64_t bound) {
  using B = typename F::bits_t;
  constexpr B kSign = static_cast<B>(~static_cast<B>(F::kMask));
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const B bits = x[i];
    const std::uint64_t mag = static_cast<std::uint64_t>(bits) & F::kMask;
    if (mag > bound && mag <= F::kInf) x[i] = static_cast<B>((bits & kSign) | bound);
  }
}

template <class F>
__device__ void scale_clamp_chunk(typename F::bits_t* x, std::int64_t n, double coef, double bound) {
  using C = typename F::compute;
  const C k = static_cast<C>(coef), c = static_cast<C>(bound);
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    C v = F::load(x[i]) * k;
    v = v > c ? c : v;  // NaN compares false both times and stays NaN
    v = v < -c ? -c : v;
    x[i] = F::store(v);
  }
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
  const std::int64_t blocks = std::min<std::int64_t>(table.n_chunks, std::int64_t{8} * sm_count);
  clip_chunks<<<static_cast<unsigned>(blocks), kThreads, 0,
                reinterpret_cast<cudaStream_t>(stream_handle)>>>(table, coef, n_coef, bounds);
}

}  // namespace gradkern::cuda
