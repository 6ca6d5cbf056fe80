// What the CUDA module was built for and what it finds at run time. Plain C++ types only, so
// that the binding never needs CUDA headers and the .cu files never need pybind11.
#pragma once

#include <string>

namespace gradkern::cuda {

struct RuntimeInfo {
  int device_count;        // 0 when no usable GPU/driver
  std::string error;       // why device_count is 0, if it is
  int runtime_version;     // CUDART_VERSION the module was built with
  std::string archs;       // the architectures compiled in, e.g. "80-real;90"
};

RuntimeInfo runtime_info();

}  // namespace gradkern::cuda
