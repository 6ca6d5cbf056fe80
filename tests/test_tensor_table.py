"""The C table reader (gradkern._cpu.read_tensor_table) against what torch reports."""

import pytest
import torch

import gradkern as gk

pytestmark = pytest.mark.skipif(not gk.backends()["cpp"].usable, reason="needs gradkern._cpu")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def read(tensors):
    from gradkern import _cpu

    return _cpu.read_tensor_table(tensors, torch.Tensor, DTYPES, "is_cpu", -1)


class MyTensor(torch.Tensor):
    pass


def test_plain_tensors_are_read_exactly():
    tensors = [torch.randn(5, 3).to(d) for d in DTYPES] + [torch.empty(0), torch.tensor(2.0)]
    data, numel, codes, ok = read(tensors)
    assert ok.all()
    assert data.tolist() == [t.data_ptr() for t in tensors]
    assert numel.tolist() == [t.numel() for t in tensors]
    assert codes.tolist() == [0, 1, 2, 3, 0, 0]


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6).t(),                      # not contiguous
    lambda: torch.randn(4, 4).to_sparse(),              # sparse COO: no data pointer
    lambda: torch.randn(4, 4).to_sparse_csr(),          # no is_contiguous
    lambda: torch.ones(3, dtype=torch.int32),           # unsupported dtype
    lambda: torch.randn(3).as_subclass(MyTensor),       # subclass: semantics unknown
    lambda: torch.randn(3, device="meta"),              # not on the CPU
    lambda: "not a tensor",
])
def test_anything_unusual_is_left_to_the_python_path(make):
    _, _, _, ok = read([torch.randn(3), make(), torch.randn(2)])
    assert ok.tolist() == [True, False, True]


def test_unusual_inputs_still_get_correct_results():
    g = torch.randn(4, 6)
    mixed = [torch.randn(3), g.t(), torch.randn(4, 4).to_sparse()]
    expected = torch.linalg.vector_norm(torch.cat([t.to_dense().reshape(-1) for t in mixed]))
    torch.testing.assert_close(gk.get_total_norm(mixed), expected)
