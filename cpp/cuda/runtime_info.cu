#include <cuda_runtime.h>

#include "gradkern/cuda_runtime_info.h"

#ifndef GRADKERN_CUDA_ARCHS
#define GRADKERN_CUDA_ARCHS "unknown"
#endif

namespace gradkern::cuda {

RuntimeInfo runtime_info() {
  RuntimeInfo info{0, "", CUDART_VERSION, GRADKERN_CUDA_ARCHS};
  const cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
  }
  return info;
}

}  // namespace gradkern::cuda
