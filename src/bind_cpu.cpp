// gradkern._cpu: pybind11 glue over the CPU kernel library. Validation happens in Python before
// anything reaches here; this file only converts arrays and releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>

#include "gradkern/build_info.h"
#include "gradkern/ops.h"
#include "python_tensor_table.h"

namespace py = pybind11;
using namespace gradkern;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

TensorTable make_table(const Array<std::uint64_t>& data, const Array<std::int64_t>& numel,
                       const Array<std::int8_t>& dtype) {
  const auto n = static_cast<std::int64_t>(data.size());
  if (numel.size() != n || dtype.size() != n) {
    throw std::invalid_argument("tensor table arrays differ in length");
  }
  for (std::int64_t t = 0; t < n; ++t) {
    if (dtype.data()[t] < 0 || dtype.data()[t] > 3) throw std::invalid_argument("bad dtype code");
    if (numel.data()[t] < 0) throw std::invalid_argument("negative element count");
  }
  return TensorTable{data.data(), numel.data(), dtype.data(), n};
}

template <class T>
T* writable(py::array_t<T>& a, py::ssize_t n, const char* what) {
  if (a.size() != n || !(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(what) + ": expected a contiguous array of table size");
  }
  return a.mutable_data();
}

void py_tensor_stats(const Array<std::uint64_t>& data, const Array<std::int64_t>& numel,
                     const Array<std::int8_t>& dtype, int kind, double p,
                     py::array_t<double> power_sum, py::array_t<double> max_abs,
                     py::array_t<std::int64_t> nonfinite, py::array_t<std::int64_t> zeros) {
  const TensorTable table = make_table(data, numel, dtype);
  if (kind < 0 || kind > 4) throw std::invalid_argument("bad norm kind");
  TensorStatsOut out{writable(power_sum, table.size, "power_sum"),
                     writable(max_abs, table.size, "max_abs"),
                     writable(nonfinite, table.size, "nonfinite"),
                     writable(zeros, table.size, "zeros")};
  py::gil_scoped_release release;
  tensor_stats(table, static_cast<NormKind>(kind), p, out);
}

void py_clip_in_place(const Array<std::uint64_t>& data, const Array<std::int64_t>& numel,
                      const Array<std::int8_t>& dtype, py::object coef, double clip_value) {
  const TensorTable table = make_table(data, numel, dtype);
  if (std::isnan(clip_value) || clip_value < 0) throw std::invalid_argument("bad clip value");
  Array<double> coef_array;
  const double* coef_ptr = nullptr;
  std::int64_t n_coef = 0;
  if (!coef.is_none()) {
    coef_array = coef.cast<Array<double>>();
    n_coef = static_cast<std::int64_t>(coef_array.size());
    if (n_coef != 1 && n_coef != table.size) {
      throw std::invalid_argument("coef must hold 1 entry or one per tensor");
    }
    coef_ptr = coef_array.data();
  }
  py::gil_scoped_release release;
  clip_in_place(table, coef_ptr, n_coef, clip_value);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "gradkern CPU kernels (C++, OpenMP when available)";
  m.attr("CHUNK_ELEMS") = kChunkElems;
  m.def("tensor_stats", &py_tensor_stats, py::arg("data"), py::arg("numel"), py::arg("dtype"),
        py::arg("kind"), py::arg("p"), py::arg("power_sum"), py::arg("max_abs"),
        py::arg("nonfinite"), py::arg("zeros"),
        "One read pass: per-tensor power sum, max |g|, non-finite and zero counts.");
  m.def("clip_in_place", &py_clip_in_place, py::arg("data"), py::arg("numel"), py::arg("dtype"),
        py::arg("coef"), py::arg("clip_value"),
        "Scale each tensor by its coefficient when < 1, then clamp to +-clip_value.");
  m.def("read_tensor_table", &gradkern_py::read_tensor_table, py::arg("tensors"),
        py::arg("tensor_type"), py::arg("dtypes"), py::arg("device_flag"),
        py::arg("device_index"),
        "(data, numel, codes, ok) of a list of torch tensors, read in one C loop; ok is False "
        "where a tensor needs the general Python path.");
  m.def("build_info", [] {
    const BuildInfo b = build_info();
    py::dict d;
    d["compiler"] = b.compiler;
    d["flags"] = b.flags;
    d["openmp"] = b.openmp;
    d["simd"] = b.simd;
    d["kernel_isas"] = b.kernel_isas;
    d["active_isa"] = b.active_isa;
    d["max_threads"] = b.max_threads;
    return d;
  });
}
