// Reading the tensor table (address, element count, dtype code) straight from a Python list of
// torch tensors, in one C loop.
//
// A plain CPU tensor's row is read from torch's own objects where gradkern found their layout
// (torch_layout.h). Every other tensor, and every tensor when that layout is unknown, goes
// through torch's getters via the Python C API (the extension does not link libtorch, so that one
// build serves every torch version):
// each costs what torch's getter costs, but none of the interpreter's per-item overhead. Anything
// unusual (a tensor subclass, another device, a non-contiguous or sparse tensor, an unknown dtype,
// any error) is reported as "not ok" and left to the Python path, which handles or rejects it.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "torch_layout.h"

namespace gradkern_py {

namespace py = pybind11;

inline PyObject* checked_type(py::handle tensor_type) {
  if (!PyType_Check(tensor_type.ptr())) throw py::type_error("tensor_type: expected a type");
  return tensor_type.ptr();
}

// The items of a Python sequence as a C array (a list or tuple is used in place).
struct FastSequence {
  explicit FastSequence(py::handle seq)
      : owner(py::reinterpret_steal<py::object>(
            PySequence_Fast(seq.ptr(), "expected a sequence"))) {
    if (!owner) throw py::error_already_set();
    size = PySequence_Fast_GET_SIZE(owner.ptr());
    items = PySequence_Fast_ITEMS(owner.ptr());
  }
  py::object owner;
  Py_ssize_t size;
  PyObject** items;
};

// The three columns of a tensor table, as the arrays handed back to Python.
struct TableColumns {
  explicit TableColumns(Py_ssize_t n)
      : data(n), numel(n), codes(n), data_(data.mutable_data()), numel_(numel.mutable_data()),
        codes_(codes.mutable_data()) {}
  void set(Py_ssize_t i, const TableRow& row) {
    data_[i] = row.data;
    numel_[i] = row.numel;
    codes_[i] = row.code;
    if (row.code >= 0) dtype_mask |= 1u << row.code;
  }
  py::array_t<std::uint64_t> data;
  py::array_t<std::int64_t> numel;
  py::array_t<std::int8_t> codes;
  // Bit c set when some row has dtype code c: the caller learns the dtypes present (and so the
  // result dtype) without another pass over the codes.
  unsigned dtype_mask = 0;

 private:
  std::uint64_t* data_;
  std::int64_t* numel_;
  std::int8_t* codes_;
};

// One attribute of the tensor type, looked up once. Calling torch's descriptor directly skips
// the lookup that PyObject_GetAttr repeats for every tensor (MRO walk, instance-dict probe,
// bound-method call): a quarter of the cost per tensor, measured on 10,000 small tensors. Only
// exact instances of the type are read, so a descriptor found on the type is the one Python
// would use; anything other than a getset or method descriptor takes the generic call.
class TensorAttribute {
 public:
  enum Kind { kProperty, kMethod };

  TensorAttribute(py::handle type, const char* name, Kind kind)
      : type_(type.ptr()), name_(name), kind_(kind),
        descr_(py::reinterpret_steal<py::object>(PyObject_GetAttrString(type.ptr(), name))) {
    if (!descr_) {
      PyErr_Clear();
      return;
    }
    PyTypeObject* dt = Py_TYPE(descr_.ptr());
    direct_ = kind == kProperty ? dt == &PyGetSetDescr_Type || dt == &PyMemberDescr_Type
                                : dt == &PyMethodDescr_Type;
  }

  const py::str& name() const { return name_; }
  const py::object& descriptor() const { return descr_; }

  // A new reference, or null with a Python error set.
  PyObject* get(PyObject* t) const {
    if (direct_) {
      if (kind_ == kProperty) return Py_TYPE(descr_.ptr())->tp_descr_get(descr_.ptr(), t, type_);
      return PyObject_Vectorcall(descr_.ptr(), &t, 1, nullptr);
    }
    return kind_ == kProperty ? PyObject_GetAttr(t, name_.ptr())
                              : PyObject_CallMethodNoArgs(t, name_.ptr());
  }

 private:
  PyObject* type_;
  py::str name_;
  Kind kind_;
  py::object descr_;
  bool direct_ = false;
};

class TensorTableReader {
 public:
  // dtypes: the torch dtype objects in DType code order (f32, f64, f16, bf16).
  // device_flag: "is_cpu" or "is_cuda"; device_index: the CUDA device, or -1.
  // layout: where torch keeps the fields (for prefetching, and for reading CPU rows directly).
  TensorTableReader(py::handle tensor_type, py::tuple dtypes, const char* device_flag,
                    int device_index, const TorchLayout& layout)
      : tensor_type_(checked_type(tensor_type)), device_index_(device_index), layout_(layout),
        dtype_(tensor_type, "dtype", TensorAttribute::kProperty),
        on_device_(tensor_type, device_flag, TensorAttribute::kProperty),
        get_device_(tensor_type, "get_device", TensorAttribute::kMethod),
        is_contiguous_(tensor_type, "is_contiguous", TensorAttribute::kMethod),
        data_ptr_(tensor_type, "data_ptr", TensorAttribute::kMethod),
        nbytes_(tensor_type, "nbytes", TensorAttribute::kProperty) {
    if (dtypes.size() != 4) throw py::value_error("dtypes: expected the 4 dtypes in code order");
    for (int i = 0; i < 4; ++i) dtypes_[i] = dtypes[i].ptr();
    // The layout describes objects of its own tensor type, and reads directly only the tensors
    // of the device it was made for: a CPU layout (no device field) for a CPU table, a layout
    // that checks the device field against this CUDA index for a CUDA table.
    if (layout_.tensor_type != tensor_type_) layout_ = TorchLayout{};
    const bool cpu_table = std::strcmp(device_flag, "is_cpu") == 0 && device_index < 0;
    const bool cuda_table = std::strcmp(device_flag, "is_cuda") == 0 && device_index >= 0;
    const bool fits = cpu_table ? layout_.device_at < 0
                                : cuda_table && layout_.device_at >= 0 &&
                                      (layout_.device & 0xff) == kCudaDeviceType &&
                                      static_cast<std::int8_t>(layout_.device >> 8) == device_index;
    if (!fits) layout_.direct = false;
  }

  // Fills row and returns true when t is a plain, contiguous, dense tensor of a known dtype on
  // the expected device. Never raises: a Python error means "take the general path".
  bool read(PyObject* t, TableRow& row) const {
    if (layout_.read(t, row)) return true;
    const bool ok = read_or_error(t, row);
    if (!ok && PyErr_Occurred()) PyErr_Clear();
    return ok;
  }

  // Row i of items (n of them), prefetching the metadata of the rows ahead.
  bool read_row(PyObject* const* items, Py_ssize_t n, Py_ssize_t i, TableRow& row) const {
    prefetch_ahead(items, n, i, layout_, [this](PyObject* t) {
      return reinterpret_cast<PyObject*>(Py_TYPE(t)) == tensor_type_;
    });
    return read(items[i], row);
  }

 private:
  bool read_or_error(PyObject* t, TableRow& row) const {
    if (reinterpret_cast<PyObject*>(Py_TYPE(t)) != tensor_type_) return false;
    {
      const py::object dtype = steal(dtype_.get(t));
      row.code = -1;
      for (int i = 0; i < 4; ++i) {
        if (dtype.ptr() == dtypes_[i]) row.code = static_cast<std::int8_t>(i);
      }
      if (row.code < 0) return false;
    }
    if (steal(on_device_.get(t)).ptr() != Py_True) return false;
    if (device_index_ >= 0) {
      const py::object index = steal(get_device_.get(t));
      if (!index || PyLong_AsLong(index.ptr()) != device_index_) return false;
    }
    // Sparse CSR raises here; sparse COO and other storage-less layouts raise below.
    if (steal(is_contiguous_.get(t)).ptr() != Py_True) return false;
    const py::object ptr = steal(data_ptr_.get(t));
    if (!ptr) return false;
    row.data = PyLong_AsUnsignedLongLong(ptr.ptr());
    const py::object nbytes = steal(nbytes_.get(t));
    if (!nbytes) return false;
    row.numel = PyLong_AsLongLong(nbytes.ptr()) / kElementSize[row.code];
    return !PyErr_Occurred();
  }

  static py::object steal(PyObject* p) { return py::reinterpret_steal<py::object>(p); }

  PyObject* tensor_type_;
  PyObject* dtypes_[4];
  int device_index_;
  TorchLayout layout_;
  TensorAttribute dtype_, on_device_, get_device_, is_contiguous_, data_ptr_, nbytes_;
};

// (data, numel, codes, ok, dtype_mask): one row per tensor; rows with ok == False hold garbage,
// and dtype_mask (bit c: some row has code c) is meaningful only when every row is ok.
inline py::tuple read_tensor_table(py::sequence tensors, py::handle tensor_type,
                                   py::tuple dtypes, const char* device_flag, int device_index,
                                   const TorchLayout& layout) {
  const TensorTableReader reader(tensor_type, dtypes, device_flag, device_index, layout);
  const FastSequence seq(tensors);
  TableColumns table(seq.size);
  py::array_t<bool> ok(seq.size);
  for (Py_ssize_t i = 0; i < seq.size; ++i) {
    TableRow row{0, 0, -1};
    ok.mutable_data()[i] = reader.read_row(seq.items, seq.size, i, row);
    table.set(i, row);
  }
  return py::make_tuple(table.data, table.numel, table.codes, ok, table.dtype_mask);
}

// (grads, kept): the `.grad` of each parameter that has one, and the positions of those
// parameters (None when every one has a gradient). Like [p.grad for p in params] without the
// interpreter, and with each parameter's metadata prefetched: .grad is a chain of dependent
// misses per parameter once a training step has evicted them. Raises what `p.grad` raises.
inline py::tuple read_grads(py::sequence params, py::handle tensor_type,
                            const TorchLayout& layout) {
  auto* base = reinterpret_cast<PyTypeObject*>(checked_type(tensor_type));
  const FastSequence seq(params);
  const Py_ssize_t n = seq.size;
  PyObject* const* items = seq.items;
  const TensorAttribute grad(tensor_type, "grad", TensorAttribute::kProperty);
  // Whether objects of the type last seen are read through torch's own descriptor (any tensor
  // type that does not override .grad) and may be prefetched; decided once per type.
  PyTypeObject* seen = nullptr;
  bool tensor_like = false;
  auto classify = [&](PyTypeObject* type) {
    if (type == seen) return tensor_like;
    seen = type;
    tensor_like = false;
    if (type == base || PyType_IsSubtype(type, base)) {
      PyObject* found = _PyType_Lookup(type, grad.name().ptr());  // borrowed
      tensor_like = found != nullptr && found == grad.descriptor().ptr();
    }
    return tensor_like;
  };
  // Parameters are of tensor_type or its subclasses, so the offset into the object holds; their
  // own storage is never read.
  TorchLayout prefetch = layout.tensor_type == tensor_type.ptr() ? layout : TorchLayout{};
  prefetch.direct = false;
  py::list grads;
  std::vector<Py_ssize_t> kept;
  kept.reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    prefetch_ahead(items, n, i, prefetch, [&](PyObject* p) { return classify(Py_TYPE(p)); });
    PyObject* g = classify(Py_TYPE(items[i])) ? grad.get(items[i])
                                              : PyObject_GetAttr(items[i], grad.name().ptr());
    if (g == nullptr) throw py::error_already_set();
    const py::object owned = py::reinterpret_steal<py::object>(g);
    if (g == Py_None) continue;
    if (PyList_Append(grads.ptr(), g) != 0) throw py::error_already_set();
    kept.push_back(i);
  }
  if (static_cast<Py_ssize_t>(kept.size()) == n) return py::make_tuple(grads, py::none());
  py::list positions(kept.size());
  for (std::size_t j = 0; j < kept.size(); ++j) positions[j] = py::int_(kept[j]);
  return py::make_tuple(grads, positions);
}

}  // namespace gradkern_py
