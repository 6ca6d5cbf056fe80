"""Bitwise reproducibility (runs, thread counts) and accuracy against float64 arithmetic."""

import os
import subprocess
import sys

import pytest
import torch

import gradkern as gk
from helpers import make_params

_SCRIPT = """
import torch, gradkern as gk
gk.set_backend({backend!r})
gen = torch.Generator().manual_seed(0)
grads = [torch.randn(n, generator=gen) for n in (3, 1_000_003, 65_536, 250_000)]
grads.append(torch.randn(300_001, generator=gen).bfloat16())
# enough small tensors that the C++ backend reduces them while it is still reading the table
grads += [torch.randn(int(n), generator=gen) for n in torch.randint(0, 3000, (300,), generator=gen)]
class P:
    def __init__(self, g):
        self.grad = g
for p in (2.0, 1.0, 3.0):
    s = gk.grad_stats([P(g) for g in grads], p)
    print(float(s.total_norm.double()).hex(), [float(x).hex() for x in s.norm.double()])
"""


@pytest.mark.parametrize("name", ["cpp", "numba"])
def test_bitwise_identical_for_any_thread_count(name, tmp_path):
    if not gk.backends()[name].usable:
        pytest.skip(f"{name} not usable")
    outputs = set()
    for threads in ("1", "2", "3"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", _SCRIPT.format(backend=name)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        outputs.add(out)
    assert len(outputs) == 1


def test_a_small_pass_gives_the_bits_of_a_threaded_one(backend):
    # The C++ backend runs a pass over fewer than four work items (about 256K elements) on the
    # calling thread and a larger one on every thread: each gradient's statistics must not
    # depend on which way its list went. Every backend is held to the same.
    small = make_params([(7,), (1_000,), (70_001,)], seed=5)
    large = small + make_params([(2_000_000,)], seed=6)
    for p in (2.0, 1.0, 3.0):
        alone, together = gk.grad_stats(small, p), gk.grad_stats(large, p)
        for field in ("norm", "max_abs", "nonfinite", "zeros"):
            assert torch.equal(getattr(alone, field), getattr(together, field)[:3]), (p, field)


def test_repeated_runs_are_bitwise_identical(backend):
    params = make_params([(123_457,), (65_536 * 3,), (11,)], seed=3)
    first = gk.grad_stats(params)
    for _ in range(3):
        again = gk.grad_stats(params)
        assert torch.equal(first.norm, again.norm) and torch.equal(first.total_norm,
                                                                     again.total_norm)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_fp32_accuracy_on_2e7_elements(backend, p):
    gen = torch.Generator().manual_seed(11)
    # Values in [1, 3]: all terms have one sign, which is where naive fp32 sums drift most.
    g = torch.rand(20_000_000, generator=gen) * 2 + 1
    exact = torch.linalg.vector_norm(g.double(), p).item()
    got = gk.get_total_norm([g], p).double().item()
    # 1e-6 plus the final rounding to fp32 (6e-8)
    assert abs(got - exact) / exact <= 1e-6


def _relative_errors(g: torch.Tensor, p: float) -> tuple[float, float]:
    """Relative errors of get_total_norm and grad_stats' norm of one tensor."""
    exact = torch.linalg.vector_norm(g.double(), p).item()
    total = gk.get_total_norm([g], p).double().item()
    stats = gk.grad_stats([type("P", (), {"grad": g})()], p).norm.double().item()
    return abs(total - exact) / exact, abs(stats - exact) / exact


@pytest.mark.parametrize("scale", [2.0**-80, 2.0**-45, 2.0**-38, 1.0, 2.0**55, 2.0**62, 2.0**70])
@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_across_the_exponent_range(backend, scale, p, dtype):
    """The C++ loop adds fp32 and bf16 terms in short fp32 runs: squares of |g| < 2^-63 would be
    subnormal there and those of |g| >= 2^64 infinite, so chunks outside 2^-40 <= max|g| < 2^60
    must be re-reduced in fp64. Without that, 2^-80 gives 0 and 2^62 and 2^70 give inf."""
    gen = torch.Generator().manual_seed(5)
    g = ((torch.rand(200_003, generator=gen) + 1) * scale).to(dtype)  # one sign, [1, 2) x scale
    final_rounding = {torch.float32: 6e-8, torch.bfloat16: 4e-3}[dtype]  # to the result dtype
    for err in _relative_errors(g, p):
        assert err <= 1e-6 + final_rounding, (scale, p, err)


def test_fp32_accuracy_on_constant_gradients(backend):
    """Equal values make every fp32 run round the same way, so run errors do not average out
    as they do on random values; the 1e-6 bound must hold anyway."""
    gen = torch.Generator().manual_seed(3)
    for c in (torch.rand(32, generator=gen) + 1).tolist():
        g = torch.full((65_536 + 100,), c)  # a whole chunk and a short one
        for p in (1.0, 2.0):
            for err in _relative_errors(g, p):
                assert err <= 1e-6 + 6e-8, (c, p, err)


@pytest.mark.skipif(os.environ.get("GRADKERN_TEST_BIGMEM") != "1",
                    reason="set GRADKERN_TEST_BIGMEM=1 to run (needs ~9 GB of memory)")
def test_bigmem_tensor_over_2_31_elements(backend):
    if backend == "torch":
        pytest.skip("the float64 reference would need ~17 GB more")
    n = 2**31 + 1001
    g = torch.ones(n, dtype=torch.float32)
    g[-1] = -3.0
    assert gk.get_total_norm([g], float("inf")).item() == 3.0
    assert gk.get_total_norm([g], 1.0).item() == pytest.approx(n - 1 + 3.0, rel=1e-7)
    s = gk.grad_stats([type("P", (), {"grad": g})()])
    assert s.numel.item() == n and s.zeros.item() == 0
    gk.clip_grad_value_([type("P", (), {"grad": g})()], 2.0)
    assert g[-1].item() == -2.0 and g[n // 2].item() == 1.0


_ISA_SCRIPT = """
import numpy as np, torch, gradkern as gk
from gradkern import _cpu
from gradkern._constants import DTYPE_CODES
gk.set_backend("cpp")
gen = torch.Generator().manual_seed(1)
out = []
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    grads = [torch.randn(n, generator=gen).to(dtype) for n in (1, 17, 65_536 + 5, 100_003)]
    grads[2][::7] = 0
    grads.append(grads[3].clone())
    grads[-1][12_345] = float("nan")
    grads[-1][99_999] = float("inf")
    # The float64 power sums themselves, not only the norms rounded to the result dtype, at
    # scales inside and outside the range of the fast loop's fp32 runs.
    scaled = [g * s for g in grads[:4] for s in (1.0, 1e-20, 1e30) if (g * s).isfinite().all()]
    table = (np.array([g.data_ptr() for g in scaled], np.uint64),
             np.array([g.numel() for g in scaled], np.int64),
             np.full(len(scaled), DTYPE_CODES[dtype], np.int8))
    for kind, p in ((1, 1.0), (2, 2.0), (4, 3.0)):
        sums = np.empty(len(scaled))
        _cpu.tensor_stats(*table, kind, p, sums, np.empty(len(scaled)),
                          np.empty(len(scaled), np.int64), np.empty(len(scaled), np.int64))
        out.append([x.hex() for x in sums])
    for p in (2.0, 1.0, float("inf"), 0.0, 3.0, float("-inf")):
        s = gk.grad_stats(grads[:4], p)
        out.append([float(x).hex() for x in s.norm.double()])
        out.append([float(x).hex() for x in s.max_abs.double()] + s.zeros.tolist())
        s = gk.grad_stats(grads, p)
        out.append(s.nonfinite.tolist())
    clipped = [g.clone() for g in grads]
    gk.clip_(clipped, max_norm=1.0, value=0.01)
    out.append([g.view(torch.int16 if g.element_size() == 2 else torch.int32
                       if g.element_size() == 4 else torch.int64).sum().item() for g in clipped])
    clamped = [g.clone() for g in grads]
    gk.clip_(clamped, value=1.5)
    out.append([g.view(torch.int16 if g.element_size() == 2 else torch.int32
                       if g.element_size() == 4 else torch.int64).sum().item() for g in clamped])
print(out)
"""


def _isa_script_output(tmp_path, isa: str, read_ahead: str) -> str:
    env = {**os.environ, "GRADKERN_CPU_ISA": isa, "GRADKERN_CPU_READ_AHEAD": read_ahead}
    probe = "from gradkern import _native; b = _native.cpu.build_info(); " \
            "print(b['active_isa'], b['reads_ahead'])"
    active = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.split()
    assert active[1] == str(read_ahead == "1")  # the override took effect
    return subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout


def test_baseline_and_avx2_kernels_agree_bitwise(tmp_path):
    """The hot loops are built twice (portable and AVX2), each with and without the read-ahead
    prefetches; all four tables must give the same bits."""
    if not gk.backends()["cpp"].usable:
        pytest.skip("cpp not usable")
    from gradkern import _native

    if "avx2" not in _native.cpu.build_info()["kernel_isas"].split():
        pytest.skip("only the baseline build of the hot loops exists on this platform")
    outputs = {(isa, ahead): _isa_script_output(tmp_path, isa, ahead)
               for isa in ("baseline", "native") for ahead in ("0", "1")}
    assert outputs[("native", "0")]  # the script printed its bits
    assert len(set(outputs.values())) == 1, outputs
