"""The C table reader (gradkern._cpu.read_tensor_table) against what torch reports."""

import pytest
import torch

import gradkern as gk

pytestmark = pytest.mark.skipif(not gk.backends()["cpp"].usable, reason="needs gradkern._cpu")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def read(tensors, reader="getters"):
    """The table through torch's getters, or with the layout found at import (direct reads)."""
    from gradkern import _cpu
    from gradkern._table import reader_arguments

    layout = reader_arguments()[2] if reader == "direct" else _cpu.TorchLayout(torch.Tensor, -1)
    return _cpu.read_tensor_table(tensors, torch.Tensor, DTYPES, "is_cpu", -1, layout)


class MyTensor(torch.Tensor):
    pass


@pytest.mark.parametrize("reader", ["getters", "direct"])
def test_plain_tensors_are_read_exactly(reader):
    tensors = [torch.randn(5, 3).to(d) for d in DTYPES] + [torch.empty(0), torch.tensor(2.0)]
    data, numel, codes, ok, dtype_mask = read(tensors, reader)
    assert ok.all()
    assert data.tolist() == [t.data_ptr() for t in tensors]
    assert numel.tolist() == [t.numel() for t in tensors]
    assert codes.tolist() == [0, 1, 2, 3, 0, 0]
    assert dtype_mask == 0b1111
    assert read(tensors[1:2] + tensors[3:4], reader)[4] == 0b1010


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6).t(),                      # not contiguous
    lambda: torch.randn(4, 4).to_sparse(),              # sparse COO: no data pointer
    lambda: torch.randn(4, 4).to_sparse_csr(),          # no is_contiguous
    lambda: torch.ones(3, dtype=torch.int32),           # unsupported dtype
    lambda: torch.randn(3).as_subclass(MyTensor),       # subclass: semantics unknown
    lambda: torch.randn(3, device="meta"),              # not on the CPU
    lambda: "not a tensor",
])
@pytest.mark.parametrize("reader", ["getters", "direct"])
def test_anything_unusual_is_left_to_the_python_path(make, reader):
    ok = read([torch.randn(3), make(), torch.randn(2)], reader)[3]
    assert ok.tolist() == [True, False, True]


def test_unusual_inputs_still_get_correct_results():
    g = torch.randn(4, 6)
    mixed = [torch.randn(3), g.t(), torch.randn(4, 4).to_sparse()]
    expected = torch.linalg.vector_norm(torch.cat([t.to_dense().reshape(-1) for t in mixed]))
    torch.testing.assert_close(gk.get_total_norm(mixed), expected)


def _stats_arrays(n):
    import numpy as np

    return [np.empty(n), np.empty(n), np.empty(n, np.int64), np.empty(n, np.int64)]


def _read_then_reduce(tensors, kind, p):
    from gradkern import _cpu

    data, numel, codes, ok, dtype_mask = read(tensors)
    out = _stats_arrays(len(tensors))
    if ok.all():
        _cpu.tensor_stats(data, numel, codes, kind, p, *out)
    return (data, numel, codes, bool(ok.all()), dtype_mask), out


def _read_and_reduce(tensors, kind, p):
    from gradkern import _cpu
    from gradkern._table import reader_arguments

    out = _stats_arrays(len(tensors))
    table = _cpu.read_tensor_stats(tensors, *reader_arguments(), kind, p, *out)
    return table, out


def _mixed_tensors(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (n,), generator=gen).tolist()
    tensors = [torch.randn(s, generator=gen).to(DTYPES[i % 4]) for i, s in enumerate(sizes)]
    tensors[5] = torch.randn(200_000, generator=gen)  # more than one chunk: the pass after the read
    tensors[9] = torch.randn(70_000, generator=gen).bfloat16()
    tensors[11].zero_()
    tensors[12][3] = float("nan")
    tensors[13][0] = float("-inf")
    return tensors


@pytest.mark.parametrize("kind,p", [(0, 0.0), (1, 1.0), (2, 2.0), (3, 0.0), (4, 3.0)])
@pytest.mark.parametrize("n", [0, 10, 1_500])
def test_reading_while_reducing_gives_the_same_bits_as_reading_then_reducing(kind, p, n):
    import numpy as np

    tensors = _mixed_tensors(n) if n >= 14 else [torch.randn(7) for _ in range(n)]
    (data, numel, codes, ok, dtype_mask), fused = _read_and_reduce(tensors, kind, p)
    (data2, numel2, codes2, ok2, dtype_mask2), separate = _read_then_reduce(tensors, kind, p)
    assert ok and ok2
    assert data.tolist() == data2.tolist() and numel.tolist() == numel2.tolist()
    assert codes.tolist() == codes2.tolist()
    assert dtype_mask == dtype_mask2 == sum(1 << c for c in set(codes.tolist()))
    for a, b in zip(fused, separate):
        assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("where", [0, 700, 1_499])
def test_reading_while_reducing_stops_at_a_tensor_it_cannot_read(where):
    tensors = [t.nan_to_num(posinf=1.0, neginf=-1.0) for t in _mixed_tensors(1_500)]
    tensors[where] = torch.randn(6, 5).t()
    ok = _read_and_reduce(tensors, 2, 2.0)[0][3]
    assert ok is False
    # and the public op still gets it right through the general path
    expected = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors]))
    torch.testing.assert_close(gk.get_total_norm(tensors).double(), expected)


def test_impl_offset_finds_cdata_or_nothing():
    from gradkern import _cpu
    from gradkern._table import reader_arguments

    probe = torch.empty(3)
    offset = _cpu.find_impl_offset(probe, probe._cdata)
    assert offset == reader_arguments()[2].impl
    if offset >= 0:  # the word there is the TensorImpl address, for any tensor
        import ctypes

        other = torch.randn(4, 4)[1:]
        assert ctypes.c_uint64.from_address(id(other) + offset).value == other._cdata
    assert _cpu.find_impl_offset(probe, 1) == -1


def test_a_wrong_impl_offset_costs_speed_not_results():
    from gradkern import _cpu

    tensors = [torch.randn(50) for _ in range(100)]
    for offset in [-1, 0, 10_000, *range(8, torch.Tensor.__basicsize__, 8)]:
        layout = _cpu.TorchLayout(torch.Tensor, offset)  # prefetches through it, if it fits
        assert layout.impl in (-1, offset) and not layout.direct
        data, _, _, ok, _ = _cpu.read_tensor_table(tensors, torch.Tensor, DTYPES, "is_cpu", -1,
                                                    layout)
        assert ok.all() and data.tolist() == [t.data_ptr() for t in tensors]


class GradProperty(torch.Tensor):
    """A tensor type whose .grad is its own: read through Python, not torch's descriptor."""

    @property
    def grad(self):
        return torch.full((2,), 7.0)


class Duck:
    def __init__(self, grad):
        self.grad = grad


def test_read_grads_is_p_grad_for_every_kind_of_parameter():
    from gradkern import _cpu
    from gradkern._table import reader_arguments

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(20)]
    for i, p in enumerate(params):
        if i % 3:
            p.grad = torch.full((3,), float(i))
    odd = torch.zeros(2).as_subclass(GradProperty)
    plain = torch.zeros(4, requires_grad=True)
    plain.grad = torch.ones(4)
    items = params + [odd, Duck(torch.ones(5)), Duck(None), plain]
    tensor_type, _, layout = reader_arguments()
    grads, kept = _cpu.read_grads(items, tensor_type, layout)
    expected = [(i, p.grad) for i, p in enumerate(items) if p.grad is not None]
    assert kept == [i for i, _ in expected]
    assert len(grads) == len(expected)
    assert all(g is e or torch.equal(g, e) for g, (_, e) in zip(grads, expected))
    assert torch.equal(grads[kept.index(20)], torch.full((2,), 7.0))  # the property, not torch's

    all_present = params[1:3]
    assert _cpu.read_grads(all_present, tensor_type, layout)[1] is None
    with pytest.raises(AttributeError):
        _cpu.read_grads([params[1], object()], tensor_type, layout)


def test_grads_of_without_the_compiled_reader_gives_the_same(monkeypatch):
    from gradkern import _params

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(5)]
    for p in params[::2]:
        p.grad = torch.ones(2)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    compiled = _params.grads_of(named)
    monkeypatch.setattr(_params, "_read_grads", None)
    python = _params.grads_of(named)
    assert compiled[1] == python[1] == ["p0", "p2", "p4"]
    assert all(a is b for a, b in zip(compiled[0], python[0])) and len(compiled[0]) == 3


def test_device_index_is_checked_through_get_device():
    # The CUDA path asks for a device index; CPU tensors report -1, so none of them is on
    # "device 0" (the only part of that path a machine without a GPU can exercise).
    from gradkern import _cpu

    from gradkern._table import reader_arguments

    tensors = [torch.randn(3), torch.randn(2)]
    for layout in (_cpu.TorchLayout(torch.Tensor, -1), reader_arguments()[2]):
        args = (tensors, torch.Tensor, DTYPES, "is_cpu")
        assert not _cpu.read_tensor_table(*args, 0, layout)[3].any()
        assert _cpu.read_tensor_table(*args, -1, layout)[3].all()
