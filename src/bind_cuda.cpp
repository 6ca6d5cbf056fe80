// gradkern._cuda: pybind11 glue over the CUDA library. Built only when CMake finds a CUDA
// compiler; it links the CUDA runtime, which the CPU module never does. Device memory is
// allocated by torch in Python and passed here as integer addresses, with torch's current
// stream as an integer handle; nothing here allocates or synchronizes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "gradkern/cuda_ops.h"
#include "gradkern/cuda_runtime_info.h"
#include "gradkern/tensor_table.h"

#include "export_constants.h"

namespace py = pybind11;
using namespace gradkern;

namespace {

template <class T>
const T* as_ptr(std::uint64_t address) {
  return reinterpret_cast<const T*>(static_cast<std::uintptr_t>(address));
}

// table: (data, numel, dtype, chunk_tensor, chunk_begin, first_chunk, n_tensors, n_chunks)
cuda::DeviceTable device_table(const py::tuple& t) {
  if (t.size() != 8) throw std::invalid_argument("device table: expected 8 fields");
  cuda::DeviceTable d{};
  d.data = as_ptr<std::uint64_t>(t[0].cast<std::uint64_t>());
  d.numel = as_ptr<std::int64_t>(t[1].cast<std::uint64_t>());
  d.dtype = as_ptr<std::int8_t>(t[2].cast<std::uint64_t>());
  d.chunk_tensor = as_ptr<std::int64_t>(t[3].cast<std::uint64_t>());
  d.chunk_begin = as_ptr<std::int64_t>(t[4].cast<std::uint64_t>());
  d.first_chunk = as_ptr<std::int64_t>(t[5].cast<std::uint64_t>());
  d.n_tensors = t[6].cast<std::int64_t>();
  d.n_chunks = t[7].cast<std::int64_t>();
  d.chunk_elems = kChunkElems;
  return d;
}

void check_launch(const char* what) {
  const std::string err = cuda::take_last_error();
  if (!err.empty()) throw std::runtime_error(std::string(what) + ": " + err);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "gradkern CUDA kernels (multi-tensor, one launch per pass, no host sync)";
  gradkern_py::export_constants(m);
  m.attr("WORKSPACE_WORDS") = cuda::kWorkspaceWords;
  m.def("runtime_info", [] {
    const auto info = cuda::runtime_info();
    py::dict d;
    d["device_count"] = info.device_count;
    d["error"] = info.error;
    d["runtime_version"] = info.runtime_version;
    d["archs"] = info.archs;
    return d;
  });
  m.def("tensor_stats",
        [](const py::tuple& table, int kind, double p, std::uint64_t power_sum,
           std::uint64_t max_abs, std::uint64_t nonfinite, std::uint64_t zeros,
           std::uint64_t workspace, int sm_count, std::uint64_t stream) {
          if (kind < 0 || kind > 4) throw std::invalid_argument("bad norm kind");
          cuda::CudaStatsOut out{reinterpret_cast<double*>(power_sum),
                                 reinterpret_cast<double*>(max_abs),
                                 reinterpret_cast<std::int64_t*>(nonfinite),
                                 reinterpret_cast<std::int64_t*>(zeros),
                                 reinterpret_cast<void*>(workspace)};
          cuda::tensor_stats(device_table(table), static_cast<NormKind>(kind), p, out,
                             sm_count, static_cast<std::uintptr_t>(stream));
          check_launch("gradkern tensor_stats launch");
        },
        py::arg("table"), py::arg("kind"), py::arg("p"), py::arg("power_sum"),
        py::arg("max_abs"), py::arg("nonfinite"), py::arg("zeros"), py::arg("workspace"),
        py::arg("sm_count"), py::arg("stream"));
  m.def("clip_in_place",
        [](const py::tuple& table, std::uint64_t coef, std::int64_t n_coef, double clip_value,
           int sm_count, std::uint64_t stream) {
          if (clip_value != clip_value || clip_value < 0) throw std::invalid_argument("bad clip value");
          cuda::clip_in_place(device_table(table), as_ptr<double>(coef), n_coef, clip_value,
                              sm_count, static_cast<std::uintptr_t>(stream));
          check_launch("gradkern clip_in_place launch");
        },
        py::arg("table"), py::arg("coef"), py::arg("n_coef"), py::arg("clip_value"),
        py::arg("sm_count"), py::arg("stream"));
}
