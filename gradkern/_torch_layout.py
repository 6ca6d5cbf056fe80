"""Where this torch keeps a CPU tensor's table row, found by probing on first use.

The C table reader (``src/python_tensor_table.h``) needs each tensor's data pointer, element
count, dtype and contiguity. torch's getters cost about 45 ns each, five per tensor, which for
10,000 small gradients is more than the reduction itself. gradkern is not built against libtorch
(one build serves every torch version), so no header says where torch keeps these fields. This
module finds them:

1. probe tensors of every supported dtype with varied sizes, storage offsets and contiguity, and
   what torch's getters say about each;
2. for each field, the one offset in the TensorImpl (or its StorageImpl) whose value matches
   torch's answer on every probe. No match, or more than one, and direct reads stay off;
3. what a tensor must match to be read directly: the C++ class (vtable) and dispatch key set all
   probes share, and no access checks on its storage (the bits torch sets when a storage gets
   one);
4. a check on fresh tensors: every plain one must read exactly as torch's getters say, and the
   kinds that must not be read directly (non-contiguous, negative view, copy-on-write, a storage
   that throws, inference mode, subclasses, other dtypes and devices) must not be.

Anything failing leaves the getters in charge: slower, never wrong. ``python -m gradkern info``
says which reader is in use and why; ``GRADKERN_DIRECT_READ=0`` turns direct reads off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import numpy as np
import torch

from ._constants import DTYPES_BY_CODE as DTYPES  # in code order
# c10::ScalarType numbers, which torch keeps as the dtype of a TensorImpl. The probe confirms them.
_SCALAR_TYPES = (6, 7, 5, 15)

_IMPL_WINDOW = 512  # bytes of a TensorImpl searched, at most (torch 2.x: about 180)
_STORAGE_WINDOW = 256  # bytes of a StorageImpl searched, at most (torch 2.x: about 100)


class LayoutNotFound(Exception):
    """The probe could not pin a field down; the getters stay in charge."""


def find_layout(cpu_module) -> tuple[object, str]:
    """``(layout, report)``: a ``_cpu.TorchLayout`` for ``torch.Tensor`` and one line saying how
    table rows are read. The layout always knows where a tensor object keeps its TensorImpl when
    that can be found (for prefetching); it reads CPU rows directly only when every step above
    succeeded.

    It runs at the first table read, which may be inside ``torch.no_grad()``, inference mode
    or a default-device context: the probe sets up the state it needs (a backward pass on CPU
    tensors) whatever the caller's is."""
    with torch.inference_mode(False), torch.enable_grad(), torch.device("cpu"):
        return _find_layout(cpu_module)


def _find_layout(cpu_module) -> tuple[object, str]:
    probe = torch.empty(1)
    try:
        impl = cpu_module.find_impl_offset(probe, int(probe._cdata))
    except (AttributeError, TypeError, ValueError, OverflowError):
        impl = -1
    prefetch_only = cpu_module.TorchLayout(torch.Tensor, impl)
    if os.environ.get("GRADKERN_DIRECT_READ", "1") == "0":
        return prefetch_only, "torch's getters (direct reads turned off by GRADKERN_DIRECT_READ=0)"
    try:
        if impl < 0:
            raise LayoutNotFound("no TensorImpl pointer in the tensor object")
        fields = _locate_fields()
        layout = cpu_module.TorchLayout(torch.Tensor, impl, fields)
        _check(layout)
    except Exception as exc:  # whatever went wrong, the getters stay in charge: no call fails
        return prefetch_only, f"torch's getters (direct reads off: {exc})"
    return layout, (f"direct from torch {torch.__version__}'s TensorImpl, layout found and "
                    "checked on first use")


def _usable_size() -> Callable[[int], int]:
    """How many bytes may be read at an address malloc returned (glibc and musl only: the probe
    reads whole objects and must not read past them)."""
    if not sys.platform.startswith("linux"):
        raise LayoutNotFound(f"probing is implemented for Linux only, not {sys.platform}")
    fn = ctypes.CDLL(None).malloc_usable_size
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p]
    return fn


def _bytes(address: int, size: int) -> np.ndarray:
    return np.frombuffer(ctypes.string_at(address, size), dtype=np.uint8)


def _words(rows: np.ndarray) -> np.ndarray:
    """(probes, bytes) -> (probes, 8-byte words), in the machine's byte order."""
    return rows[:, : rows.shape[1] // 8 * 8].copy().view(np.uint64)


def _probe_tensors() -> list[torch.Tensor]:
    """Plain CPU tensors whose sizes, storage offsets, dtypes and contiguity vary independently,
    so each field shows up at exactly one offset."""
    probes = []
    for k, dtype in enumerate(DTYPES):
        base = torch.zeros(64 + 13 * k, dtype=dtype)
        leaf = torch.nn.Parameter(torch.zeros(9 + k, dtype=dtype))
        leaf.grad = torch.zeros(9 + k, dtype=dtype)
        probes += [
            torch.zeros(3 + k, dtype=dtype),
            base[5 + k: 29 + 2 * k],  # a view at a storage offset
            torch.zeros(4, 6 + k, dtype=dtype).t(),  # not contiguous, but dense
            base[1 + k:: 3],  # not contiguous, not dense
            torch.zeros(2, 3, 4 + k, 5, dtype=dtype).to(memory_format=torch.channels_last),
            torch.zeros(3, 7 + k, 2, dtype=dtype),
            torch.zeros((), dtype=dtype),
            torch.zeros(0, dtype=dtype),
            leaf.grad,  # held by autograd as well as by Python
            # numpy's buffer: the storage's context is not its address, unlike torch's allocator
            torch.from_numpy(np.zeros(11 + k, dtype=np.float64)),
        ]
    return probes


def _locate_fields() -> dict[str, int]:
    usable = _usable_size()
    probes = _probe_tensors()
    storages = [t.untyped_storage() for t in probes]
    impl_size = min(min(usable(t._cdata) for t in probes), _IMPL_WINDOW)
    storage_size = min(min(usable(s._cdata) for s in storages), _STORAGE_WINDOW)
    impl = np.stack([_bytes(t._cdata, impl_size) for t in probes])
    storage = np.stack([_bytes(s._cdata, storage_size) for s in storages])
    impl_words, storage_words = _words(impl), _words(storage)

    keys = [torch._C._dispatch_keys(t).raw_repr() for t in probes]
    if len(set(keys)) != 1:
        raise LayoutNotFound("plain CPU tensors differ in dispatch keys")
    if len(set(impl_words[:, 0].tolist())) != 1:
        raise LayoutNotFound("plain CPU tensors differ in their first word")
    fields = dict(
        vtable=int(impl_words[0, 0]),
        key_set=keys[0],
        key_set_at=_word_offset(impl_words, keys, "dispatch key set"),
        storage_at=_word_offset(impl_words, [s._cdata for s in storages], "storage pointer"),
        storage_offset_at=_word_offset(impl_words, [t.storage_offset() for t in probes],
                                       "storage offset"),
        numel_at=_word_offset(impl_words, [t.numel() for t in probes], "element count"),
        nbytes_at=_word_offset(storage_words, [s.nbytes() for s in storages], "storage size"),
        # DataPtr keeps the address twice for the default allocator (data and context); the
        # numpy-backed probes tell them apart.
        data_at=_word_offset(storage_words, [s.data_ptr() for s in storages], "storage address"),
    )
    fields["dtype_at"] = _dtype_offset(impl, probes)
    fields["contiguous_byte"], fields["contiguous_mask"] = _contiguity_bit(impl, probes)
    fields["checks_at"], fields["checks_mask"] = _storage_check_bits(usable, storage_size)
    return fields


def _only_match(places: np.ndarray, expected: np.ndarray, what: str) -> int:
    """The one column of ``places`` (probes x places) holding ``expected`` (one value per probe)
    in every probe. LayoutNotFound when no column does, or more than one."""
    hits = np.flatnonzero((places == expected[:, None]).all(0))
    if len(hits) != 1:
        raise LayoutNotFound(f"{len(hits)} places match the {what}")
    return int(hits[0])


def _word_offset(words: np.ndarray, expected: list[int], what: str) -> int:
    """Byte offset of the 8-byte word holding ``expected``."""
    return 8 * _only_match(words, np.array(expected, dtype=np.uint64), what)


def _dtype_offset(impl: np.ndarray, probes: list[torch.Tensor]) -> int:
    halves = impl[:, : impl.shape[1] // 2 * 2].copy().view(np.uint16)
    expected = np.array([_SCALAR_TYPES[DTYPES.index(t.dtype)] for t in probes], dtype=np.uint16)
    return 2 * _only_match(halves, expected, "dtype")


def _contiguity_bit(impl: np.ndarray, probes: list[torch.Tensor]) -> tuple[int, int]:
    bits = np.unpackbits(impl, axis=1, bitorder="little")
    expected = np.array([t.is_contiguous() for t in probes], dtype=np.uint8)
    bit = _only_match(bits, expected, "contiguity flag")
    return bit // 8, 1 << (bit % 8)


def _storage_check_bits(usable, storage_size: int) -> tuple[int, int]:
    """Where a StorageImpl records that access to its data is checked: the bits torch sets when
    asked to throw on, or warn about, writes (with them the flag it also sets for copy-on-write
    and lazily materialised storage). They must lie in one word."""
    changed = np.zeros(storage_size, dtype=np.uint8)
    for mark in (torch._C._set_throw_on_mutable_data_ptr,
                 torch._C._set_warn_deprecated_on_mutable_data_ptr):
        t = torch.zeros(5)
        storage = t.untyped_storage()  # held, so the storage's Python object stays the same
        address = storage._cdata
        if usable(address) < storage_size:
            raise LayoutNotFound("storage objects differ in size")
        before = _bytes(address, storage_size)
        mark(t)
        changed |= before ^ _bytes(address, storage_size)
        if (before & changed).any():
            raise LayoutNotFound("setting a storage check cleared bits")
    where = np.flatnonzero(changed)
    if len(where) == 0 or where[0] // 8 != where[-1] // 8:
        raise LayoutNotFound("the storage check flags are not in one word")
    at = int(where[0]) // 8 * 8
    mask = int(changed[at: at + 8].copy().view(np.uint64)[0])
    return at, mask


def _check(layout) -> None:
    """Raises LayoutNotFound unless ``layout`` reads every plain tensor as torch's getters do and
    refuses every tensor that must go through them."""
    _expect_reads(layout, _must_read(torch.device("cpu")))
    _expect_refusals(layout, _must_refuse())


def _expect_reads(layout, tensors: list[torch.Tensor]) -> None:
    """Raises LayoutNotFound unless ``layout`` reads each of ``tensors`` as torch's getters do."""
    for t in tensors:
        expected = (t.data_ptr(), t.numel(), DTYPES.index(t.dtype))
        got = layout.read(t)
        if got != expected:
            raise LayoutNotFound(f"read {got} where torch says {expected}")


def _expect_refusals(layout, makers: list[tuple[str, Callable[[], torch.Tensor]]]) -> None:
    """Raises LayoutNotFound if ``layout`` reads any tensor the (name, make) pairs make; a kind
    this torch cannot make is skipped."""
    for name, make in makers:
        try:
            t = make()
        except (AttributeError, RuntimeError, TypeError):  # not in this torch: nothing to check
            continue
        if layout.read(t) is not None:
            raise LayoutNotFound(f"a {name} tensor was read directly")


def _must_read(device: torch.device) -> list[torch.Tensor]:
    """Plain tensors of ``device``, made there (no copy from the host, so no host sync)."""
    # No random numbers anywhere in the probe: it must leave torch's generators as they were.
    x = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 30, device=device).view(6, 5))
    (x.sin() * 2).sum().backward()  # a gradient made by autograd
    tensors = [x.grad, torch.ones(7, 3, device=device).detach(),
               torch.arange(40.0, device=device)[17:31]]
    if device.type == "cpu":  # memory from numpy's allocator
        tensors.append(torch.from_numpy(np.arange(12, dtype=np.float64)))
    for dtype in DTYPES:
        def make(*shape, fill=torch.ones):
            return fill(*shape, dtype=dtype, device=device)

        tensors += [torch.linspace(-3.0, 3.0, 1000, device=device).to(dtype),
                    make(2, 3, 4, fill=torch.zeros), make(()), make(0, fill=torch.empty),
                    make(30)[11:], make(4, 1, 1, 1)]
    return tensors


def _must_refuse() -> list[tuple[str, Callable[[], torch.Tensor]]]:
    def throwing():
        t = torch.zeros(4)
        torch._C._set_throw_on_mutable_data_ptr(t)
        return t

    def cow_source():
        t = torch.zeros(4)
        torch._lazy_clone(t)
        return t

    def inference():
        with torch.inference_mode():
            return torch.zeros(4)

    class Subclass(torch.Tensor):
        pass

    return [
        ("non-contiguous", lambda: torch.zeros(4, 6).t()),
        ("strided", lambda: torch.zeros(12)[::2]),
        ("negative-view", lambda: torch.zeros(4)._neg_view()),
        ("copy-on-write", lambda: torch._lazy_clone(torch.zeros(4))),
        ("copy-on-write source", cow_source),
        ("throw-on-write", throwing),
        ("inference-mode", inference),
        ("Parameter", lambda: torch.nn.Parameter(torch.zeros(4))),
        ("subclass", lambda: torch.zeros(4).as_subclass(Subclass)),
        ("int32", lambda: torch.zeros(4, dtype=torch.int32)),
        ("complex", lambda: torch.zeros(4, dtype=torch.complex64)),
        ("sparse", lambda: torch.zeros(4).to_sparse()),
        ("meta", lambda: torch.zeros(4, device="meta")),
    ]


# c10::DeviceType numbers, and c10::DeviceIndex -1 ("no index") as the byte a CPU tensor holds.
_CPU_DEVICE_TYPE, _CUDA_DEVICE_TYPE, _NO_INDEX = 0, 1, 0xFF


def find_cuda_layout(layout, index: int) -> tuple[object, str]:
    """``(layout, report)`` for the tensors of CUDA device ``index``: the CPU ``layout`` with the
    CUDA dispatch key set, and the place where a TensorImpl keeps its device, found by comparing
    CPU and CUDA probes; then checked like the CPU layout, on fresh CUDA tensors. On any failure
    the CPU layout comes back (the reader then asks torch's getters for CUDA rows).

    Called the first time a list of CUDA tensors is read, so importing gradkern never touches
    the GPU; every probe is made on the device (no copy from the host, so no host sync).
    """
    if not layout.direct:
        return layout, "torch's getters (no direct reads on the CPU either)"
    if os.environ.get("GRADKERN_DIRECT_READ", "1") == "0":
        return layout, "torch's getters (direct reads turned off by GRADKERN_DIRECT_READ=0)"
    try:
        device = torch.device("cuda", index)
        usable = _usable_size()
        cuda_probes = _cuda_probe_tensors(device)
        cpu_probes = _probe_tensors()
        keys = {torch._C._dispatch_keys(t).raw_repr() for t in cuda_probes}
        if len(keys) != 1:
            raise LayoutNotFound("plain CUDA tensors differ in dispatch keys")
        size = min(min(usable(t._cdata) for t in cuda_probes + cpu_probes), _IMPL_WINDOW)
        cuda_impl = np.stack([_bytes(t._cdata, size) for t in cuda_probes])
        cpu_impl = np.stack([_bytes(t._cdata, size) for t in cpu_probes])
        vtables = set(_words(cuda_impl)[:, 0].tolist())
        if len(vtables) != 1:
            raise LayoutNotFound("plain CUDA tensors differ in their first word")
        device_at = device_field_offset(cpu_impl, cuda_impl, _CUDA_DEVICE_TYPE, index)
        found = layout.for_device(vtables.pop(), keys.pop(), device_at,
                                  _CUDA_DEVICE_TYPE | index << 8)
        _check_cuda(found, device)
    except Exception as exc:  # whatever went wrong, the getters stay in charge
        return layout, f"torch's getters for cuda:{index} (direct reads off: {exc})"
    return found, f"direct for cuda:{index}, device field found and checked"


def _cuda_probe_tensors(device: torch.device) -> list[torch.Tensor]:
    """Plain tensors of ``device``, made there: sizes, storage offsets, dtypes and contiguity
    vary, as in the CPU probes."""
    probes = []
    for k, dtype in enumerate(DTYPES):
        def make(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        leaf = torch.nn.Parameter(make(9 + k))
        leaf.grad = make(9 + k)
        probes += [make(3 + k), make(64 + 13 * k)[5 + k: 29 + 2 * k], make(4, 6 + k).t(),
                   make(()), make(0), leaf.grad]
    return probes


def device_field_offset(cpu_impl: np.ndarray, other_impl: np.ndarray, device_type: int,
                        index_byte: int) -> int:
    """Byte offset of the c10::Device in a TensorImpl: the one place where every CPU probe (rows
    of ``cpu_impl``) holds the bytes (CPU, -1) and every probe of the other device (rows of
    ``other_impl``) holds (``device_type``, ``index_byte``)."""
    def pairs(impl: np.ndarray, first: int, second: int) -> np.ndarray:
        return (impl[:, :-1] == first).all(0) & (impl[:, 1:] == second).all(0)

    width = min(cpu_impl.shape[1], other_impl.shape[1])
    hits = np.flatnonzero(pairs(cpu_impl[:, :width], _CPU_DEVICE_TYPE, _NO_INDEX) &
                          pairs(other_impl[:, :width], device_type, index_byte))
    if len(hits) != 1:
        raise LayoutNotFound(f"{len(hits)} places match the device")
    return int(hits[0])


def _check_cuda(layout, device: torch.device) -> None:
    """Raises LayoutNotFound unless ``layout`` reads every plain tensor of ``device`` as torch's
    getters do and refuses CPU tensors, other GPUs' tensors and the kinds that need the getters.
    Everything is made on the device: no host sync."""
    tensors = _must_read(device)
    _expect_reads(layout, tensors)

    def inference():
        with torch.inference_mode():
            return torch.zeros(4, device=device)

    _expect_refusals(layout, [
        ("CPU", lambda: torch.zeros(4)), ("inference-mode", inference),
        ("non-contiguous", lambda: torch.zeros(4, 6, device=device).t()),
        ("negative-view", lambda: torch.zeros(4, device=device)._neg_view()),
        ("Parameter", lambda: torch.nn.Parameter(torch.zeros(4, device=device))),
        ("int32", lambda: torch.zeros(4, dtype=torch.int32, device=device))])
    if not refuses_another_index(layout, tensors):
        raise LayoutNotFound("the device index is not where the probe found it")


def refuses_another_index(layout, tensors: list[torch.Tensor]) -> bool:
    """Whether ``layout`` made for another device index (the index byte's lowest bit flipped)
    refuses every one of ``tensors``, which ``layout`` reads. Another GPU's tensors differ from
    these only in that byte; making some would start a CUDA context on every other GPU."""
    other = layout.for_device(layout.vtable, layout.key_set, layout.device_at,
                              layout.device ^ 0x0100)
    return all(other.read(t) is None for t in tensors)
