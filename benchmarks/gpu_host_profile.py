"""Where the host time of one gradkern call goes for many small CUDA gradients.

On the GPU, 20,000 gradients of 4,096 elements take the kernels about 0.14 ms; everything else is
the host reading the list. This script times each host stage, then the GPU time alone (a CUDA
graph replay of the same call), then prints a cProfile of the whole call. Run on a GPU machine,
from outside the repository root:

    python benchmarks/gpu_host_profile.py [n_tensors] [elements]
"""

import cProfile
import pstats
import sys
import time

import torch

import gradkern as gk
from gradkern import _params, _table
from gradkern._norms import parse_norm_type
from gradkern.backends import backend_for


def best_ms(fn, repeats: int = 15) -> str:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return f"{best * 1e3:8.3f} ms"


def main(n: int = 20_000, size: int = 4_096) -> None:
    params = [torch.nn.Parameter(torch.zeros(size, device="cuda")) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(size, device="cuda")
    grads = [p.grad for p in params]
    device = grads[0].device
    ws = _table.read_dense_table(grads, device)
    print(f"{n} x {size}: dense reader hit: {ws is not None}")
    backend, spec = backend_for(device), parse_norm_type(2.0)
    print("grads_of         ", best_ms(lambda: _params.grads_of(params)))
    print("read_dense_table ", best_ms(lambda: _table.read_dense_table(grads, device)))
    print("tables.get       ", best_ms(lambda: backend._tables.get(ws, device)))
    print("backend stats    ", best_ms(lambda: backend.tensor_stats(ws, spec)))
    print("get_total_norm   ", best_ms(lambda: gk.get_total_norm(grads)))
    print("clip_grad_norm_  ", best_ms(lambda: gk.clip_grad_norm_(params, 1e9)))
    print("torch _foreach_norm", best_ms(lambda: torch._foreach_norm(grads)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gk.get_total_norm(grads)
    print("graph replay (GPU time of get_total_norm)", best_ms(graph.replay))
    torch.testing.assert_close(out, torch.linalg.vector_norm(torch.stack(grads)))
    cProfile.runctx("for _ in range(10): gk.get_total_norm(grads)", globals(),
                    {"gk": gk, "grads": grads}, "/tmp/gradkern-host.prof")
    pstats.Stats("/tmp/gradkern-host.prof").sort_stats("tottime").print_stats(10)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
