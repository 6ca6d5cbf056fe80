// Reading the tensor table (address, element count, dtype code) straight from a Python list of
// torch tensors, in one C loop.
//
// The extension does not link libtorch (DESIGN §3), so this goes through the Python C API: each
// attribute costs what torch's own getter costs, but none of the interpreter's per-item
// overhead, which for 10,000 small gradients is most of the time. Anything unusual (a tensor
// subclass, another device, a non-contiguous or sparse tensor, an unknown dtype, any error) is
// reported as "not ok" and left to the Python path, which handles or rejects it properly.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace gradkern_py {

namespace py = pybind11;

struct TableRow {
  std::uint64_t data;
  std::int64_t numel;
  std::int8_t code;
};

class TensorTableReader {
 public:
  // dtypes: the torch dtype objects in DType code order (f32, f64, f16, bf16).
  // device_flag: "is_cpu" or "is_cuda"; device_index: the CUDA device, or -1.
  TensorTableReader(py::handle tensor_type, py::tuple dtypes, const char* device_flag,
                    int device_index)
      : tensor_type_(tensor_type.ptr()), device_flag_(py::str(device_flag)),
        device_index_(device_index) {
    for (int i = 0; i < 4; ++i) dtypes_[i] = dtypes[i].ptr();
  }

  // Fills row and returns true when t is a plain, contiguous, dense tensor of a known dtype on
  // the expected device. Never raises: a Python error means "take the general path".
  bool read(PyObject* t, TableRow& row) const {
    const bool ok = read_or_error(t, row);
    if (!ok && PyErr_Occurred()) PyErr_Clear();
    return ok;
  }

 private:
  static constexpr int kElementSize[4] = {4, 8, 2, 2};

  bool read_or_error(PyObject* t, TableRow& row) const {
    if (reinterpret_cast<PyObject*>(Py_TYPE(t)) != tensor_type_) return false;
    {
      const py::object dtype = steal(PyObject_GetAttr(t, names().dtype.ptr()));
      row.code = -1;
      for (int i = 0; i < 4; ++i) {
        if (dtype.ptr() == dtypes_[i]) row.code = static_cast<std::int8_t>(i);
      }
      if (row.code < 0) return false;
    }
    if (steal(PyObject_GetAttr(t, device_flag_.ptr())).ptr() != Py_True) return false;
    if (device_index_ >= 0) {
      const py::object index = steal(PyObject_CallMethodNoArgs(t, names().get_device.ptr()));
      if (!index || PyLong_AsLong(index.ptr()) != device_index_) return false;
    }
    // Sparse CSR raises here; sparse COO and other storage-less layouts raise below.
    if (steal(PyObject_CallMethodNoArgs(t, names().is_contiguous.ptr())).ptr() != Py_True) {
      return false;
    }
    const py::object ptr = steal(PyObject_CallMethodNoArgs(t, names().data_ptr.ptr()));
    if (!ptr) return false;
    row.data = PyLong_AsUnsignedLongLong(ptr.ptr());
    const py::object nbytes = steal(PyObject_GetAttr(t, names().nbytes.ptr()));
    if (!nbytes) return false;
    row.numel = PyLong_AsLongLong(nbytes.ptr()) / kElementSize[row.code];
    return !PyErr_Occurred();
  }

  static py::object steal(PyObject* p) { return py::reinterpret_steal<py::object>(p); }

  struct Names {
    py::str dtype{"dtype"}, get_device{"get_device"}, is_contiguous{"is_contiguous"},
        data_ptr{"data_ptr"}, nbytes{"nbytes"};
  };
  static const Names& names() {
    static const Names* n = new Names();  // interned once, never freed (outlives the module)
    return *n;
  }

  PyObject* tensor_type_;
  PyObject* dtypes_[4];
  py::str device_flag_;
  int device_index_;
};

// (data, numel, codes, ok): one row per tensor; rows with ok == False hold garbage.
inline py::tuple read_tensor_table(py::sequence tensors, py::handle tensor_type,
                                   py::tuple dtypes, const char* device_flag, int device_index) {
  if (dtypes.size() != 4) throw py::value_error("dtypes: expected the 4 dtypes in code order");
  const TensorTableReader reader(tensor_type, dtypes, device_flag, device_index);
  const py::object fast =
      py::reinterpret_steal<py::object>(PySequence_Fast(tensors.ptr(), "expected a sequence"));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  py::array_t<std::uint64_t> data(n);
  py::array_t<std::int64_t> numel(n);
  py::array_t<std::int8_t> codes(n);
  py::array_t<bool> ok(n);
  auto* d = data.mutable_data();
  auto* m = numel.mutable_data();
  auto* c = codes.mutable_data();
  auto* k = ok.mutable_data();
  for (Py_ssize_t i = 0; i < n; ++i) {
    TableRow row{0, 0, -1};
    k[i] = reader.read(items[i], row);
    d[i] = row.data;
    m[i] = row.numel;
    c[i] = row.code;
  }
  return py::make_tuple(data, numel, codes, ok);
}

}  // namespace gradkern_py
