"""gk.Monitor: what it records (against plain torch), hooks, skipping, sinks, accumulation."""

import builtins
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradkern as gk
from gradkern.tools.cases import CASES, train


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def backward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(32, 6, generator=gen)).pow(2).mean().backward()


def test_records_match_torch_per_layer(backend):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gk.Monitor(model, opt, log_every=3, detectors=None) as mon:
        expected = []
        for step in range(5):
            opt.zero_grad()
            backward(model, step)
            layers = {}
            for name, module in model.named_children():
                grads = [p.grad for p in module.parameters()]
                if grads:
                    flat = torch.cat([g.reshape(-1) for g in grads]).double()
                    layers[name] = (flat.norm().item(), flat.abs().max().item(),
                                    int((flat == 0).sum()), flat.numel())
            expected.append(layers)
            opt.step()
    assert mon.layers.names == ["0", "2", "4"]
    assert len(mon.history) == 5 and [s.step for s in mon.history] == list(range(5))
    for s, layers in zip(mon.history, expected):
        for i, name in enumerate(mon.layers.names):
            norm, mx, zeros, numel = layers[name]
            assert np.sqrt(s.grad_sq[i]) == pytest.approx(norm, rel=1e-6)
            assert s.grad_max[i] == pytest.approx(mx, rel=1e-6)
            assert s.zeros[i] == zeros and s.numel[i] == numel and s.nonfinite[i] == 0


def test_update_ratio_on_log_steps_matches_sgd():
    model = mlp()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gk.Monitor(model, opt, log_every=2, detectors=None) as mon:
        for step in range(4):
            opt.zero_grad()
            backward(model, step)
            before = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
    logged = [s for s in mon.history if s.update_ratio is not None]
    assert [s.step for s in logged] == [1, 3]  # the last step of each window
    # last step: plain SGD moves each layer by lr * ||g||
    s = logged[-1]
    for i in range(3):
        w = torch.cat([b.reshape(-1) for b in before[2 * i:2 * i + 2]]).double().norm()
        g = torch.cat([x.reshape(-1) for x in grads[2 * i:2 * i + 2]]).double().norm()
        assert s.weight_norm[i] == pytest.approx(w.item(), rel=1e-6)
        assert s.update_ratio[i] == pytest.approx((lr * g / w).item(), rel=1e-5)


class _TwoHeads(nn.Module):
    """A trunk and two heads, one of them in bf16; a step uses one head, so with
    ``zero_grad()`` (set_to_none) the other head has no gradient at that step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 16)
        self.head_a = nn.Linear(16, 1)
        self.head_b = nn.Linear(16, 1).to(torch.bfloat16)

    def forward(self, x, head):
        h = self.trunk(x).relu()
        return self.head_a(h) if head == "a" else self.head_b(h.bfloat16()).float()


def test_changing_set_of_gradients_matches_torch_per_layer():
    """Which parameters have a gradient changes from step to step: the per-layer records, the
    element counts and the update ratios follow it (layers without a gradient count 0)."""
    model = _TwoHeads()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    heads = ["a", "a", "b", "a", "b", "b", "a", "b"]
    expected = []
    with gk.Monitor(model, opt, log_every=2, detectors=None) as mon:
        for step, head in enumerate(heads):
            opt.zero_grad()
            gen = torch.Generator().manual_seed(step)
            model(torch.randn(8, 6, generator=gen), head).pow(2).mean().backward()
            layers, weights = {}, {}
            for name, module in model.named_children():
                params = [p for p in module.parameters() if p.grad is not None]
                if params:
                    g = torch.cat([p.grad.reshape(-1).double() for p in params])
                    w = torch.cat([p.detach().reshape(-1).double() for p in params])
                    layers[name] = (g.norm().item(), g.abs().max().item(), g.numel())
                    weights[name] = (w.norm().item(), lr * g.norm().item())
            expected.append((layers, weights))
            opt.step()
    assert mon.layers.names == ["trunk", "head_a", "head_b"]
    for s, (layers, weights) in zip(mon.history, expected):
        for i, name in enumerate(mon.layers.names):
            if name not in layers:
                assert s.numel[i] == 0 and s.grad_sq[i] == 0
                continue
            norm, mx, numel = layers[name]
            assert s.numel[i] == numel
            assert np.sqrt(s.grad_sq[i]) == pytest.approx(norm, rel=1e-6)
            assert s.grad_max[i] == pytest.approx(mx, rel=1e-6)
            if s.update_ratio is not None:  # log steps: SGD moves a layer by lr * ||g||
                w, moved = weights[name]
                assert s.weight_norm[i] == pytest.approx(w, rel=1e-6)
                # bf16 weights round the update itself
                rel = 2e-2 if name == "head_b" else 1e-5
                assert s.update_ratio[i] == pytest.approx(moved / w, rel=rel)
    assert sum(s.update_ratio is not None for s in mon.history) == len(heads) // 2


def test_log_step_without_any_gradient():
    """optimizer.step() with no gradient at all, on a log step with update tracking: the step is
    recorded with zero counts and no update ratio (it used to raise IndexError)."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gk.Monitor(model, opt, log_every=2, detectors=None) as mon:
        for step in range(4):
            opt.zero_grad()
            if step != 1:
                model(torch.randn(2, 3)).sum().backward()
            opt.step()
    assert [s.step for s in mon.history] == [0, 1, 2, 3]
    assert mon.history[1].numel.tolist() == [0] and mon.history[1].update_ratio is None
    assert mon.history[3].update_ratio is not None and mon.history[3].numel.tolist() == [4]


def test_manual_step_and_clip_without_optimizer():
    model = mlp()
    mon = gk.Monitor(model, log_every=1, clip=gk.ClipByNorm(0.01), detectors=None)
    backward(model)
    before = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    mon.step()
    after = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    mon.close()
    assert mon.history[0].total_norm == pytest.approx(before.item(), rel=1e-6)  # pre-clip
    assert after.item() == pytest.approx(0.01, rel=1e-4)


def test_float_clip_means_global_norm():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    opt.register_step_post_hook(lambda *a: seen.append(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()))
    with gk.Monitor(model, opt, clip=0.05, detectors=None):
        backward(model)
        opt.step()
    assert seen[0] == pytest.approx(0.05, rel=1e-4)


def test_skip_nonfinite_keeps_weights_and_state_finite():
    case = CASES["relu_regression_uniform_4_5"]()
    mon = train(case, 30, skip_nonfinite=True)
    assert mon.skipped_steps > 0
    assert all(torch.isfinite(p).all() for p in case.model.parameters())
    for state in case.optimizer.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    skipped = [e for e in mon.events if e.kind == "nonfinite" and e.evidence["skipped"]]
    assert len(skipped) == mon.skipped_steps
    # the gradients of the last (skipped) step are left as they were, for the loop to inspect
    assert mon.history[-1].skipped and mon.history[-1].skip_reason == "nonfinite"
    assert not all(torch.isfinite(p.grad).all() for p in case.model.parameters())


def test_skipped_step_leaves_weights_exactly_as_they_were():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with gk.Monitor(model, opt, skip_nonfinite=True, detectors=None) as mon:
        backward(model)
        opt.step()  # a good step creates Adam state
        weights = [p.detach().clone() for p in model.parameters()]
        state = [v.clone() for s in opt.state.values() for v in s.values()]
        backward(model)
        next(model.parameters()).grad[0, 0] = float("nan")
        opt.step()
    assert mon.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state, [v for s in opt.state.values()
                                                          for v in s.values()]))
    assert "step" not in vars(opt)  # hooks only: the optimizer's step was never replaced


def test_grad_scaler_observes_unscaled_grads():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gk.Monitor(model, opt, detectors=None) as mon:
        gen = torch.Generator().manual_seed(0)
        loss = model(torch.randn(32, 6, generator=gen)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
        scaler.step(opt)
        scaler.update()
    assert mon.history[0].total_norm == pytest.approx(unscaled, rel=1e-6)


def test_gradient_accumulation_observes_only_optimizer_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gk.Monitor(model, opt, log_every=2, detectors=None) as mon:
        for step in range(3):
            for micro in range(4):
                backward(model, 10 * step + micro)
            accumulated = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
            opt.step()
            opt.zero_grad()
    assert [s.step for s in mon.history] == [0, 1, 2]
    assert mon.history[-1].total_norm == pytest.approx(accumulated.item(), rel=1e-6)


def test_sinks_get_records_and_events(tmp_path):
    received = []
    case = CASES["relu_regression_uniform_4_5"]()
    path = tmp_path / "run.jsonl"
    train(case, 8, log_every=4, sinks=[received.append, gk.sinks.JSONL(path)])
    header, *lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert header["type"] == "run"  # only the JSONL file starts with the run's header
    assert len(lines) == len(received)
    assert [r["type"] for r in lines] == [r["type"] for r in received]
    steps = [r for r in lines if r["type"] == "step"]
    events = [r for r in lines if r["type"] == "event"]
    assert [r["step"] for r in steps] == list(range(8))
    assert {"exploding", "nonfinite"} <= {e["event"] for e in events}
    assert set(steps[0]["layers"]) == {"0", "2"}
    assert {"grad_norm", "grad_rms", "grad_max", "nonfinite", "zero_fraction"} <= set(
        steps[0]["layers"]["0"])


_KILLED_SCRIPT = """
import os, signal, torch, gradkern as gk
from gradkern.tools.cases import CASES
case = CASES["small_resnet"]()
mon = gk.Monitor(case.model, case.optimizer, log_every=2, sinks=[gk.sinks.JSONL({path!r})])
for step in range(100):
    case.optimizer.zero_grad()
    case.loss(case.model, case.batch(step)).backward()
    case.optimizer.step()
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_jsonl_survives_a_killed_process(tmp_path):
    path = str(tmp_path / "killed.jsonl")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SCRIPT.format(path=path)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    lines = open(path).read().splitlines()
    records = [json.loads(line) for line in lines]  # every line is complete JSON
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(6))


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="log_every"):
        gk.Monitor(model, log_every=0)
    with pytest.raises(ValueError, match="optimizer"):
        gk.Monitor(model, skip_nonfinite=True)
    with pytest.raises(ValueError, match="detectors"):
        gk.Monitor(model, detectors="some")
    with pytest.raises(ValueError, match="group_by"):
        gk.Monitor(model, group_by="tensor")
    with pytest.raises(TypeError, match="clip"):
        gk.Monitor(model, clip="1.0")
    with pytest.raises(TypeError, match="sink"):
        gk.Monitor(model, sinks=[42])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gk.Monitor(model, opt)
    with pytest.raises(RuntimeError, match="automatically"):
        mon.step()
    mon.close()


def test_group_by_parameter_and_shared_parameters():
    model = mlp()
    mon = gk.Monitor(model, group_by="parameter", detectors=None)
    assert mon.layers.names[:2] == ["0.weight", "0.bias"]
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    m2 = gk.Monitor(tied, detectors=None)
    assert m2.layers.names == ["0"] and m2.layers.is_embedding == [True]
    mon.close()
    m2.close()


def test_no_host_sync_between_log_steps(monkeypatch):
    """Between log steps nothing is read back: .item()/.cpu() on the ring would show here."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gk.Monitor(model, opt, log_every=5, detectors=None, track_updates=False)
    processed = []
    monkeypatch.setattr(mon._host, "_process", lambda window: processed.append(len(window.slots)))
    for step in range(9):
        opt.zero_grad()
        backward(model, step)
        opt.step()
        assert processed == ([] if step < 4 else [5])
    mon.close()
    assert processed == [5, 4]


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)."""

    def __init__(self):
        self.scalars, self.texts, self.histograms, self.flushes = [], [], [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def add_histogram_raw(self, tag, min, max, num, sum, sum_squares, bucket_limits,
                          bucket_counts, global_step):
        assert len(bucket_limits) == len(bucket_counts)
        assert num == builtins.sum(bucket_counts)
        self.histograms.append((tag, global_step, bucket_counts))

    def flush(self):
        self.flushes += 1


def test_tensorboard_sink_writes_scalars_events_and_histograms():
    writer = FakeWriter()
    case = CASES["relu_regression_uniform_4_5"]()
    train(case, 6, log_every=3, sinks=[gk.sinks.TensorBoard(writer, histograms=True)])
    tags = {t for t, _, _ in writer.scalars}
    assert {"gradkern/total_norm", "grad_norm/0", "grad_norm/2", "zero_fraction/0"} <= tags
    assert any(t == "gradkern/exploding" for t, _, _ in writer.texts)
    assert writer.flushes >= 2
    assert {t for t, _, _ in writer.histograms} == {"log2_abs_grad/0", "log2_abs_grad/2"}
    # log steps are 2 and 5; by step 5 every gradient is NaN/inf, which histograms leave out
    assert {s for _, s, _ in writer.histograms} == {2}


def test_log2_histograms_count_every_finite_nonzero_element():
    model = mlp()
    records = []
    mon = gk.Monitor(model, log_every=1, detectors=None, sinks=[records.append])
    mon.sinks[0].histograms = True
    mon._want_histograms = True
    backward(model)
    next(model.parameters()).grad[0, :3] = torch.tensor([0.0, 3.0, 0.25])
    expected = {"0": torch.cat([model[0].weight.grad.reshape(-1), model[0].bias.grad])}
    mon.step()
    mon.close()
    hist = records[0]["layers"]["0"]["log2_hist"]
    low, high = records[0]["log2_hist_range"]
    g = expected["0"]
    nonzero = g[g != 0].abs()
    assert sum(hist) == nonzero.numel()
    assert hist[int(torch.floor(torch.log2(torch.tensor(3.0)))) - low] >= 1


def test_update_tracking_follows_a_model_cast_to_another_dtype():
    """The CPU keeps its weight-snapshot buffers between log steps; a model cast in between
    (same parameter objects, new dtype) gets new ones, and its updates are still measured."""
    model = mlp()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gk.Monitor(model, opt, log_every=1, detectors=None) as mon:
        for step in range(3):
            if step == 2:
                model.double()  # the same Parameter objects, float64 data
            opt.zero_grad()
            gen = torch.Generator().manual_seed(step)
            model(torch.randn(32, 6, generator=gen, dtype=next(model.parameters()).dtype)
                  ).pow(2).mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
    g = torch.cat([x.reshape(-1) for x in grads[:2]]).double().norm()
    s = mon.history[-1]
    assert s.update_ratio[0] * s.weight_norm[0] == pytest.approx((lr * g).item(), rel=1e-9)
