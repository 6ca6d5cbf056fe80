"""The CUDA backends (compiled ``cuda`` and the ``numba_cuda`` fallback) against the pure-torch
reference, plus what only a GPU can show: no host sync, CUDA-graph capture, other streams. Every
test here runs once per CUDA backend and skips without a GPU; GRADKERN_REQUIRE=cuda,numba_cuda
turns a backend that cannot run into a failure."""

import pytest
import torch

import gradkern as gk
from helpers import reference_norm, ulp_tolerance, use_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

CUDA_BACKENDS = ("cuda", "numba_cuda")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NORMS = [2.0, 1.0, float("inf"), 0.0, 3.0, float("-inf")]


class _Holder:
    """Something with a .grad, without allocating a parameter as large as the gradient."""

    def __init__(self, grad):
        self.grad = grad


def cuda_grads(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, generator=gen, device="cuda").to(dtype) for n in sizes]


@pytest.fixture(autouse=True, params=CUDA_BACKENDS)
def cuda_backend(request):
    yield from use_backend(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_total_norm_matches_reference(dtype, p):
    grads = cuda_grads([1, 17, 65_536, 65_537, 300_001, 0], dtype)
    got = gk.get_total_norm(grads, p)
    # torch rounds the norm to the grads' dtype: an fp16 L1 or L0 norm over 450k values is inf
    want = reference_norm([g.cpu() for g in grads], p).to(dtype)
    assert got.device.type == "cuda" and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, rtol=ulp_tolerance(dtype), atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_stats_fields_match_cpu_backend(dtype):
    grads = cuda_grads([5, 70_000, 1_000], dtype, seed=1)
    grads[1][::3] = 0
    grads[2][7] = float("nan")
    grads[0][1] = float("inf")
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
    s = gk.grad_stats(params)
    gk.set_backend("cpp" if gk.backends()["cpp"].usable else "torch")
    cpu_params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g.cpu()))
        p.grad = g.cpu()
        cpu_params.append(p)
    c = gk.grad_stats(cpu_params)
    assert s.nonfinite.cpu().tolist() == c.nonfinite.tolist() == [1, 0, 1]
    assert s.zeros.cpu().tolist() == c.zeros.tolist()
    torch.testing.assert_close(s.max_abs.cpu(), c.max_abs, equal_nan=True)
    torch.testing.assert_close(s.norm.cpu(), c.norm, equal_nan=True, rtol=ulp_tolerance(dtype),
                               atol=0)


def test_twenty_thousand_tensors_and_reproducibility():
    grads = cuda_grads([4096] * 20_000, seed=2)
    first = gk.get_total_norm(grads)
    assert torch.equal(first, gk.get_total_norm(grads))
    torch.testing.assert_close(first.double().cpu(), reference_norm([g.cpu() for g in grads], 2.0),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_matches_torch(dtype):
    a = cuda_grads([1000, 70_000, 3], dtype, seed=3)
    b = [g.clone() for g in a]
    pa = [torch.nn.Parameter(torch.zeros_like(g)) for g in a]
    pb = [torch.nn.Parameter(torch.zeros_like(g)) for g in b]
    for p, g in zip(pa, a):
        p.grad = g
    for p, g in zip(pb, b):
        p.grad = g
    gk.clip_grad_norm_(pa, 1.0)
    torch.nn.utils.clip_grad_norm_(pb, 1.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=ulp_tolerance(dtype) * 4, atol=1e-6)
    gk.clip_grad_value_(pa, 0.01)
    torch.nn.utils.clip_grad_value_(pb, 0.01)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=ulp_tolerance(dtype) * 4, atol=1e-6)


def test_non_contiguous_grads():
    g = torch.randn(300, 500, device="cuda").t()
    assert not g.is_contiguous()
    torch.testing.assert_close(gk.get_total_norm([g]), torch.linalg.vector_norm(g),
                               rtol=1e-6, atol=0)
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    expected = g.clamp(-0.1, 0.1)
    gk.clip_grad_value_([p], 0.1)
    assert torch.equal(p.grad, expected)


def test_no_host_sync_in_the_hot_calls():
    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (100, 70_000)]
    for p in params:
        p.grad = torch.randn_like(p)
    gk.clip_(params, max_norm=1.0)  # builds and caches the device table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gk.clip_(params, max_norm=1.0, value=0.5)
        gk.clip_grad_norm_(params, 1.0)
        gk.clip_grad_value_(params, 0.5)
        gk.grad_stats(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay():
    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (1000, 70_000)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    source = [p.grad.clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gk.clip_grad_norm_(params, 1.0)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = gk.clip_grad_norm_(params, 1.0)
    for p, s in zip(params, source):
        p.grad.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    assert norm.item() == pytest.approx(torch.cat([s.reshape(-1) for s in source]).norm().item(),
                                        rel=1e-5)
    assert torch.cat([p.grad.reshape(-1) for p in params]).norm().item() == pytest.approx(
        1.0, rel=1e-4)


def test_runs_on_the_current_stream():
    grads = cuda_grads([70_000, 123], seed=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = gk.get_total_norm(grads)
    side.synchronize()
    torch.testing.assert_close(got, torch.linalg.vector_norm(torch.cat(grads)), rtol=1e-6, atol=0)


@pytest.mark.skipif(torch.cuda.is_available() and
                    torch.cuda.get_device_properties(0).total_memory < 16 * 2**30,
                    reason="needs ~9 GB of GPU memory")
def test_tensor_over_2_31_elements_fp16():
    n = 2**31 + 1000
    g = torch.zeros(n, dtype=torch.float16, device="cuda")
    g[-1] = 3.0
    g[0] = 4.0
    assert gk.get_total_norm([g]).item() == pytest.approx(5.0)
    s = gk.grad_stats([_Holder(g)])
    assert s.zeros.item() == n - 2
    del g
    torch.cuda.empty_cache()


def test_cuda_rows_are_read_directly_as_torchs_getters_say():
    import os

    from gradkern import _table

    if os.environ.get("GRADKERN_DIRECT_READ", "1") == "0":
        pytest.skip("GRADKERN_DIRECT_READ=0 in this run")
    device = torch.device("cuda", torch.cuda.current_device())
    grads = [torch.ones(1000, device=device) for _ in range(3)]
    gk.get_total_norm(grads)  # the device table is built outside the capture, as torch asks
    # the layout probed afresh: never inside a graph capture (a call there uses the getters) ...
    _table._CUDA_LAYOUTS.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = gk.get_total_norm(grads)
    graph.replay()
    torch.testing.assert_close(norm.cpu(), torch.tensor(3000.0).sqrt())
    assert not _table._CUDA_LAYOUTS
    # ... and with no host sync of its own
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = _table.reader_arguments(device)[2]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layout.direct and layout.device_at >= 0, _table.reader_report(device)
    base = torch.randn(10_000, device=device)
    tensors = [base, base[123:], base[:0], torch.zeros((), device=device)]
    tensors += [base.to(dtype)[7:] for dtype in DTYPES]
    for t in tensors:
        assert layout.read(t) == (t.data_ptr(), t.numel(), DTYPES.index(t.dtype)), t.dtype
    for t in (base.cpu(), base.view(100, 100).t(), torch.nn.Parameter(base.clone()),
              base.to(torch.int32)):
        assert layout.read(t) is None


def test_new_gradients_inside_a_graph_capture_raise_a_clear_error():
    grads = [torch.ones(100, device="cuda") * (i + 1) for i in range(3)]  # never seen before
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up step outside the capture"):
        with torch.cuda.graph(graph):
            gk.get_total_norm(grads)
    # outside the capture the same call works, and then it can be captured
    torch.testing.assert_close(gk.get_total_norm(grads).cpu(), torch.tensor(1400.0).sqrt())


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_agc_runs_on_the_gpu_kernels_and_matches_timm(norm_type):
    """AGC's unit table (one entry per row) goes to the CUDA kernels, as on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 7)).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.3
    expected = {n: p.grad.detach().cpu().double() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():  # timm's rule in float64 on the CPU
        w, g = p.detach().cpu().double(), expected[name]
        dims = tuple(range(1, g.ndim))
        unit = (lambda x: x.norm(norm_type)) if g.ndim <= 1 else \
            (lambda x: x.norm(norm_type, dim=dims, keepdim=True))
        max_norm = unit(w).clamp(min=1e-3) * 0.01
        g_norm = unit(g)
        expected[name] = torch.where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6)))
    gk.AGC(clip_factor=0.01, norm_type=norm_type).clip_(model.parameters())
    for name, p in model.named_parameters():
        assert p.grad.device.type == "cuda"
        torch.testing.assert_close(p.grad.cpu().double(), expected[name], rtol=1e-5, atol=1e-7)
