// Where torch keeps a CPU tensor's table row (data pointer, element count, dtype, contiguity), and
// reading it from there without calling into torch.
//
// Why: for 10,000 small gradients, torch's getters cost more than the reduction itself: about
// 45 ns each (mostly torch's __torch_function__ bookkeeping), five per tensor. The extension is
// not built against libtorch (one build serves every torch version), so it has no torch headers
// to read the fields with. Instead gradkern/_torch_layout.py finds, the first time a table is
// read, where this torch keeps each field, by matching the values torch reports for probe
// tensors, and checks what it found on a second set of tensors before turning the direct read on.
//
// A tensor is read directly only when it looks exactly like the probes: a plain torch.Tensor
// whose TensorImpl is of the same C++ class (vtable) with the same dispatch keys (dense CPU, with
// autograd; no conjugate/negative bit, no Python key, no inference mode), contiguous, of one of
// the four dtypes, and whose storage has no access checks (copy-on-write, throw-on-access or
// deprecation warnings all raise StorageImpl's one "has checks" flag). Anything else returns
// false and goes through the getters. A layout for one GPU (for_device) reads the same fields of
// CUDA tensors, with the CUDA key set, and checks the device index too.
#pragma once

#include <Python.h>

#include <cstdint>
#include <cstring>

namespace gradkern_py {

struct TableRow {
  std::uint64_t data;
  std::int64_t numel;
  std::int8_t code;
};

// Bytes per element of each dtype code (f32, f64, f16, bf16).
constexpr std::int64_t kElementSize[4] = {4, 8, 2, 2};

// c10::DeviceType::CUDA, the type byte of a CUDA tensor's c10::Device (the probe confirms it).
constexpr std::uint16_t kCudaDeviceType = 1;

template <class T>
inline T load(const void* base, Py_ssize_t offset) {
  T value;
  std::memcpy(&value, static_cast<const char*>(base) + offset, sizeof value);
  return value;
}

// Byte offsets into torch's objects. All found by probing (gradkern/_torch_layout.py).
struct TorchLayout {
  // In the Python tensor object: its TensorImpl pointer (torch's `_cdata`). -1: not found, which
  // also turns off prefetching.
  Py_ssize_t impl = -1;
  // Whether every field below was found and checked; if not, rows come from the getters.
  bool direct = false;
  PyObject* tensor_type = nullptr;  // the exact Python type read directly (borrowed: torch.Tensor)

  // In the TensorImpl.
  std::uint64_t vtable = 0;   // word 0 of a plain TensorImpl: its C++ class
  std::uint64_t key_set = 0;  // the dispatch key set of a plain CPU tensor
  Py_ssize_t key_set_at = 0, storage_at = 0, storage_offset_at = 0, numel_at = 0, dtype_at = 0;
  Py_ssize_t contiguous_byte = 0;
  std::uint8_t contiguous_mask = 0;

  // In the StorageImpl.
  Py_ssize_t data_at = 0, nbytes_at = 0, checks_at = 0;
  std::uint64_t checks_mask = 0;  // the "has checks" flag (and its neighbours set with it)

  // For a layout that reads the tensors of one GPU (made by for_device): where the TensorImpl
  // keeps its c10::Device (type byte, then index byte) and the two bytes it must hold. -1: a CPU
  // layout, whose key set alone says CPU.
  Py_ssize_t device_at = -1;
  std::uint16_t device = 0;

  // This layout, reading tensors with another dispatch key set and C++ class, on the device
  // `device_bytes` (type | index << 8) found at `at`.
  TorchLayout for_device(std::uint64_t vtable_of, std::uint64_t keys, Py_ssize_t at,
                         std::uint16_t device_bytes) const {
    TorchLayout other = *this;
    other.vtable = vtable_of;
    other.key_set = keys;
    other.device_at = at;
    other.device = device_bytes;
    return other;
  }

  // The TensorImpl of a tensor object of an exact tensor type (one at least impl + 8 bytes big).
  const char* impl_of(PyObject* t) const { return load<const char*>(t, impl); }

  // Fills row from torch's objects when t qualifies (see above); false otherwise. Never raises,
  // never calls into Python.
  bool read(PyObject* t, TableRow& row) const {
    if (!direct || reinterpret_cast<PyObject*>(Py_TYPE(t)) != tensor_type) return false;
    const char* ti = impl_of(t);
    if (ti == nullptr || load<std::uint64_t>(ti, 0) != vtable ||
        load<std::uint64_t>(ti, key_set_at) != key_set) {
      return false;
    }
    if (device_at >= 0 && load<std::uint16_t>(ti, device_at) != device) return false;
    if ((load<std::uint8_t>(ti, contiguous_byte) & contiguous_mask) == 0) return false;
    const int code = dtype_code(load<std::uint16_t>(ti, dtype_at));
    if (code < 0) return false;
    const char* storage = load<const char*>(ti, storage_at);
    if (storage == nullptr || (load<std::uint64_t>(storage, checks_at) & checks_mask) != 0) {
      return false;
    }
    // torch keeps every contiguous tensor inside its storage; a row that says otherwise was not
    // read from the fields we think it was.
    const std::int64_t size = kElementSize[code];
    const auto offset = load<std::int64_t>(ti, storage_offset_at);
    const auto numel = load<std::int64_t>(ti, numel_at);
    const auto nbytes = load<std::int64_t>(storage, nbytes_at);
    if (offset < 0 || numel < 0 || nbytes < 0 || offset > nbytes / size ||
        numel > nbytes / size - offset) {
      return false;
    }
    const auto base = load<std::uint64_t>(storage, data_at);
    if (base == 0 && numel > 0) return false;
    // Like torch's data_ptr(): null for an empty tensor.
    row.data = numel == 0 ? 0 : base + static_cast<std::uint64_t>(offset * size);
    row.numel = numel;
    row.code = static_cast<std::int8_t>(code);
    return true;
  }

  // c10::ScalarType -> gradkern dtype code (f32, f64, f16, bf16), or -1. The ScalarType numbers
  // are part of torch's serialisation format; the probe checks them anyway.
  static int dtype_code(std::uint16_t scalar_type) {
    switch (scalar_type) {
      case 6: return 0;   // Float
      case 7: return 1;   // Double
      case 5: return 2;   // Half
      case 15: return 3;  // BFloat16
      default: return -1;
    }
  }
};

// Where an exact tensor object holds its TensorImpl pointer: the byte offset of the word equal
// to impl_address (torch's `probe._cdata`) inside the probe object, or -1 if there is none.
inline Py_ssize_t find_impl_offset(PyObject* probe, std::uintptr_t impl_address) {
  const Py_ssize_t size = Py_TYPE(probe)->tp_basicsize;
  for (Py_ssize_t off = sizeof(PyObject);
       off + static_cast<Py_ssize_t>(sizeof(std::uintptr_t)) <= size; off += sizeof(void*)) {
    if (load<std::uintptr_t>(probe, off) == impl_address) return off;
  }
  return -1;
}

// Prefetch distances, in list items: the Python object first, then (once its line has arrived)
// the TensorImpl it points to, then (for direct reads) the StorageImpl that points to. A direct
// read takes about 20 ns a row once its lines are in, so 8 rows ahead (enough for the getters'
// 300 ns rows) is less than one memory latency; 32 read 10,000 cold rows in 0.55-0.82 ms against
// 0.70-1.17 ms with 8 (2-core EPYC VM).
constexpr Py_ssize_t kAhead = 32;
constexpr Py_ssize_t kObjectAhead = 2 * kAhead;
constexpr Py_ssize_t kStorageAhead = kAhead / 2;

// Prefetches the object items[i + kObjectAhead], items[i + kAhead]'s TensorImpl and, when rows
// are read directly, items[i + kStorageAhead]'s StorageImpl, for objects that is_tensor accepts
// (exact tensor types, whose layout `layout` describes). In a training step the backward pass has
// long evicted these lines, and the reads would otherwise wait for one miss after another. Only
// hints: a wrong address costs nothing but the prefetch.
template <class IsTensor>
inline void prefetch_ahead(PyObject* const* items, Py_ssize_t n, Py_ssize_t i,
                           const TorchLayout& layout, const IsTensor& is_tensor) {
  if (layout.impl < 0) return;
  if (i == 0) {
    for (Py_ssize_t j = 0; j < n && j < kObjectAhead; ++j) __builtin_prefetch(items[j], 0, 3);
  }
  if (i + kObjectAhead < n) __builtin_prefetch(items[i + kObjectAhead], 0, 3);
  if (i + kAhead < n && is_tensor(items[i + kAhead])) {
    constexpr int kImplLines = 4;  // a TensorImpl is about 200 bytes
    const char* ti = layout.impl_of(items[i + kAhead]);
    for (int line = 0; line < kImplLines; ++line) __builtin_prefetch(ti + 64 * line, 0, 3);
  }
  if (layout.direct && i + kStorageAhead < n && is_tensor(items[i + kStorageAhead])) {
    const char* ti = layout.impl_of(items[i + kStorageAhead]);
    if (ti == nullptr) return;  // the storage pointer is a real load, unlike the prefetches
    const char* storage = load<const char*>(ti, layout.storage_at);
    __builtin_prefetch(storage + layout.data_at, 0, 3);
    __builtin_prefetch(storage + layout.checks_at, 0, 3);
  }
}

}  // namespace gradkern_py
