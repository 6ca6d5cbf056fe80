"""Direct table reads (gradkern/_torch_layout.py, src/torch_layout.h) against torch's getters."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradkern as gk

pytestmark = pytest.mark.skipif(not gk.backends()["cpp"].usable, reason="needs gradkern._cpu")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def layout():
    from gradkern._table import reader_arguments

    return reader_arguments()[2]


def direct_reads_wanted() -> bool:
    return os.environ.get("GRADKERN_DIRECT_READ", "1") != "0"


@pytest.mark.skipif(not direct_reads_wanted(), reason="GRADKERN_DIRECT_READ=0 in this run")
def test_the_layout_of_this_torch_is_found_and_direct_reads_are_on():
    from gradkern import _table

    assert layout().direct, _table.reader_report()
    assert _table.reader_report().startswith("direct")


def _plain_tensors():
    x = torch.nn.Parameter(torch.randn(33, 7))
    torch.nn.functional.gelu(x @ torch.randn(7, 5)).square().mean().backward()
    tensors = [x.grad, x.detach(), torch.arange(100.0)[37:91],
               torch.from_numpy(np.arange(20, dtype=np.float32)),
               torch.from_numpy(np.ones((5, 4), dtype=np.float16))[1:],
               torch.randn(4_000_000), torch.ones(3, 4).t().contiguous()]
    for dtype in DTYPES:
        base = torch.randn(5_000).to(dtype)
        tensors += [base, base[1_234:], base[17:17 + 61 * 63].view(61, 63),
                    torch.zeros((), dtype=dtype), torch.empty(0, dtype=dtype), base[4_999:4_999],
                    torch.ones(7, 1, 1, 1).to(dtype)]
    return tensors


@pytest.mark.skipif(not direct_reads_wanted(), reason="GRADKERN_DIRECT_READ=0 in this run")
def test_every_plain_tensor_reads_as_torchs_getters_say():
    for t in _plain_tensors():
        assert layout().read(t) == (t.data_ptr(), t.numel(), DTYPES.index(t.dtype)), t.shape


def _must_go_through_getters():
    def cow_source():
        t = torch.randn(8)
        torch._lazy_clone(t)
        return t

    def throwing():
        t = torch.randn(8)
        torch._C._set_throw_on_mutable_data_ptr(t)
        return t

    def inference():
        with torch.inference_mode():
            return torch.randn(8)

    class Sub(torch.Tensor):
        pass

    return {
        "transposed": lambda: torch.randn(3, 8).t(),
        "every other": lambda: torch.randn(16)[::2],
        "channels last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "negative view": lambda: torch.randn(8)._neg_view(),
        "copy-on-write clone": lambda: torch._lazy_clone(torch.randn(8)),
        "copy-on-write source": cow_source,
        "throw on write": throwing,
        "inference mode": inference,
        "Parameter": lambda: torch.nn.Parameter(torch.randn(8)),
        "subclass": lambda: torch.randn(8).as_subclass(Sub),
        "int64": lambda: torch.arange(8),
        "complex": lambda: torch.randn(8, dtype=torch.complex64),
        "sparse": lambda: torch.randn(8).to_sparse(),
        "meta": lambda: torch.empty(8, device="meta"),
        "not a tensor": lambda: np.ones(8, dtype=np.float32),
    }


@pytest.mark.parametrize("kind", list(_must_go_through_getters()))
def test_tensors_that_need_torchs_getters_are_not_read_directly(kind):
    assert layout().read(_must_go_through_getters()[kind]()) is None


def test_a_negative_view_gets_the_results_of_the_values_it_shows():
    x = torch.randn(1000) * 3
    torch.testing.assert_close(gk.get_total_norm([x._neg_view()]), torch.linalg.vector_norm(x))
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = x.clone()._neg_view()
    gk.clip_grad_value_([p], 1.0)
    assert torch.equal(p.grad, (-x).clamp(-1.0, 1.0))


def test_clipping_a_copy_on_write_gradient_leaves_the_tensor_it_shares_memory_with_alone():
    source = torch.full((1000,), 5.0)
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = torch._lazy_clone(source)
    gk.clip_grad_value_([p], 1.0)
    assert torch.equal(p.grad, torch.ones(1000)) and torch.equal(source, torch.full((1000,), 5.0))
    p.grad = torch._lazy_clone(source)
    gk.clip_grad_norm_([p], 1.0)
    assert torch.equal(source, torch.full((1000,), 5.0)) and p.grad.norm() < 1.0 + 1e-6


FIELDS = ["vtable", "key_set", "key_set_at", "storage_at", "storage_offset_at", "numel_at",
          "dtype_at", "contiguous_byte", "contiguous_mask", "data_at", "nbytes_at", "checks_at",
          "checks_mask"]


@pytest.mark.skipif(not direct_reads_wanted(), reason="GRADKERN_DIRECT_READ=0 in this run")
@pytest.mark.parametrize("field", FIELDS)
def test_the_import_check_rejects_a_layout_with_any_field_wrong(field):
    """What keeps a torch with another layout from being read wrongly: if the probe pinned any
    field down wrongly, the check on fresh tensors fails and the getters stay in charge."""
    from gradkern import _cpu, _torch_layout

    fields = _torch_layout._locate_fields()
    _torch_layout._check(_cpu.TorchLayout(torch.Tensor, layout().impl, fields))  # as found: fine
    wrong = dict(fields)
    if field in ("vtable", "key_set"):
        wrong[field] ^= 1 << 12
    elif field == "contiguous_mask":
        wrong[field] = (fields[field] << 1) & 0xFF or 1
    elif field == "checks_mask":  # the neighbouring bits: unused in torch's one-byte bools
        wrong[field] = (fields[field] << 1) & (2**64 - 1)
    elif field == "dtype_at":
        wrong[field] += 2
    elif field == "contiguous_byte":
        wrong[field] += 1
    else:
        wrong[field] += 8
    try:
        candidate = _cpu.TorchLayout(torch.Tensor, layout().impl, wrong)
    except ValueError:
        return  # refused outright: an implausible offset
    with pytest.raises(_torch_layout.LayoutNotFound):
        _torch_layout._check(candidate)


def test_GRADKERN_DIRECT_READ_0_leaves_the_rows_to_torchs_getters(tmp_path):
    code = ("import torch, gradkern as gk; from gradkern import _table; "
            "print(_table.reader_report()); print(_table.reader_arguments()[2].direct); "
            "print(float(gk.get_total_norm([torch.ones(4), torch.ones(5)]) ** 2))")
    env = dict(os.environ, GRADKERN_DIRECT_READ="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    reader, direct, norm_sq = out.stdout.split("\n")[:3]
    assert "getters" in reader and "GRADKERN_DIRECT_READ=0" in reader
    assert direct == "False" and abs(float(norm_sq) - 9.0) < 1e-9


def test_the_reader_in_use_is_reported_by_info():
    from gradkern import _table
    from gradkern.tools.info import build_report

    assert build_report()["table_reader"] == _table.reader_report()


def test_any_failure_of_the_probe_leaves_the_getters_in_charge(monkeypatch):
    from gradkern import _cpu, _torch_layout

    def broken():
        raise TypeError("a torch whose internals moved")

    monkeypatch.setattr(_torch_layout, "_locate_fields", broken)
    found, report = _torch_layout.find_layout(_cpu)
    assert not found.direct and found.impl == layout().impl
    assert "getters" in report and "internals moved" in report


# -- layouts for one device (find_cuda_layout). Without a GPU, meta tensors stand in: their
# c10::Device differs from a CPU tensor's in the type byte, as a CUDA tensor's does.

_META_DEVICE_TYPE = 14  # c10::DeviceType::Meta


def _impl_bytes(tensors, size=None):
    import ctypes

    from gradkern._torch_layout import _usable_size

    usable = _usable_size()
    size = size or min(min(usable(t._cdata) for t in tensors), 512)
    return np.stack([np.frombuffer(ctypes.string_at(t._cdata, size), dtype=np.uint8)
                     for t in tensors])


def _device_offset_from_meta_tensors():
    from gradkern._torch_layout import device_field_offset

    cpu = [torch.zeros(3 + k, dtype=d) for k, d in enumerate(DTYPES)] + [torch.randn(4, 5)[1:]]
    meta = [torch.empty(3 + k, dtype=d, device="meta") for k, d in enumerate(DTYPES)]
    return device_field_offset(_impl_bytes(cpu), _impl_bytes(meta), _META_DEVICE_TYPE, 0xFF)


def test_the_device_field_is_the_one_place_where_the_device_bytes_differ():
    from gradkern._torch_layout import LayoutNotFound, device_field_offset

    rng = np.random.default_rng(0)
    cpu, cuda = (rng.integers(2, 250, size=(6, 96), dtype=np.uint8) for _ in range(2))
    cpu[:, 40:42], cuda[:, 40:42] = (0, 0xFF), (1, 3)
    assert device_field_offset(cpu, cuda, 1, 3) == 40
    with pytest.raises(LayoutNotFound, match="0 places"):
        device_field_offset(cpu, cuda, 1, 2)  # another GPU's index
    cuda[2, 40] = 0  # one probe says otherwise
    with pytest.raises(LayoutNotFound, match="0 places"):
        device_field_offset(cpu, cuda, 1, 3)
    cuda[2, 40] = 1
    cpu[:, 70:72], cuda[:, 70:72] = (0, 0xFF), (1, 3)  # ambiguous
    with pytest.raises(LayoutNotFound, match="2 places"):
        device_field_offset(cpu, cuda, 1, 3)


@pytest.mark.skipif(not direct_reads_wanted(), reason="GRADKERN_DIRECT_READ=0 in this run")
def test_a_layout_for_one_device_reads_only_tensors_whose_device_bytes_match():
    probe = torch.zeros(4)
    vtable = int(_impl_bytes([probe], 8).view(np.uint64)[0, 0])
    keys = torch._C._dispatch_keys(probe).raw_repr()
    at = _device_offset_from_meta_tensors()
    as_cpu = layout().for_device(vtable, keys, at, 0 | 0xFF << 8)  # CPU's own device bytes
    as_gpu = layout().for_device(vtable, keys, at, 1 | 0 << 8)  # cuda:0's
    assert as_cpu.device_at == at and layout().device_at == -1
    for t in _plain_tensors():
        assert as_cpu.read(t) == layout().read(t), t.shape
        assert as_gpu.read(t) is None, t.shape
    for make in _must_go_through_getters().values():
        assert as_cpu.read(make()) is None
    with pytest.raises(ValueError, match="implausible"):
        layout().for_device(vtable, keys, 4, 0)
    from gradkern._torch_layout import refuses_another_index

    assert as_cpu.device == 0xFF00 and refuses_another_index(as_cpu, _plain_tensors())


def test_without_a_gpu_cuda_rows_come_from_the_getters():
    from gradkern import _table, _torch_layout

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (tests/test_cuda.py checks direct CUDA reads)")
    found, report = _torch_layout.find_cuda_layout(layout(), 0)
    assert found is layout() and report.startswith("torch's getters for cuda:0")
    if not direct_reads_wanted():
        return
    assert _torch_layout.find_cuda_layout(
        _table._cpu.TorchLayout(torch.Tensor, layout().impl), 0)[1].startswith("torch's getters")


def test_importing_gradkern_leaves_torchs_random_numbers_alone():
    code = ("import torch; torch.manual_seed(7); import gradkern; "
            "from gradkern import _table; print(torch.randn(3).tolist())")
    plain = "import torch; torch.manual_seed(7); print(torch.randn(3).tolist())"
    outputs = [subprocess.run([sys.executable, "-c", c], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.dirname(sys.executable))
                              ).stdout for c in (code, plain)]
    assert outputs[0] == outputs[1]
