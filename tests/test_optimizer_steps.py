"""The Monitor in the loops people run, against plain torch on an identical model copy.

Every test trains two copies of one model on the same batches: one under ``gk.Monitor``, one
with torch's own recipe (``scaler.unscale_`` + ``clip_grad_norm_`` + ``step``), and compares the
parameters after every step, and the Monitor's records with the gradients torch saw.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradkern as gk

TOL = 1e-5


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def batch(step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 6, generator=gen)
    return x, scale * torch.randn(32, 1, generator=gen)


def loss_of(model, step, scale=1.0):
    x, y = batch(step, scale)
    return (model(x) - y).pow(2).mean()


def grad_norm(model):
    grads = [p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


def assert_same_params(a, b, tol=TOL):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def step_beside_torch_clip(ours, opt, ref, ref_opt, steps, max_norm):
    """Train ``ours`` (its optimizer under a clipping Monitor) and ``ref`` (torch's
    ``clip_grad_norm_``) on the same batches; the parameters agree after every step, and the
    fused optimizer holds no attribute the Monitor added."""
    for step in steps:
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(model, step, scale=4.0).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt.step()
        ref_opt.step()
        assert_same_params(ours, ref)
        assert "grad_scale" not in vars(opt) and "found_inf" not in vars(opt)


def assert_bitwise_same(params_before, params_after):
    assert all(torch.equal(x, y) for x, y in zip(params_before, params_after))


FUSED = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
}


def every_fused_optimizer_torch_ships():
    """Each torch optimizer whose constructor takes ``fused=True`` on the CPU."""
    found = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        try:
            opt = cls([nn.Parameter(torch.zeros(2))], lr=0.1, fused=True)
        except (TypeError, RuntimeError, ValueError):
            continue
        if getattr(opt, "_step_supports_amp_scaling", False):
            found.append(name)
    return found


def test_the_fused_optimizers_tested_are_all_that_torch_ships():
    assert set(every_fused_optimizer_torch_ships()) <= set(FUSED)


# ---- GradScaler and fused optimizers ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FUSED))
def test_grad_scaler_fused_optimizer_clip_matches_unscale_clip_step(name):
    """GradScaler hands a fused optimizer scaled gradients; the Monitor's statistics are the
    unscaled ones and clip=1.0 (folded into grad_scale) equals unscale_ + clip_grad_norm_."""
    ours, ref = net(), net()
    opt, ref_opt = FUSED[name](ours.parameters()), FUSED[name](ref.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    true_norms = []
    with gk.Monitor(ours, opt, clip=1.0, log_every=2, detectors=None) as mon:
        for step in range(5):
            for model, o, s in ((ours, opt, scaler), (ref, ref_opt, ref_scaler)):
                o.zero_grad()
                s.scale(loss_of(model, step, scale=4.0)).backward()
            ref_scaler.unscale_(ref_opt)
            true_norms.append(grad_norm(ref))
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            for s, o in ((scaler, opt), (ref_scaler, ref_opt)):
                s.step(o)
                s.update()
            assert_same_params(ours, ref)
    assert max(true_norms) > 1.0  # the clip did something
    recorded = [s.total_norm for s in mon.history]
    np.testing.assert_allclose(recorded, true_norms, rtol=1e-6)
    assert not any(s.skipped for s in mon.history)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_optimizer_without_scaler_clip_is_folded(name):
    ours, ref = net(), net()
    opt, ref_opt = FUSED[name](ours.parameters()), FUSED[name](ref.parameters())
    with gk.Monitor(ours, opt, clip=0.5, detectors=None) as mon:
        step_beside_torch_clip(ours, opt, ref, ref_opt, range(4), 0.5)
    assert len(mon.history) == 4


def test_fused_step_with_nothing_to_clip_leaves_the_gradients_alone_on_the_cpu():
    """A fused kernel given grad_scale writes the gradients back; on the CPU the Monitor reads
    its coefficient for free and gives none when there is nothing to clip."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    seen = []
    with gk.Monitor(model, opt, clip=1e9, detectors=None):
        opt.register_step_pre_hook(lambda o, *_: seen.append(vars(o).get("grad_scale")))
        loss_of(model, 0).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert seen == [None]
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        opt.zero_grad()
        (loss_of(model, 1) * 1e12).backward()
        opt.step()  # now it clips
        assert seen[-1] is not None and float(seen[-1]) > 1.0


@pytest.mark.parametrize("clipper", [lambda: gk.ClipByValue(0.05),
                                     lambda: gk.ClipByNorm(0.3, per_tensor=True),
                                     lambda: gk.AGC(clip_factor=0.01)],
                         ids=["value", "per_tensor", "agc"])
def test_grad_scaler_fused_with_a_clipper_that_cannot_fold(clipper):
    """Clipping by value (or per tensor, or unit-wise) needs the true gradients: the Monitor
    unscales them in place and tells the fused kernel not to divide again."""
    ours, ref = net(), net()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    ref_clip = clipper()
    with gk.Monitor(ours, opt, clip=clipper(), detectors=None):
        for step in range(4):
            for model, o, s in ((ours, opt, scaler), (ref, ref_opt, ref_scaler)):
                o.zero_grad()
                s.scale(loss_of(model, step, scale=4.0)).backward()
            ref_scaler.unscale_(ref_opt)
            ref_clip.clip_(ref.parameters())
            for s, o in ((scaler, opt), (ref_scaler, ref_opt)):
                s.step(o)
                s.update()
            assert_same_params(ours, ref)


def test_fused_skip_nonfinite_leaves_params_and_state_bit_identical():
    """No GradScaler: skip_nonfinite sets found_inf for the fused kernel (no host read)."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with gk.Monitor(model, opt, skip_nonfinite=True, clip=1.0, detectors=None) as mon:
        loss_of(model, 0).backward()
        opt.step()
        params = [p.detach().clone() for p in model.parameters()]
        state = [v.clone() for s in opt.state.values() for v in s.values()]
        opt.zero_grad()
        loss_of(model, 1).backward()
        model[2].weight.grad[0, 0] = float("nan")
        opt.step()
        assert_bitwise_same(params, [p.detach() for p in model.parameters()])
        assert_bitwise_same(state, [v for s in opt.state.values() for v in s.values()])
        opt.zero_grad()
        loss_of(model, 2).backward()
        opt.step()  # and the next step is applied
        assert not torch.equal(params[0], model[0].weight)
    assert [s.skip_reason for s in mon.history] == [None, "nonfinite", None]
    assert mon.skipped_steps == 1


@pytest.mark.parametrize("dampening", [0.0, 0.1])
def test_fused_sgd_first_step_skipped_then_trains_like_a_fresh_optimizer(dampening):
    """Fused SGD allocates its momentum buffers uninitialised on the first step; a first step
    skipped through found_inf must not leave that garbage for the next one."""
    ours, ref = net(), net()
    opt = torch.optim.SGD(ours.parameters(), lr=1e-2, momentum=0.9, dampening=dampening,
                          fused=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2, momentum=0.9, dampening=dampening,
                              fused=True)
    with gk.Monitor(ours, opt, skip_nonfinite=True, detectors=None) as mon:
        loss_of(ours, 0).backward()
        ours[0].bias.grad[0] = float("inf")
        opt.step()  # skipped: the first step
        for step in range(1, 4):
            for model, o in ((ours, opt), (ref, ref_opt)):
                o.zero_grad()
                loss_of(model, step).backward()
                o.step()
            assert_same_params(ours, ref)
    assert mon.skipped_steps == 1


def test_grad_scaler_overflow_on_a_fused_optimizer_is_recorded_as_skipped():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    records = []
    with gk.Monitor(model, opt, log_every=3, sinks=[records.append]) as mon:
        for step in range(4):
            opt.zero_grad()
            scale = 1e36 if step == 1 else 1.0  # the scaled loss overflows fp32 at step 1
            scaler.scale(loss_of(model, step) * scale).backward()
            scaler.step(opt)
            scaler.update()
    assert [s.skip_reason for s in mon.history] == [None, "grad_scaler", None, None]
    assert mon.skipped_steps == 1 and mon.steps == 4
    steps = [r for r in records if r["type"] == "step"]
    assert steps[1]["skipped"] and steps[1]["skip_reason"] == "grad_scaler"
    # one overflow is GradScaler finding its scale, not an event
    assert not [e for e in mon.events if e.kind == "nonfinite"]


# ---- GradScaler with a foreach optimizer: skipped steps never reach the optimizer -----------

def test_scaler_argument_records_the_steps_grad_scaler_skipped():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    bad = {1, 3}
    with gk.Monitor(model, opt, scaler=scaler, log_every=2, detectors=None) as mon:
        for step in range(5):
            opt.zero_grad()
            loss = loss_of(model, step) * (1e36 if step in bad else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert "step" in vars(scaler)
    assert "step" not in vars(scaler)  # close() took the wrapper off
    assert mon.steps == 5
    assert [s.step for s in mon.history] == list(range(5))
    assert [s.skip_reason for s in mon.history] == [
        "grad_scaler" if i in bad else None for i in range(5)]
    assert mon.skipped_steps == 2
    assert all(mon.history[i].nonfinite.sum() > 0 for i in bad)


def test_persistent_grad_scaler_skips_fire_an_event():
    """Inf at every scale GradScaler tries (a non-finite loss) is worth an event."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with gk.Monitor(model, opt, scaler=scaler, log_every=4) as mon:
        for step in range(10):
            opt.zero_grad()
            scaler.scale(loss_of(model, step) * float("inf")).backward()
            scaler.step(opt)
            scaler.update()
    events = [e for e in mon.events if e.kind == "nonfinite"]
    assert len(events) == 1 and events[0].step == 7
    assert "GradScaler skipped 8 steps in a row" in events[0].message


# ---- closures ------------------------------------------------------------------------------

def test_closure_step_observes_and_clips_the_gradients_of_this_step():
    ours, ref = net(), net()
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    true_norms = []
    with gk.Monitor(ours, opt, clip=0.5, log_every=2, detectors=None) as mon:
        for step in range(4):
            def closure(model=ours, o=opt, step=step):
                o.zero_grad()
                loss = loss_of(model, step, scale=10.0)
                loss.backward()
                return loss

            def ref_closure(step=step):
                ref_opt.zero_grad()
                loss = loss_of(ref, step, scale=10.0)
                loss.backward()
                true_norms.append(grad_norm(ref))
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                return loss

            opt.step(closure) if step % 2 else opt.step(closure=closure)
            ref_opt.step(ref_closure)
            assert_same_params(ours, ref)
    np.testing.assert_allclose([s.total_norm for s in mon.history], true_norms, rtol=1e-6)
    assert max(true_norms) > 0.5


def test_lbfgs_records_the_gradient_of_the_first_evaluation():
    model = net()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5)
    norms_per_step = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        norms_per_step[-1].append(grad_norm(model))
        return loss

    with gk.Monitor(model, opt, log_every=1, detectors=None) as mon:
        for _ in range(2):
            norms_per_step.append([])
            opt.step(closure)
            assert len(norms_per_step[-1]) > 1  # the line search evaluated it again
    first = [norms[0] for norms in norms_per_step]
    assert mon.steps == 2
    np.testing.assert_allclose([s.total_norm for s in mon.history], first, rtol=1e-6)
    assert all(n > 0 for n in first)


def test_closure_skip_nonfinite_decides_on_this_steps_gradients():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with gk.Monitor(model, opt, skip_nonfinite=True, detectors=None) as mon:
        def closure(poison=False):
            opt.zero_grad()
            loss = loss_of(model, 0)
            loss.backward()
            if poison:
                model[0].weight.grad[0, 0] = float("nan")
            return loss

        opt.step(closure)
        params = [p.detach().clone() for p in model.parameters()]
        state = [v.clone() for s in opt.state.values() for v in s.values()]
        opt.step(lambda: closure(poison=True))
        assert_bitwise_same(params, [p.detach() for p in model.parameters()])
        assert_bitwise_same(state, [v for s in opt.state.values() for v in s.values()])
        opt.step(closure)
    assert [s.skip_reason for s in mon.history] == [None, "nonfinite", None]


# ---- wrapped optimizers and schedulers -----------------------------------------------------

def test_accelerate_prepared_optimizer_with_accumulation():
    import accelerate  # a test extra: its absence fails the test
    ours, ref = net(), net()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    prepared_model, prepared_opt = accelerator.prepare(ours, opt)
    true_norms = []
    with gk.Monitor(prepared_model, prepared_opt, clip=0.2, detectors=None) as mon:
        assert mon.optimizer is opt
        for step in range(6):
            with accelerator.accumulate(prepared_model):
                accelerator.backward(loss_of(prepared_model, step, scale=5.0))  # it halves
                prepared_opt.step()
                prepared_opt.zero_grad()
            (loss_of(ref, step, scale=5.0) / 2).backward()
            if step % 2 == 1:
                true_norms.append(grad_norm(ref))
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.2)
                ref_opt.step()
                ref_opt.zero_grad()
            assert_same_params(ours, ref)
    assert mon.steps == 3
    np.testing.assert_allclose([s.total_norm for s in mon.history], true_norms, rtol=1e-6)


class _NotAnOptimizer:
    param_groups = []


@pytest.mark.parametrize("thing", [_NotAnOptimizer(), object(), "adam"])
def test_not_an_optimizer_is_a_type_error(thing):
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gk.Monitor(net(), thing)


@pytest.mark.parametrize("order", ["scheduler first", "monitor first"])
def test_lr_scheduler_before_or_after_the_monitor_warns_nothing(order):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if order == "scheduler first":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            mon = gk.Monitor(model, opt, skip_nonfinite=True, clip=1.0, detectors=None)
        else:
            mon = gk.Monitor(model, opt, skip_nonfinite=True, clip=1.0, detectors=None)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for step in range(5):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
            sched.step()
        mon.close()
    assert mon.steps == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


# ---- parameters added later ------------------------------------------------------------------

def test_add_param_group_is_watched_and_clipped_from_the_next_step():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    opt.register_step_post_hook(lambda *a: seen.append(grad_norm(model)))
    with gk.Monitor(model, opt, clip=1e-3, log_every=3, detectors=None) as mon:
        loss_of(model, 0).backward()
        opt.step()
        model.head = nn.Linear(1, 1)  # a new module, in the model and the optimizer
        opt.add_param_group({"params": list(model.head.parameters())})
        for step in range(1, 3):
            opt.zero_grad()
            x, y = batch(step)
            (model.head(model[:5](x)) * 1e6 - y).pow(2).mean().backward()
            opt.step()
    assert mon.layers.names == ["0", "2", "4", "head"]
    assert [s.numel.tolist() for s in mon.history[1:]] == [[112, 272, 17, 2]] * 2
    assert seen[1] == pytest.approx(1e-3, rel=1e-4)  # the new layer was clipped too
    assert mon.history[0].grad_sq.shape == (3,) and mon.history[-1].grad_sq.shape == (4,)


def test_optimizer_only_parameter_is_watched():
    model = net()
    temperature = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    with gk.Monitor(model, opt, log_every=1, detectors=None) as mon:
        (loss_of(model, 0) * temperature).backward()
        opt.step()
    assert mon.layers.names[-1] == "param_groups.0.params.6"
    assert mon.history[0].numel[-1] == 1 and mon.history[0].grad_sq[-1] > 0


def test_new_module_without_optimizer_and_unfrozen_parameters():
    model = net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    mon = gk.Monitor(model, log_every=1, clip=gk.ClipByNorm(1e-3), detectors=None)
    loss_of(model, 0).backward()
    mon.step()
    for p in model[0].parameters():
        p.requires_grad_(True)
    model.append(nn.Linear(1, 1))
    model.zero_grad()
    (model(batch(1)[0]) * 1e4).pow(2).mean().backward()
    mon.step()
    mon.close()
    assert grad_norm(model) == pytest.approx(1e-3, rel=1e-4)
    assert mon.history[0].numel.tolist() == [0, 272, 17]
    assert mon.history[1].numel.tolist() == [112, 272, 17, 2]


def test_compiled_model_is_named_after_the_module_it_compiles():
    model = net()
    compiled = torch.compile(model)
    mon = gk.Monitor(compiled, detectors=None)
    assert mon.layers.names == ["0", "2", "4"]
    mon.close()


# ---- arguments and lifecycle -----------------------------------------------------------------

def test_a_step_that_raises_leaves_nothing_behind():
    """Another pre-step hook raises after the Monitor's ran: the attributes the Monitor gave
    the fused optimizer and the gradients it held go back, and the next step is normal."""
    ours, ref = net(), net()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    plain = torch.optim.SGD(net(1).parameters(), lr=0.1)

    def refuse(*_):
        raise KeyError("refused")

    with gk.Monitor(ours, opt, clip=0.5, skip_nonfinite=True, log_every=2,
                    detectors=None) as mon:
        handle = opt.register_step_pre_hook(refuse)
        loss_of(ours, 0).backward()
        with pytest.raises(KeyError):
            opt.step()
        assert "grad_scale" in vars(opt)  # left by the step that raised
        handle.remove()
        step_beside_torch_clip(ours, opt, ref, ref_opt, range(1, 3), 0.5)
    assert mon.steps == 3 and [s.step for s in mon.history] == [0, 1, 2]
    model = plain.param_groups[0]["params"]
    with gk.Monitor(nn.ParameterList(model), plain, skip_nonfinite=True, detectors=None):
        handle = plain.register_step_pre_hook(refuse)
        for p in model:
            p.grad = torch.full_like(p, float("nan"))
        with pytest.raises(KeyError):
            plain.step()
        handle.remove()
        plain.step()  # the previous step's held gradients are back, and skipped again
        assert all(p.grad is not None for p in model)


@pytest.mark.parametrize("kwargs", [{"log_every": 2.5}, {"log_every": 0}, {"log_every": True},
                                    {"keep_history": -1}, {"keep_history": 1.5}])
def test_counts_must_be_integers(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        gk.Monitor(net(), **kwargs)


def test_scaler_needs_an_optimizer():
    with pytest.raises(ValueError, match="scaler"):
        gk.Monitor(net(), scaler=torch.amp.GradScaler("cpu"))


def test_step_after_close_raises():
    model = net()
    mon = gk.Monitor(model, detectors=None)
    loss_of(model, 0).backward()
    mon.step()
    mon.close()
    with pytest.raises(RuntimeError, match="closed"):
        mon.step()
    assert mon.steps == 1


def test_closed_monitor_no_longer_touches_the_optimizer():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    mon = gk.Monitor(model, opt, clip=1e-6, detectors=None)
    mon.close()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True)
    for model_, opt_ in ((model, opt), (ref, ref_opt)):
        loss_of(model_, 0).backward()
        opt_.step()
    assert_same_params(model, ref, tol=0)
    assert mon.steps == 0
