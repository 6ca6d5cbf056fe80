"""Backend discovery, forcing, and the GRADKERN_REQUIRE contract."""

import os
import subprocess
import sys

import pytest
import torch

import gradkern as gk
from helpers import required_backends


def test_backends_report_every_backend():
    info = gk.backends()
    assert set(info) == {"cpp", "cuda", "numba", "numba_cuda", "torch"}
    assert info["torch"].usable and info["torch"].compiled
    for name, b in info.items():
        assert b.usable == (b.reason == ""), name
        if b.usable:
            assert b.compiled


def test_required_backends_are_usable():
    info = gk.backends()
    for name in required_backends():
        if name == "cuda" and not torch.cuda.is_available():
            # Without a GPU the CUDA module can be compiled but not usable; it must carry the
            # kernels either way.
            from gradkern.backends import cuda

            assert info[name].compiled, info[name].reason
            assert cuda.KERNELS_READY
        elif name == "numba_cuda" and not torch.cuda.is_available():
            assert info[name].compiled, info[name].reason
        else:
            assert info[name].usable, f"{name}: {info[name].reason}"


def test_set_backend_returns_previous_and_rejects_unknown():
    previous = gk.set_backend("torch")
    try:
        assert gk.set_backend(None) == "torch"
        assert gk.get_backend() is None
        with pytest.raises(ValueError, match="unknown backend"):
            gk.set_backend("fortran")
    finally:
        gk.set_backend(previous)


def test_forcing_an_unusable_backend_raises():
    unusable = [n for n, b in gk.backends().items() if not b.usable]
    if not unusable:
        pytest.skip("every backend is usable on this machine")
    with pytest.raises(RuntimeError, match="not usable"):
        gk.set_backend(unusable[0])


def _run(args: list[str], cwd, **env) -> str:
    # cwd away from the repository root, whose gradkern/ source folder would shadow the build
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env,
                         cwd=cwd, check=True)
    return out.stdout.strip()


def test_environment_variable_forces_backend(tmp_path):
    code = ("import torch, gradkern as gk; from gradkern.backends import backend_for;"
            "print(gk.get_backend(), backend_for(torch.device('cpu')).name)")
    assert _run(["-c", code], tmp_path, GRADKERN_BACKEND="torch") == "torch torch"


def test_info_command_prints_build(tmp_path):
    out = _run(["-m", "gradkern", "info"], tmp_path)
    assert "backends:" in out and "torch" in out
    if gk.backends()["cpp"].usable:
        assert "OpenMP" in out and "SIMD" in out


def test_numba_cuda_that_cannot_compile_is_reported_unusable():
    # numba-cuda imports and sees the GPU, then fails at its first compile when it does not
    # match numpy (seen on an H100 machine: numpy 2.5 has no np.row_stack)
    from gradkern.backends import numba_cuda_compile_error

    class BrokenCompiler:
        @staticmethod
        def compile_ptx(pyfunc, signature):
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    class WorkingCompiler:
        calls = []

        @staticmethod
        def compile_ptx(pyfunc, signature):
            WorkingCompiler.calls.append(signature)
            return ".entry touch", None

    why = numba_cuda_compile_error(BrokenCompiler)
    assert "cannot compile" in why and "row_stack" in why and "numpy" in why
    assert numba_cuda_compile_error(WorkingCompiler) == ""
    assert len(WorkingCompiler.calls) == 1


def test_a_table_upload_during_cuda_graph_capture_is_refused(monkeypatch):
    # Inside a capture the upload would be recorded as a copy from a pinned staging block that
    # torch reuses afterwards; a warm-up call outside the capture caches the table instead.
    import numpy as np

    from gradkern.backends import _device_table

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm-up step outside the capture"):
        _device_table.to_device_async(np.zeros(3, dtype=np.int64), torch.device("cuda", 0))


def test_gradients_at_new_addresses_upload_only_their_addresses(monkeypatch):
    # zero_grad(set_to_none=True) frees the gradients every step, so the next ones may land
    # elsewhere: the plan of their sizes and dtypes is reused and only the addresses travel.
    # The upload is replaced by a host copy so that this runs without a GPU.
    import numpy as np

    from gradkern._chunks import CHUNK_ELEMS, chunk_plan
    from gradkern.backends import _device_table

    uploads = []

    def upload(a, device):
        uploads.append(len(a))
        return torch.from_numpy(np.array(a))

    monkeypatch.setattr(_device_table, "to_device_async", upload)

    class Table:  # what the cache reads of a WorkSet
        def __init__(self, addresses, numel, codes):
            self.rows = (np.array(addresses, np.uint64), np.array(numel, np.int64),
                         np.array(codes, np.int8))

        def table(self):
            return self.rows

    numel, codes = [5, 0, 2 * CHUNK_ELEMS + 1], [0, 3, 2]
    cache = _device_table.DeviceTableCache()
    first = cache.get(Table([4096, 8192, 12288], numel, codes), "cpu")
    moved = cache.get(Table([16384, 20480, 24576], numel, codes), "cpu")
    again = cache.get(Table([4096, 8192, 12288], numel, codes), "cpu")
    assert again is first and moved.plan is first.plan
    # the first plan and its addresses, then only the new addresses (the plan is reused)
    assert len(uploads) == 3 and uploads[2] == 3
    assert moved.addresses.tolist() == [16384, 20480, 24576]
    assert moved.numel.tolist() == numel and moved.codes.tolist() == codes
    assert moved.codes.dtype == torch.int8
    for got, want in zip((moved.chunk_tensor, moved.chunk_begin, moved.first_chunk),
                         chunk_plan(np.array(numel, np.int64))):
        assert got.tolist() == want.tolist()
    resized = cache.get(Table([4096, 8192, 12288], [5, 1, 3], codes), "cpu")
    assert resized.plan is not first.plan and resized.numel.tolist() == [5, 1, 3]
