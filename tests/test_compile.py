"""The public functions inside torch.compile: one graph (fullgraph=True) on the aot_eager and
inductor backends, the eager results bit for bit, the gradients written in place without
copies, and a clear refusal for what cannot be in a graph."""

import logging
import warnings

import pytest
import torch
import torch.distributed as dist

import gradkern as gk
from gradkern import _ops

BACKENDS = ["aot_eager", "inductor"]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4).to(torch.float64))


def fresh_grads(m, poison=False):
    m.zero_grad(set_to_none=False)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    (m[2](m[1](m[0](x)).double())).pow(2).sum().backward()
    if poison:
        m[0].weight.grad[0, 0] = float("nan")


def _equal(a, b):
    if isinstance(a, gk.GradStats):
        return a.names == b.names and all(
            torch.equal(getattr(a, k), getattr(b, k))
            for k in ("norm", "max_abs", "nonfinite", "zeros", "numel", "total_norm"))
    return (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


CALLS = {
    "clip_grad_norm_": lambda m: gk.clip_grad_norm_(m.parameters(), 1.0),
    "clip_grad_norm_ inf": lambda m: gk.clip_grad_norm_(m.parameters(), 0.5, norm_type="inf"),
    "clip_grad_value_": lambda m: gk.clip_grad_value_(m.parameters(), 0.1),
    "get_total_norm": lambda m: gk.get_total_norm([p.grad for p in m.parameters()], 3.0),
    "get_total_norm p=0": lambda m: gk.get_total_norm([p.grad for p in m.parameters()], 0.0),
    "clip_grads_with_norm_": lambda m: gk.clip_grads_with_norm_(m.parameters(), 1.0,
                                                                torch.tensor(10.0)),
    "clip_": lambda m: gk.clip_(m.named_parameters(), 1.0, value=0.05),
    "clip_ per tensor": lambda m: gk.clip_(m.parameters(), 0.3, per_tensor=True),
    "grad_stats": lambda m: gk.grad_stats(m.named_parameters()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_one_graph_with_the_eager_results(backend, name, caplog):
    call = CALLS[name]
    eager_model, compiled_model = model(), model()
    fresh_grads(eager_model)
    want = call(eager_model)
    fresh_grads(compiled_model)
    before = [p.grad.data_ptr() for p in compiled_model.parameters()]
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch's own imports
        got = torch.compile(call, backend=backend, fullgraph=True)(compiled_model)
    assert _equal(want, got)
    for p, q, ptr in zip(eager_model.parameters(), compiled_model.parameters(), before):
        assert torch.equal(p.grad, q.grad)
        assert q.grad.data_ptr() == ptr
    assert not [r for r in caplog.records if r.name.startswith("torch._dynamo")]


@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grad_value_", "clip_"])
def test_inductor_writes_the_gradients_in_place_without_copies(name):
    from torch._inductor.utils import run_and_get_code

    m = model()
    fresh_grads(m)
    torch._dynamo.reset()
    compiled = torch.compile(CALLS[name], backend="inductor", fullgraph=True)
    _, code = run_and_get_code(compiled, m)
    text = "\n".join(code)
    assert "torch.ops.gradkern.clip_in_place.default" in text
    assert ".copy_(" not in text and "clone" not in text and "aten.copy" not in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen).to(dtype) for shape in [(7,), (3, 5), (0,)]]
    for norm_type in (2.0, 1.0, float("inf"), 0.0, 3.0):
        torch.library.opcheck(torch.ops.gradkern.tensor_stats.default, (grads, norm_type))
    torch.library.opcheck(torch.ops.gradkern.clip_in_place.default,
                          ([g.clone() for g in grads], torch.tensor([0.5], dtype=torch.float64),
                           0.2))
    torch.library.opcheck(torch.ops.gradkern.clip_in_place.default,
                          ([g.clone() for g in grads], None, 0.2))
    assert _ops.tensor_stats is not None


def _fullgraph(fn, *args):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)


def _graph_breaks(fn, *args):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager")(*args)


def test_error_if_nonfinite_is_refused_in_one_graph_and_works_across_a_break():
    m = model()
    fresh_grads(m, poison=True)
    call = lambda m: gk.clip_grad_norm_(m.parameters(), 1.0, error_if_nonfinite=True)  # noqa: E731
    with pytest.raises(Exception, match="error_if_nonfinite=True reads the norm on the host"):
        _fullgraph(call, m)
    with pytest.raises(RuntimeError, match="non-finite"):
        _graph_breaks(call, m)
    fresh_grads(m)
    want = gk.get_total_norm([p.grad for p in m.parameters()])
    assert torch.equal(_graph_breaks(call, m), want)


def test_find_nonfinite_is_refused_in_one_graph_and_works_across_a_break():
    m = model()
    fresh_grads(m, poison=True)
    call = lambda m: gk.find_nonfinite(m.named_parameters())  # noqa: E731
    with pytest.raises(Exception, match="find_nonfinite returns parameter names"):
        _fullgraph(call, m)
    assert _graph_breaks(call, m) == ["0.weight"]


@pytest.fixture
def one_rank_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_group_is_refused_in_one_graph_and_works_across_a_break(one_rank_group):
    m = model()
    fresh_grads(m)
    want = gk.get_total_norm([p.grad for p in m.parameters()])
    call = lambda m: gk.clip_grad_norm_(m.parameters(), 1e9, group=one_rank_group)  # noqa: E731
    with pytest.raises(Exception, match="take torch.distributed collectives"):
        _fullgraph(call, m)
    torch.testing.assert_close(_graph_breaks(call, m), want)


def test_eager_calls_do_not_go_through_the_dispatcher(monkeypatch):
    """The direct path stays the eager one: the custom ops only run inside a graph."""
    def refuse(*_):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(_ops, "tensor_stats", refuse)
    monkeypatch.setattr(_ops, "clip_in_place", refuse)
    m = model()
    fresh_grads(m)
    for call in CALLS.values():
        call(m)
