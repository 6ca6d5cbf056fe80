"""gk.clip_grad_norm_ as a drop-in under FSDP2 (``fully_shard``), on 1-D and 2-D meshes over gloo.

Our version of PyTorch's ``test_fully_shard_clip_grad_norm_.py``: a sharded model and a
replicated reference train on the same batches; each step clips both (torch's
``clip_grad_norm_`` on the reference, gradkern's on the shards) and checks that the sharded
gradients equal the reference's before clipping, that the returned norm is a DTensor whose
``full_tensor()`` is the reference's norm, that every local gradient is within ``max_norm`` and
was changed where it was not zero, and that the two models stay equal after the optimizer steps.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradkern as gk
from test_distributed import spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 3


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyTransformer(nn.Module):
    """Embedding, residual blocks, output projection: the shapes a transformer has."""

    def __init__(self, vocab=32, dim=16, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class MLPStack(nn.Sequential):
    """Column-parallel then row-parallel linear pairs, for tensor parallelism on one mesh
    dimension and FSDP on the other."""

    def __init__(self, dim=16):
        super().__init__(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim),
                         nn.ReLU(), nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))


def _record_skip(rank, out_dir, exc):
    if rank == 0:
        with open(os.path.join(out_dir, "skip"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")


def _clip_steps(model, ref, inp, max_norm, norm_type, failures):
    vector_norm = lambda g: torch.linalg.vector_norm(g, norm_type)  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        model(inp).sum().backward()
        ref(inp).sum().backward()
        ref_grads = [p.grad.detach().clone() for p in ref.parameters()]
        local_grads = [p.grad.to_local().detach().clone() for p in model.parameters()]
        for ref_grad, p in zip(ref_grads, model.parameters()):
            # FSDP2 averages over the ranks: one rounding more than the reference
            torch.testing.assert_close(p.grad.full_tensor(), ref_grad, rtol=1e-4, atol=1e-5)
        # not vacuous: something is above max_norm before clipping
        assert any(vector_norm(g).item() > max_norm for g in ref_grads)
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm,
                                                   norm_type=norm_type)
        total = gk.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)
        if not isinstance(total, torch.distributed.tensor.DTensor):
            failures.append(f"norm {norm_type}: returned {type(total).__name__}, not a DTensor")
            return
        torch.testing.assert_close(total.full_tensor(), ref_total, rtol=1e-5, atol=1e-6)
        for p, grad in zip(model.parameters(), local_grads):
            assert vector_norm(p.grad.to_local()).item() <= max_norm * (1 + 1e-5)
            if torch.count_nonzero(grad):
                assert not torch.equal(p.grad.to_local(), grad)
        opt.step()
        ref_opt.step()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), r.detach(), rtol=1e-4, atol=1e-5)


def check_1d(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    failures = []
    for norm_type in (2.0, 1.0, float("inf")):
        torch.manual_seed(42)
        model = TinyTransformer()
        ref = copy.deepcopy(model)
        inp = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
        try:
            mesh = init_device_mesh("cpu", (world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        except Exception as exc:  # this torch cannot run FSDP2 on the CPU
            _record_skip(rank, out_dir, exc)
            return
        _clip_steps(model, ref, inp, 1.0, norm_type, failures)
    assert not failures, failures


def check_2d(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    failures = []
    for norm_type in (2.0, 1.0, 3.0, float("inf")):
        torch.manual_seed(42)
        model = MLPStack()
        ref = copy.deepcopy(model)
        inp = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
        try:
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel(),
                                                  "4": ColwiseParallel(), "6": RowwiseParallel()})
            for i in (0, 2, 4, 6):
                fully_shard(model[i], mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        except Exception as exc:
            _record_skip(rank, out_dir, exc)
            return
        _clip_steps(model, ref, inp, 0.5, norm_type, failures)
    assert not failures, failures


def _run(check, world, tmp_path):
    spawn(check, world, str(tmp_path))
    if (tmp_path / "skip").exists():
        pytest.skip(f"FSDP2 does not run on the CPU with this torch: "
                    f"{(tmp_path / 'skip').read_text()}")


def test_clip_grad_norm_fsdp2_1d_mesh(tmp_path):
    _run(check_1d, 2, tmp_path)


def test_clip_grad_norm_fsdp2_tp_2d_mesh(tmp_path):
    _run(check_2d, 4, tmp_path)
