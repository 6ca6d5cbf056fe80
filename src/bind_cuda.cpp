// gradkern._cuda: pybind11 glue over the CUDA library. Built only when CMake finds a CUDA
// compiler; it links the CUDA runtime, which the CPU module never does.
#include <pybind11/pybind11.h>

#include "gradkern/cuda_runtime_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "gradkern CUDA module";
  m.def("runtime_info", [] {
    const auto info = gradkern::cuda::runtime_info();
    py::dict d;
    d["device_count"] = info.device_count;
    d["error"] = info.error;
    d["runtime_version"] = info.runtime_version;
    d["archs"] = info.archs;
    return d;
  });
}
