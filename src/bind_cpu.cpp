// gradkern._cpu: pybind11 glue over the CPU kernel library. Validation happens in Python before
// anything reaches here; this file only converts arrays and releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "gradkern/build_info.h"
#include "gradkern/cpu_share.h"
#include "gradkern/ops.h"
#include "export_constants.h"
#include "python_tensor_table.h"
#include "torch_layout.h"

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

// The number of work items the chunk plan packs tensors of these sizes into: what the passes
// count when they decide whether a team is worth waking (gradkern/parallel.h), and what the
// Numba fallback counts too (its twin is tested against this).
std::int64_t py_work_items(const Array<std::int64_t>& numel) {
  for (std::int64_t t = 0; t < static_cast<std::int64_t>(numel.size()); ++t) {
    if (numel.data()[t] < 0) throw std::invalid_argument("negative element count");
  }
  const TensorTable table{nullptr, numel.data(), nullptr, static_cast<std::int64_t>(numel.size())};
  return plan_chunks(table).n_items();
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

// Feeds tensor_stats_streaming from a list of tensors. Rows are read with the GIL held, on the
// calling thread as the kernel requires; once every row is read the GIL is released, since the
// rest of the pass touches no Python object.
class ListTableSource final : public TableSource {
 public:
  ListTableSource(const gradkern_py::TensorTableReader& reader,
                  const gradkern_py::FastSequence& seq, gradkern_py::TableColumns& table)
      : reader_(reader), seq_(seq), table_(table) {}

  std::int64_t fill(std::int64_t begin, std::int64_t end) override {
    for (std::int64_t i = begin; i < end; ++i) {
      gradkern_py::TableRow row{0, 0, -1};
      if (!reader_.read_row(seq_.items, seq_.size, i, row)) return i - begin;
      table_.set(i, row);
    }
    return end - begin;
  }

  ~ListTableSource() override { reacquire_gil(); }  // also when the pass throws

  void done() override { released_ = PyEval_SaveThread(); }

  void reacquire_gil() {
    if (released_ != nullptr) PyEval_RestoreThread(released_);
    released_ = nullptr;
  }

 private:
  const gradkern_py::TensorTableReader& reader_;
  const gradkern_py::FastSequence& seq_;
  gradkern_py::TableColumns& table_;
  PyThreadState* released_ = nullptr;
};

// (data, numel, codes, ok, dtype_mask) of a list of CPU tensors, like read_tensor_table, with
// their statistics written to the four arrays in the same call: the pass starts on the first rows
// while the later ones are still being read. ok is False (and the statistics meaningless) unless
// every tensor is one the table reader accepts.
py::tuple py_read_tensor_stats(py::sequence tensors, py::handle tensor_type, py::tuple dtypes,
                               const gradkern_py::TorchLayout& layout, int kind, double p,
                               py::array_t<double> power_sum, py::array_t<double> max_abs,
                               py::array_t<std::int64_t> nonfinite,
                               py::array_t<std::int64_t> zeros) {
  if (kind < 0 || kind > 4) throw std::invalid_argument("bad norm kind");
  const gradkern_py::TensorTableReader reader(tensor_type, dtypes, "is_cpu", -1, layout);
  const gradkern_py::FastSequence seq(tensors);
  const Py_ssize_t n = seq.size;
  const TensorStatsOut out{writable(power_sum, n, "power_sum"), writable(max_abs, n, "max_abs"),
                           writable(nonfinite, n, "nonfinite"), writable(zeros, n, "zeros")};
  gradkern_py::TableColumns columns(n);
  ListTableSource source(reader, seq, columns);
  const TensorTable table{columns.data.data(), columns.numel.data(), columns.codes.data(), n};
  const bool ok = tensor_stats_streaming(source, table, static_cast<NormKind>(kind), p, out);
  source.reacquire_gil();
  return py::make_tuple(columns.data, columns.numel, columns.codes, ok, columns.dtype_mask);
}


// The layout of objects of tensor_type: impl (torch's `_cdata` offset in the object, -1 unknown)
// and, when `direct` is a dict of the fields gradkern/_torch_layout.py found, direct reads.
// Checks that every offset lies where the fields it names can be: the TensorImpl fields before
// its dispatch key set (torch's last member), the StorageImpl fields in its first 256 bytes.
gradkern_py::TorchLayout make_torch_layout(py::handle tensor_type, Py_ssize_t impl,
                                           const py::object& direct) {
  gradkern_py::TorchLayout layout;
  layout.tensor_type = gradkern_py::checked_type(tensor_type);
  const Py_ssize_t object_size = reinterpret_cast<PyTypeObject*>(tensor_type.ptr())->tp_basicsize;
  const bool impl_fits = impl >= static_cast<Py_ssize_t>(sizeof(PyObject)) &&
                         impl % static_cast<Py_ssize_t>(sizeof(void*)) == 0 &&
                         impl + static_cast<Py_ssize_t>(sizeof(void*)) <= object_size;
  layout.impl = impl_fits ? impl : -1;
  if (direct.is_none()) return layout;
  if (!impl_fits) throw py::value_error("direct reads need the TensorImpl offset");
  const auto fields = direct.cast<py::dict>();
  auto get = [&](const char* name) {
    if (!fields.contains(name)) throw py::value_error(std::string("missing field ") + name);
    return fields[name].cast<std::uint64_t>();
  };
  auto offset = [&](const char* name, Py_ssize_t align, Py_ssize_t end) {
    const auto at = static_cast<Py_ssize_t>(get(name));
    if (at < 8 || at % align != 0 || at + align > end) {
      throw py::value_error(std::string("implausible offset for ") + name);
    }
    return at;
  };
  constexpr Py_ssize_t kImplLimit = 512, kStorageLimit = 256;
  layout.vtable = get("vtable");
  layout.key_set = get("key_set");
  layout.key_set_at = offset("key_set_at", 8, kImplLimit);
  const Py_ssize_t key_set_end = layout.key_set_at;
  layout.storage_at = offset("storage_at", 8, key_set_end);
  layout.storage_offset_at = offset("storage_offset_at", 8, key_set_end);
  layout.numel_at = offset("numel_at", 8, key_set_end);
  layout.dtype_at = offset("dtype_at", 2, key_set_end);
  layout.contiguous_byte = offset("contiguous_byte", 1, key_set_end);
  layout.contiguous_mask = static_cast<std::uint8_t>(get("contiguous_mask"));
  layout.data_at = offset("data_at", 8, kStorageLimit);
  layout.nbytes_at = offset("nbytes_at", 8, kStorageLimit);
  layout.checks_at = offset("checks_at", 8, kStorageLimit);
  layout.checks_mask = get("checks_mask");
  const unsigned mask = layout.contiguous_mask;
  if (mask == 0 || (mask & (mask - 1)) != 0 || layout.checks_mask == 0) {
    throw py::value_error("contiguous_mask must be one bit and checks_mask not empty");
  }
  layout.direct = true;
  return layout;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "gradkern CPU kernels (C++, OpenMP when available)";
  gradkern_py::export_constants(m);
  m.def("tensor_stats", &py_tensor_stats, py::arg("data"), py::arg("numel"), py::arg("dtype"),
        py::arg("kind"), py::arg("p"), py::arg("power_sum"), py::arg("max_abs"),
        py::arg("nonfinite"), py::arg("zeros"),
        "One read pass: per-tensor power sum, max |g|, non-finite and zero counts.");
  m.def("clip_in_place", &py_clip_in_place, py::arg("data"), py::arg("numel"), py::arg("dtype"),
        py::arg("coef"), py::arg("clip_value"),
        "Scale each tensor by its coefficient when < 1, then clamp to +-clip_value.");
  m.def("work_items", &py_work_items, py::arg("numel"),
        "How many work items the chunk plan packs tensors of these element counts into.");
  using gradkern_py::TorchLayout;
  py::class_<TorchLayout>(m, "TorchLayout",
                          "Where torch keeps a tensor's metadata (see gradkern/_torch_layout.py).")
      .def(py::init(&make_torch_layout), py::arg("tensor_type"), py::arg("impl"),
           py::arg("direct") = py::none(), py::keep_alive<1, 2>(),
           "impl: the TensorImpl pointer's offset in the tensor object (-1: unknown). direct: "
           "the offsets that let CPU rows be read without torch's getters, or None.")
      .def_readonly("impl", &TorchLayout::impl)
      .def_readonly("direct", &TorchLayout::direct)
      .def_readonly("device_at", &TorchLayout::device_at)
      .def_readonly("vtable", &TorchLayout::vtable)
      .def_readonly("key_set", &TorchLayout::key_set)
      .def_readonly("device", &TorchLayout::device)
      .def(
          "for_device",
          [](const TorchLayout& layout, std::uint64_t vtable, std::uint64_t key_set,
             Py_ssize_t device_at, std::uint16_t device) {
            if (!layout.direct) throw py::value_error("for_device needs a layout with direct reads");
            if (device_at < 8 || device_at + 2 > layout.key_set_at) {
              throw py::value_error("implausible offset for the device");
            }
            return layout.for_device(vtable, key_set, device_at, device);
          },
          py::arg("vtable"), py::arg("key_set"), py::arg("device_at"), py::arg("device"),
          py::keep_alive<0, 1>(),
          "This layout for the tensors of one GPU: their C++ class (vtable), dispatch key set, "
          "and where the TensorImpl keeps its device (type byte, index byte) with the two bytes "
          "it must hold (type | index << 8).")
      .def(
          "read",
          [](const TorchLayout& layout, py::handle t) -> py::object {
            gradkern_py::TableRow row{0, 0, -1};
            if (!layout.read(t.ptr(), row)) return py::none();
            return py::make_tuple(row.data, row.numel, row.code);
          },
          py::arg("tensor"),
          "(data, numel, code) read directly from torch's objects, or None where the tensor "
          "does not qualify (the table readers then ask torch's getters).");
  m.def("read_tensor_table", &gradkern_py::read_tensor_table, py::arg("tensors"),
        py::arg("tensor_type"), py::arg("dtypes"), py::arg("device_flag"),
        py::arg("device_index"), py::arg("layout") = TorchLayout{},
        "(data, numel, codes, ok, dtype_mask) of a list of torch tensors, read in one C loop; "
        "ok is False where a tensor needs the general Python path; bit c of dtype_mask is set "
        "when some tensor has dtype code c. layout lets the loop prefetch each "
        "tensor's metadata and read CPU rows directly.");
  m.def("read_tensor_stats", &py_read_tensor_stats, py::arg("tensors"), py::arg("tensor_type"),
        py::arg("dtypes"), py::arg("layout"), py::arg("kind"), py::arg("p"),
        py::arg("power_sum"), py::arg("max_abs"), py::arg("nonfinite"), py::arg("zeros"),
        "read_tensor_table and tensor_stats at once, for CPU tensors: (data, numel, codes, ok, "
        "dtype_mask), ok a bool.");
  m.def("read_grads", &gradkern_py::read_grads, py::arg("params"), py::arg("tensor_type"),
        py::arg("layout"),
        "(grads, kept): the .grad of each parameter that has one, and their positions (None "
        "when all have one).");
  m.def(
      "find_impl_offset",
      [](py::handle probe, std::uintptr_t impl_address) {
        return gradkern_py::find_impl_offset(probe.ptr(), impl_address);
      },
      py::arg("probe"), py::arg("impl_address"),
      "Byte offset of impl_address (probe._cdata) inside the probe tensor object, or -1.");
  m.def("build_info", [] {
    const BuildInfo b = build_info();
    py::dict d;
    d["compiler"] = b.compiler;
    d["flags"] = b.flags;
    d["openmp"] = b.openmp;
    d["simd"] = b.simd;
    d["kernel_isas"] = b.kernel_isas;
    d["active_isa"] = b.active_isa;
    d["reads_ahead"] = b.reads_ahead;
    d["max_threads"] = b.max_threads;
    d["cpu_share_measurable"] = b.cpu_share_measurable;
    return d;
  });
  m.def("cpu_shared", &cpu_shared,
        "Whether the calling thread recently waited for a core more than a third as long as it ran "
        "(passes below a size then run on the calling thread alone).");
}
