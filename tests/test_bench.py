"""The benchmark's building blocks (the timings themselves are never asserted)."""

import math

import torch

from gradkern.bench import LimitPasses, measure_limits
from gradkern.scenarios import make_grads, scenarios


def test_gpu_scenarios_are_the_issue_sizes():
    sets = scenarios(quick=False, device="cuda")
    elements = {name: sum(math.prod(shape) for shape, _ in spec) for name, spec in sets.items()}
    assert elements["many-small 20,000 x 4,096"] == 20_000 * 4096
    llama = next(name for name in sets if name.startswith("LLaMA"))
    assert 6.7e9 < elements[llama] < 6.8e9
    assert {dtype for _, dtype in sets[llama]} == {torch.bfloat16}
    assert len(scenarios(quick=False, device="cpu")["many-small 10,000 x 1,000"]) == 10_000


def test_benchmark_parameters_hold_full_gradients_but_no_weight_memory():
    params = make_grads([((300, 7), torch.bfloat16), ((5,), torch.float32)])
    for p, (shape, dtype) in zip(params, [((300, 7), torch.bfloat16), ((5,), torch.float32)]):
        assert p.shape == shape and p.grad.shape == shape and p.grad.dtype == dtype
        assert p.untyped_storage().nbytes() == p.element_size()
        assert p.grad.std() > 0.5


def test_limits_on_the_cpu_are_a_read_pass_only():
    read_bw, copy_bw = measure_limits(8 << 20, repeats=2, device="cpu")
    assert read_bw > 0 and copy_bw is None


def test_limit_passes_turn_times_into_bandwidths():
    limit = LimitPasses(8 << 20, device="cpu")
    assert limit.size == 8 << 20 and len(limit.passes) == 1
    assert limit.passes[0]().item() == limit.size // 4  # a sum over ones: every element read
    assert limit.bandwidths([0.5e-3]) == (limit.size / 0.5e-3, None)
    assert LimitPasses(1 << 40, device="meta").size == 4 << 30  # capped at 4 GiB
