"""The integrations with the real packages (the test extras install them): Lightning, the
Hugging Face Trainer and Accelerate, Weights & Biases (offline) and MLflow (a local store)."""

import csv
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradkern as gk

OPTIONAL = ("lightning", "transformers", "accelerate", "wandb", "mlflow")


def test_importing_gradkern_imports_no_integration():
    code = ("import sys, gradkern, gradkern.sinks, gradkern.integrations; "
            f"print([m for m in {OPTIONAL!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("make,package", [(lambda: gk.sinks.WandB(), "wandb"),
                                          (lambda: gk.sinks.MLflow(), "mlflow")])
def test_a_missing_tracker_package_says_how_to_get_it(monkeypatch, make, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=f"pip install {package}"):
        make()


@pytest.mark.parametrize("module,package", [("lightning", "lightning"),
                                            ("transformers", "transformers"),
                                            ("accelerate", "accelerate")])
def test_a_missing_framework_says_how_to_get_it(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, f"{package}.pytorch", None)
    monkeypatch.delitem(sys.modules, f"gradkern.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        __import__(f"gradkern.integrations.{module}")


def data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 1, generator=gen)


def flat_grad(module):
    return torch.cat([p.grad.reshape(-1).double() for p in module.parameters()
                      if p.grad is not None])


# ---- Lightning -----------------------------------------------------------------------------

def _lightning_module(lr, poison_batch=None):
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, index):
            x, y = batch
            loss = (self.net(x) - y).pow(2).mean() * 100
            return loss * float("nan") if index == poison_batch else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Regression()


class _Observer:
    """The gradients Lightning hands on_before_optimizer_step, and each step's update."""

    def __new__(cls):
        import lightning as L

        class Observer(L.Callback):
            def __init__(self):
                self.grads, self.updates = [], []

            def on_before_optimizer_step(self, trainer, module, optimizer):
                self.grads.append(flat_grad(module))
                self._before = torch.cat([p.detach().reshape(-1).double()
                                          for p in module.parameters()])

            def on_train_batch_end(self, trainer, module, outputs, batch, index):
                if hasattr(self, "_before"):
                    after = torch.cat([p.detach().reshape(-1).double()
                                       for p in module.parameters()])
                    self.updates.append(after - self._before)
                    del self._before

        return Observer()


def _fit(tmp_path, callbacks, precision="32-true", lr=0.01, poison_batch=None, **trainer_kw):
    import lightning as L

    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = _lightning_module(lr, poison_batch)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision=precision,
                        accumulate_grad_batches=2, callbacks=callbacks,
                        logger=L.pytorch.loggers.CSVLogger(str(tmp_path)),
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, **trainer_kw)
    trainer.fit(module, loader)
    return trainer, module


def _logged(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_records_the_gradients_lightning_applies_and_clips_them(tmp_path, precision):
    from gradkern.integrations.lightning import GradkernCallback

    observer, callback = _Observer(), GradkernCallback(clip=0.5, log_every=3)
    lr = 0.01
    trainer, _ = _fit(tmp_path, [observer, callback], precision, lr=lr)
    mon = callback.monitor
    assert len(observer.grads) == 4 == len(mon.history)  # 8 batches, 2 per step
    for s, g, update in zip(mon.history, observer.grads, observer.updates):
        norm = float(g.norm())
        assert s.total_norm == pytest.approx(norm, rel=1e-6)
        coef = min(1.0, 0.5 / (norm + 1e-6))
        assert norm > 0.5  # the clip is not vacuous
        torch.testing.assert_close(update, -lr * coef * g, rtol=1e-4, atol=1e-7)
    assert mon.closed  # closed at the end of the fit
    rows = [r for r in _logged(trainer) if r.get("gradkern/total_norm")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    np.testing.assert_allclose([float(r["gradkern/total_norm"]) for r in rows],
                               [s.total_norm for s in mon.history], rtol=1e-6)


def test_lightning_gradient_clip_val_is_taken_over_and_events_reach_the_log(tmp_path,
                                                                           caplog):
    from gradkern.integrations.lightning import GradkernCallback

    observer, callback = _Observer(), GradkernCallback(skip_nonfinite=True, log_every=2)
    with caplog.at_level(logging.WARNING, logger="gradkern"):
        trainer, _ = _fit(tmp_path, [observer, callback], lr=0.01, poison_batch=3,
                          gradient_clip_val=0.5)
    mon = callback.monitor
    assert trainer.gradient_clip_val == 0.5  # restored after the fit
    assert isinstance(mon.clipper, gk.ClipByNorm) and mon.clipper.max_norm == 0.5
    # Lightning did not clip before the Monitor recorded: it saw the full gradients
    assert mon.history[0].total_norm == pytest.approx(float(observer.grads[0].norm()), rel=1e-6)
    assert mon.history[0].total_norm > 0.5
    assert [s.skip_reason for s in mon.history] == [None, "nonfinite", None, None]
    assert any("nonfinite" in r.getMessage() for r in caplog.records)
    events = [r for r in _logged(trainer) if r.get("gradkern/event/nonfinite")]
    assert [int(r["step"]) for r in events] == [1]


# ---- the Hugging Face Trainer and Accelerate ---------------------------------------------------

class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": (out - labels).pow(2).mean() * 100, "logits": out}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _train(tmp_path, callbacks=(), gradkern_clips=False, optim="adamw_torch"):
    from transformers import Trainer, TrainingArguments

    from gradkern.integrations.accelerate import use_gradkern

    model = _Regression()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, learning_rate=1e-2,
                             per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", optim=optim, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(), callbacks=list(callbacks))
    if gradkern_clips:
        use_gradkern(trainer.accelerator)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return trainer, model, logged


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_trainer_callback_records_the_grad_norm_the_trainer_logs(tmp_path, optim):
    from gradkern.integrations.transformers import GradkernCallback

    callback = GradkernCallback(log_every=4, detectors=None)
    trainer, model, logged = _train(tmp_path, [callback], optim=optim)
    mon = callback.monitor
    assert len(logged) == 6 and max(logged) > 1.0  # the Trainer's clip would have acted
    np.testing.assert_allclose([s.total_norm for s in mon.history], logged, rtol=1e-6)
    assert trainer.args.max_grad_norm == 1.0  # given back after training
    assert mon.closed
    # the Monitor's clip did what the Trainer's own would have: same parameters
    _, reference, reference_logged = _train(tmp_path, optim=optim)
    np.testing.assert_allclose(reference_logged, logged, rtol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_use_gradkern_gives_the_trainer_the_same_grad_norm_and_parameters(tmp_path):
    _, ours, ours_logged = _train(tmp_path, gradkern_clips=True)
    _, reference, reference_logged = _train(tmp_path)
    np.testing.assert_allclose(ours_logged, reference_logged, rtol=1e-6)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_use_gradkern_on_a_plain_accelerator():
    import accelerate

    from gradkern.integrations.accelerate import use_gradkern

    accelerator = use_gradkern(accelerate.Accelerator(cpu=True))
    assert use_gradkern(accelerator) is accelerator  # once is enough
    ours, theirs = _Regression(), _Regression()
    x, y = data()
    for model in (ours, theirs):
        model(x, y)["loss"].backward()
    norm = accelerator.clip_grad_norm_(ours.parameters(), 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(flat_grad(ours), flat_grad(theirs))
    accelerator.clip_grad_value_(ours.parameters(), 1e-3)
    torch.nn.utils.clip_grad_value_(theirs.parameters(), 1e-3)
    assert torch.equal(flat_grad(ours), flat_grad(theirs))


# ---- trackers ----------------------------------------------------------------------------------

def _sick_run(sinks, steps=8, log_every=4):
    from gradkern.tools.cases import CASES, train

    return train(CASES["relu_regression_uniform_4_5"](), steps, log_every=log_every,
                 sinks=sinks)


def test_wandb_offline_keeps_every_batched_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project="gradkern-test", dir=str(tmp_path))
    try:
        for i in range(3):  # the run's own step moves past the Monitor's before it flushes
            run.log({"loss": float(i)})
        mon = _sick_run([gk.sinks.WandB(run)])
        summary = dict(run.summary)
        assert summary["gradkern/step"] == 7
        assert summary["gradkern/total_norm"] == pytest.approx(mon.history[-1].total_norm) \
            or math.isnan(mon.history[-1].total_norm)
        assert summary["gradkern/grad_norm/0"] is not None
        # 3 of the loop's, 8 step records, one per event, and the events table at each of the
        # two log steps that added events
        events = [e for e in mon.events]
        assert summary["_step"] == 3 + 8 + len(events) + 2 - 1
        table = run.summary["gradkern/events"]
        assert table["nrows"] == len(events) and table["_type"] == "table-file"
    finally:
        run.finish()


def test_wandb_without_a_run_is_a_clear_error(monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(RuntimeError, match="wandb.init"):
        gk.sinks.WandB()


def test_mlflow_local_store_gets_every_step(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        client = mlflow.tracking.MlflowClient()
        experiment = client.create_experiment("gradkern", artifact_location=str(tmp_path / "art"))
        mlflow.set_experiment(experiment_id=experiment)
        sink = gk.sinks.MLflow(prefix="gk/")
        run_id = sink.run_id
        mon = _sick_run([sink])
        history = client.get_metric_history(run_id, "gk/total_norm")
        assert [m.step for m in history] == list(range(8))
        np.testing.assert_allclose([m.value for m in history],
                                   [s.total_norm for s in mon.history], rtol=1e-12)
        layer = client.get_metric_history(run_id, "gk/grad_norm/0")
        assert len(layer) == 8
        events = client.get_metric_history(run_id, "gk/event/exploding")
        assert [m.step for m in events] == [e.step for e in mon.events if e.kind == "exploding"]
        assert client.get_run(run_id).info.status == "FINISHED"  # the sink's own run, ended
        artifacts = [a.path for a in client.list_artifacts(run_id)]
        assert sorted(artifacts) == ["gradkern_events.json", "gradkern_run.json"]
    finally:
        mlflow.set_tracking_uri(None)
