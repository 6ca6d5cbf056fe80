"""group=: sharded gradient sets on 2 and 4 gloo ranks against the same tensors unsharded.

Each test spawns its ranks once and runs a batch of checks in them (spawning costs seconds);
a failed assertion in any rank fails the test.
"""

import contextlib
import gc
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradkern as gk
from gradkern.distributed import RemoteError
from helpers import NARROW_INPUT_RTOL

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

NORMS = [2.0, 1.0, 3.0, float("inf"), float("-inf"), 0.0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, *args):
    mp.spawn(_entry, args=(world, free_port(), worker, args), nprocs=world, join=True)


def _entry(rank, world, port, worker, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        worker(rank, world, *args)
        # Every rank finishes its collectives before any tears the group down: destroying a
        # gloo group while a peer still has work in flight aborts the process.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def full_set(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [7, 1000, 65_537, 3, 250]
    return [(torch.randn(n, generator=gen) * (i + 1)).to(dtype) for i, n in enumerate(sizes)]


def my_tensors(full, rank, world):
    """Whole tensors dealt out round-robin: rank r holds tensors r, r + world, ..."""
    return full[rank::world]


def my_shards(full, rank, world):
    """FSDP-style: every rank holds a slice of every tensor (some slices empty)."""
    return [t.tensor_split(world)[rank].clone() for t in full]


class Holder:
    def __init__(self, grad):
        self.grad = grad


@contextlib.contextmanager
def counted_all_reduce():
    """Yields a list that receives the element count of every all_reduce made inside."""
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


# ---- workers ---------------------------------------------------------------------------------

def check_norms_and_clipping(rank, world):
    group = dist.group.WORLD
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        full = full_set(dtype)
        for p in NORMS:
            want = gk.get_total_norm(full, p)
            got = gk.get_total_norm(my_tensors(full, rank, world), p, group=group)
            torch.testing.assert_close(got, want, rtol=2e-6 if dtype != torch.bfloat16 else 1e-2,
                                       atol=0)
            got = gk.get_total_norm(my_shards(full, rank, world), p, group=group)
            torch.testing.assert_close(got, want, rtol=2e-6 if dtype != torch.bfloat16 else 1e-2,
                                       atol=0)
    # NaN on one rank poisons the whole set's norm on every rank
    full = full_set()
    mine = my_tensors(full, rank, world)
    if rank == world - 1:
        mine[0][0] = float("nan")
    assert torch.isnan(gk.get_total_norm(mine, group=group))
    # clip_grad_norm_: the same as clipping the full set, then sharding
    full = full_set(seed=1)
    reference = [Holder(t.clone()) for t in full]
    want_norm = gk.clip_grad_norm_(reference, 1.0)
    mine = [Holder(t) for t in my_shards(full, rank, world)]
    got_norm = gk.clip_grad_norm_(mine, 1.0, group=group)
    torch.testing.assert_close(got_norm, want_norm, rtol=1e-6, atol=0)
    for h, r in zip(mine, reference):
        torch.testing.assert_close(h.grad, r.grad.tensor_split(world)[rank], rtol=1e-6, atol=0)
    # per-tensor clipping of FSDP shards uses each whole tensor's norm
    full = full_set(seed=2)
    reference = [Holder(t.clone()) for t in full]
    gk.clip_(reference, max_norm=0.5, per_tensor=True)
    mine = [Holder(t) for t in my_shards(full, rank, world)]
    gk.clip_(mine, max_norm=0.5, per_tensor=True, group=group)
    for h, r in zip(mine, reference):
        torch.testing.assert_close(h.grad, r.grad.tensor_split(world)[rank], rtol=1e-6, atol=0)
    # grad_stats of shards: whole-tensor statistics on every rank
    full = full_set(seed=3)
    full[1][::5] = 0
    full[2][9] = float("inf")
    want = gk.grad_stats([Holder(t) for t in full])
    got = gk.grad_stats([Holder(t) for t in my_shards(full, rank, world)], group=group)
    torch.testing.assert_close(got.norm, want.norm, rtol=1e-6, atol=0)
    assert torch.equal(got.max_abs, want.max_abs)
    assert torch.equal(got.zeros, want.zeros) and torch.equal(got.nonfinite, want.nonfinite)
    assert torch.equal(got.numel, want.numel)
    # a rank with no gradients at all still takes part
    mine = [] if rank == 0 else my_tensors(full_set(), rank - 1, world - 1)
    torch.testing.assert_close(gk.get_total_norm(mine, group=group),
                               gk.get_total_norm(full_set()), rtol=1e-6, atol=0)
    # the clippers with group= agree with the unsharded clipper
    full = full_set(seed=4)
    reference = [Holder(t.clone()) for t in full]
    want_norm = gk.ClipByNorm(2.0).clip_(reference)
    mine = [Holder(t) for t in my_shards(full, rank, world)]
    got_norm = gk.ClipByNorm(2.0, group=group).clip_(mine)
    torch.testing.assert_close(got_norm, want_norm, rtol=1e-6, atol=0)
    for h, r in zip(mine, reference):
        torch.testing.assert_close(h.grad, r.grad.tensor_split(world)[rank], rtol=1e-6, atol=0)


def check_errors_reach_every_rank(rank, world):
    group = dist.group.WORLD
    mine = [torch.randn(10)]
    if rank == 1:
        mine = [torch.ones(10, dtype=torch.int32)]  # only this rank has a bad gradient
    with pytest.raises(TypeError if rank == 1 else RemoteError):
        gk.get_total_norm(mine, group=group)
    # error_if_nonfinite: the same verdict on every rank, even where the grads are finite
    mine = [torch.randn(10)]
    if rank == 0:
        mine[0][3] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        gk.clip_grad_norm_([Holder(mine[0])], 1.0, error_if_nonfinite=True, group=group)
    # afterwards the group still works
    assert torch.isfinite(gk.get_total_norm([torch.ones(3)], group=group))


def check_two_collectives_per_call(rank, world):
    group = dist.group.WORLD
    with counted_all_reduce() as calls:
        many = [torch.randn(4) for _ in range(1000)]
        gk.get_total_norm(many, group=group)
        assert len(calls) == 2 and max(calls) <= 6  # fixed-size message, whatever the count
        calls.clear()
        gk.clip_(many, max_norm=1.0, group=group)
        assert len(calls) == 2
        calls.clear()
        gk.grad_stats([Holder(t) for t in many], group=group)
        assert len(calls) == 2 and max(calls) == 5 * 1000 + 1  # one packed message


class ShardedNet(nn.Module):
    """The same module structure on every rank; each parameter holds this rank's rows."""

    def __init__(self, shapes, rank, world):
        super().__init__()
        self.layers = nn.ModuleList()
        for rows, cols in shapes:
            m = nn.Module()
            m.weight = nn.Parameter(torch.zeros(rows, cols).tensor_split(world)[rank].clone())
            self.layers.append(m)


def check_monitor(rank, world, out_dir):
    group = dist.group.WORLD
    shapes = [(8, 4), (6, 8), (1, 6)]
    net = ShardedNet(shapes, rank, world)
    path = os.path.join(out_dir, f"rank{rank}.jsonl")
    mon = gk.Monitor(net, log_every=2, sinks=[gk.sinks.JSONL(path)], group=group,
                     detectors=[gk.detectors.NonFinite()])
    gen = torch.Generator().manual_seed(0)
    full_grads = []
    for step in range(4):
        grads = [torch.randn(r, c, generator=gen) for r, c in shapes]
        if step == 3:
            grads[1][-1, 0] = float("nan")  # the last row lands on the last rank
        full_grads.append(grads)
        for p, g in zip(net.parameters(), grads):
            p.grad = g.tensor_split(world)[rank].clone()
        mon.step()
    mon.close()
    for s, grads in zip(mon.history, full_grads):
        for i, g in enumerate(grads):
            if s.step < 3 or i != 1:
                assert (abs(s.grad_sq[i] - float(g.double().pow(2).sum()))
                        <= NARROW_INPUT_RTOL * s.grad_sq[i])
            assert s.numel[i] == g.numel()
    event = [e for e in mon.events if e.kind == "nonfinite"]
    assert len(event) == 1 and event[0].layers == ["layers.1"]
    assert event[0].evidence["ranks"] == [world - 1]
    lines = open(path).read().splitlines()
    if rank == 0:
        header, *records = [json.loads(line) for line in lines]
        assert header["type"] == "run" and header["settings"]["world_size"] == world
        assert [r["step"] for r in records if r["type"] == "step"] == [0, 1, 2, 3]
        assert records[0]["layers"]["layers.0"]["grad_norm"] == pytest.approx(
            float(full_grads[0][0].norm()), rel=1e-6)
    else:
        assert lines == []  # only rank 0 writes


# ---- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
def test_sharded_norms_and_clipping_match_unsharded(world):
    spawn(check_norms_and_clipping, world)


def test_an_error_on_one_rank_is_raised_on_every_rank():
    spawn(check_errors_reach_every_rank, 2)


def test_one_packed_message_per_reduction():
    spawn(check_two_collectives_per_call, 2)


def test_monitor_reduces_across_ranks_and_writes_on_rank_0(tmp_path):
    spawn(check_monitor, 2, str(tmp_path))


def check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    full = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    full[2][5, 1] = 0.0
    want_norm = {p: gk.get_total_norm(full, p) for p in NORMS}
    want_stats = gk.grad_stats([Holder(t) for t in full])
    meshes = [init_device_mesh("cpu", (world,))]
    if world == 4:
        meshes.append(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
    for mesh in meshes:
        layouts = ([[Shard(0)], [Shard(1)], [Replicate()]] if mesh.ndim == 1 else
                   [[Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(1), Replicate()],
                    [Replicate(), Replicate()]])
        for placements in layouts:
            # clones: a local shard can share storage with its source, and clipping writes
            grads = [distribute_tensor(t.clone(), mesh, placements) for t in full]
            # mixed placements in one list: the last tensor replicated everywhere
            grads[-1] = distribute_tensor(full[-1].clone(), mesh, [Replicate()] * mesh.ndim)
            for p in NORMS:
                got = gk.get_total_norm(grads, p)  # a DTensor, as torch's is
                assert isinstance(got, DTensor) and got.device_mesh is mesh
                assert all(pl.is_replicate() for pl in got.placements)
                torch.testing.assert_close(got.full_tensor(), want_norm[p], rtol=2e-6, atol=0)
            s = gk.grad_stats([Holder(g) for g in grads])
            torch.testing.assert_close(s.norm, want_stats.norm, rtol=2e-6, atol=0)
            assert torch.equal(s.zeros, want_stats.zeros)
            assert torch.equal(s.numel, want_stats.numel)
            # clipping the global norm: every shard scaled by the whole set's coefficient
            holders = [Holder(g) for g in grads]
            reference = [Holder(t.clone()) for t in full]
            gk.clip_grad_norm_(reference, 1.0)
            gk.clip_grad_norm_(holders, 1.0)
            for h, r in zip(holders, reference):
                torch.testing.assert_close(h.grad.full_tensor(), r.grad, rtol=1e-6, atol=1e-7)
            # per-tensor clipping: each shard scaled by its whole tensor's coefficient
            holders = [Holder(distribute_tensor(t.clone(), mesh, placements)) for t in full]
            reference = [Holder(t.clone()) for t in full]
            gk.clip_(reference, max_norm=0.5, per_tensor=True)
            gk.clip_(holders, max_norm=0.5, per_tensor=True)
            for h, r in zip(holders, reference):
                torch.testing.assert_close(h.grad.full_tensor(), r.grad, rtol=1e-6, atol=1e-7)


    # Shard(0) and Shard(1) on one mesh share one packed reduction
    mesh = meshes[0]
    mixed = [distribute_tensor(t.clone(), mesh, [Shard(i % 2)]) for i, t in enumerate(full)]
    with counted_all_reduce() as calls:
        got = gk.get_total_norm(mixed)
        value = got.full_tensor()  # already reduced: no collective of its own
    torch.testing.assert_close(value, want_norm[2.0], rtol=2e-6, atol=0)
    assert len(calls) == 2

    # Partial: each rank holds a part of the sum; reduced once before the statistics
    from torch.distributed.tensor import DTensor, Partial

    mesh = meshes[0]
    partial = [DTensor.from_local(t / world, mesh, [Partial()]) for t in full]
    torch.testing.assert_close(gk.get_total_norm(partial).full_tensor(), want_norm[2.0],
                               rtol=2e-6, atol=0)
    # plain tensors stay plain
    assert type(gk.get_total_norm(full)) is torch.Tensor


@pytest.mark.parametrize("world", [2, 4])
def test_dtensor_gradients_on_1d_and_2d_meshes(world):
    spawn(check_dtensor, world)


def check_fsdp2(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    reference = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    try:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        model(x).pow(2).mean().backward()
    except Exception as exc:  # this torch cannot run FSDP2 on the CPU
        if rank == 0:
            with open(os.path.join(out_dir, "skip"), "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
        return
    # FSDP2 puts the shards on its mesh's device: the GPU wherever torch has one
    device = next(model.parameters()).device
    reference.to(device)
    reference(x.to(device)).pow(2).mean().backward()
    # every rank saw the same batch, so FSDP2's averaged grads equal the reference grads
    want = gk.get_total_norm([p.grad for p in reference.parameters()])
    assert gk.grad_stats(model.parameters()).numel.tolist() == [p.numel() for p in
                                                                reference.parameters()]
    got = gk.clip_grad_norm_(model.parameters(), 0.1)
    torch.testing.assert_close(got.to_local(), want, rtol=1e-5, atol=0)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    # each rank's shard against its rows of the reference (FSDP2 cuts dim 0 like torch.chunk);
    # full_tensor() would do the same through torch's functional collectives, which crashed
    # (SIGSEGV) with gloo on CUDA tensors under torch 2.11
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.to_local(), r.grad.chunk(world, dim=0)[rank],
                                   rtol=1e-5, atol=1e-7)
    # the Monitor on the sharded model reports the whole model's layers
    mon = gk.Monitor(model, group=dist.group.WORLD, log_every=1, detectors=None)
    mon.step()
    mon.close()
    s = mon.history[0]
    for i, layer in enumerate(("0", "2")):
        grads = [p.grad for n, p in reference.named_parameters() if n.startswith(layer + ".")]
        want_sq = sum(float(g.double().pow(2).sum()) for g in grads)
        assert abs(s.grad_sq[i] - want_sq) <= 1e-5 * want_sq
        assert s.numel[i] == sum(g.numel() for g in grads)


def test_fsdp2_fully_shard_gradients(tmp_path):
    spawn(check_fsdp2, 2, str(tmp_path))
    if (tmp_path / "skip").exists():
        pytest.skip(f"FSDP2 does not run on the CPU with this torch: {(tmp_path / 'skip').read_text()}")


def check_dtensor_in_place(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    finite = [torch.randn(8, 6, generator=gen) * 3 for _ in range(3)]
    want_total = torch.linalg.vector_norm(torch.cat([t.flatten() for t in finite]))
    coef = 1.0 / (float(want_total) + 1e-6)
    with_nan = [t.clone() for t in finite]
    with_nan[1][6, 2] = float("nan")  # under Shard(0): on the last rank only

    def dtensors(tensors, placements):
        return [distribute_tensor(t.clone(), mesh, placements) for t in tensors]

    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        # clip_grad_value_: each shard clamped where it lives
        holders = [Holder(g) for g in dtensors(finite, placements)]
        gk.clip_grad_value_(holders, 1.0)
        for h, t in zip(holders, finite):
            assert torch.equal(h.grad.full_tensor(), t.clamp(-1.0, 1.0))
        # clip_grads_with_norm_ with torch's total norm over the same DTensors
        holders = [Holder(g) for g in dtensors(finite, placements)]
        total = torch.nn.utils.get_total_norm([h.grad for h in holders])
        gk.clip_grads_with_norm_(holders, 1.0, total)
        for h, t in zip(holders, finite):
            torch.testing.assert_close(h.grad.full_tensor(), t * coef, rtol=1e-6, atol=1e-7)
        # find_nonfinite: this rank's part of each gradient
        grads = dtensors(with_nan, placements)
        want = [f"p{i}" for i, g in enumerate(grads) if not bool(g.to_local().isfinite().all())]
        assert gk.find_nonfinite([(f"p{i}", Holder(g)) for i, g in enumerate(grads)]) == want

    # Partial: scaling each term scales the sum; clamping each term does not clamp the sum
    partial = [DTensor.from_local(t / world, mesh, [Partial()]) for t in finite]
    before = [p.to_local().clone() for p in partial]
    with pytest.raises(TypeError, match="Partial"):
        gk.clip_grad_value_([Holder(p) for p in partial], 0.1)
    assert all(torch.equal(p.to_local(), b) for p, b in zip(partial, before))
    gk.clip_grads_with_norm_([Holder(p) for p in partial], 1.0, want_total)
    for p, t in zip(partial, finite):
        torch.testing.assert_close(p.full_tensor(), t * coef, rtol=1e-6, atol=1e-7)
    # the norm clippers read the sum and scale the terms (they once scaled a reduced copy)
    reference = [Holder(t.clone()) for t in finite]
    gk.clip_(reference, max_norm=0.5, per_tensor=True)
    for clip, want in ((lambda hs: gk.clip_grad_norm_(hs, 1.0), [t * coef for t in finite]),
                       (lambda hs: gk.clip_(hs, max_norm=0.5, per_tensor=True),
                        [r.grad for r in reference])):
        partial = [DTensor.from_local(t / world, mesh, [Partial()]) for t in finite]
        torch.testing.assert_close(clip([Holder(p) for p in partial]).full_tensor(), want_total,
                                   rtol=1e-6, atol=0)
        for p, w in zip(partial, want):
            torch.testing.assert_close(p.full_tensor(), w, rtol=1e-6, atol=1e-7)
    partial = [DTensor.from_local(t / world, mesh, [Partial()]) for t in finite]
    before = [p.to_local().clone() for p in partial]
    with pytest.raises(TypeError, match="Partial"):
        gk.clip_([Holder(p) for p in partial], max_norm=1.0, value=0.1)
    assert all(torch.equal(p.to_local(), b) for p, b in zip(partial, before))

    # clippers: the local shards, with the group that shards them
    shards = [Holder(g) for g in dtensors(finite, [Shard(0)])]
    with pytest.raises(ValueError, match="group"):
        gk.ClipByNorm(1.0).clip_(shards)
    assert all(torch.equal(h.grad.full_tensor(), t) for h, t in zip(shards, finite))
    norm = gk.ClipByNorm(1.0, group=dist.group.WORLD).clip_(shards)
    torch.testing.assert_close(norm, want_total, rtol=1e-6, atol=0)
    for h, t in zip(shards, finite):
        torch.testing.assert_close(h.grad.full_tensor(), t * coef, rtol=1e-6, atol=1e-7)
    # AGC on row-sharded weights: every unit (row) lives on one rank
    weights = [nn.Parameter(torch.randn(8, 6, generator=gen)) for _ in finite]
    reference = [nn.Parameter(w.detach().clone()) for w in weights]
    sharded = [nn.Parameter(distribute_tensor(w.detach().clone(), mesh, [Shard(0)]))
               for w in weights]
    for r, s, t in zip(reference, sharded, finite):
        r.grad = t.clone()
        s.grad = distribute_tensor(t.clone(), mesh, [Shard(0)])
    gk.AGC(clip_factor=0.05).clip_(reference)
    gk.AGC(clip_factor=0.05, group=dist.group.WORLD).clip_(sharded)
    assert any(not torch.equal(r.grad, t) for r, t in zip(reference, finite))  # it did clip
    for r, s in zip(reference, sharded):
        torch.testing.assert_close(s.grad.full_tensor(), r.grad, rtol=1e-6, atol=1e-7)

    # the Monitor refuses sharded parameters without their group, before attaching anything
    model = nn.Linear(6, 8)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="group"):
        gk.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_dtensor_gradients_clipped_in_place_and_checked():
    spawn(check_dtensor_in_place, 2)
