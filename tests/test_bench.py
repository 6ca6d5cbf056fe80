"""The benchmark's building blocks (the timings themselves are never asserted)."""

import math

import torch

from gradkern.bench import LimitPasses
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


def test_limit_reads_the_gradients_themselves_where_they_are_large():
    large = [torch.ones(1 << 19), torch.ones(3, 1 << 18)]  # 2 MiB and 3 MiB of fp32
    limit = LimitPasses(large + [torch.ones(10, dtype=torch.bfloat16)], device="cpu")
    assert limit.read_source == "the gradients" and limit.read_bytes == 5 << 20
    assert len(limit.passes) == 1 and limit.copy_bytes == 0
    sums = limit.passes[0]()
    assert [s.item() for s in sums] == [t.numel() for t in large]  # every element read
    assert limit.bandwidths([0.5e-3]) == ((5 << 20) / 0.5e-3, None)


def test_limit_reads_a_flat_buffer_for_many_small_tensors():
    small = [torch.ones(1000) for _ in range(50)]
    limit = LimitPasses(small, device="cpu")
    assert limit.read_source == "a flat buffer" and limit.read_bytes == 50 * 4000
    assert limit.passes[0]().item() == 50 * 1000
    # large tensors holding less than half the bytes do not count either
    mixed = LimitPasses([torch.ones(1 << 18), torch.ones(1 << 20, dtype=torch.bfloat16)], "cpu")
    assert mixed.read_source == "a flat buffer"
    # a flat buffer is capped at 4 GiB
    huge = LimitPasses([torch.empty(3 << 30, dtype=torch.float16, device="meta")], "meta")
    assert huge.read_bytes == 4 << 30
