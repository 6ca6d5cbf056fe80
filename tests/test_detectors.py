"""Detectors on the classic cases: the sick ones must fire, the healthy ones must stay silent."""

import numpy as np
import pytest
import torch

import gradkern as gk
from gradkern.tools.cases import CASES, train
from gradkern.detectors import Exploding, NonFinite, Spike, StepStats, Vanishing
from gradkern.layers import LayerMap

STEPS = 300  # the sigmoid MLP needs ~140 steps of persistent depth decay


EXPECTED = {name: make().expected for name, make in CASES.items()}


def run(name):
    case = CASES[name]()
    return case, train(case, STEPS)


@pytest.mark.parametrize("name", [n for n, kinds in EXPECTED.items() if kinds])
def test_sick_cases_fire(name):
    case, mon = run(name)
    kinds = {e.kind for e in mon.events}
    assert set(case.expected) <= kinds, f"{name}: expected {case.expected}, got {mon.events}"
    for event in mon.events:
        assert event.layers and event.advice and event.evidence


@pytest.mark.parametrize("name", [n for n, kinds in EXPECTED.items() if not kinds])
def test_healthy_cases_stay_silent(name):
    _, mon = run(name)
    assert mon.events == []
    assert len(mon.history) == STEPS


def test_exploding_fires_before_the_first_nan():
    _, mon = run("relu_regression_uniform_4_5")
    first_nan = next(s.step for s in mon.history if s.nonfinite.sum() > 0)
    exploding = [e for e in mon.events if e.kind == "exploding"]
    assert exploding and exploding[0].step < first_nan
    assert all(np.isfinite(s.total_norm) for s in mon.history if s.step <= exploding[0].step)


def test_vanishing_names_early_layers_of_the_tanh_chain():
    _, mon = run("tanh_chain_20x0.5")
    event = next(e for e in mon.events if e.kind == "vanishing")
    first_layer = mon.layers.names[0]
    assert first_layer in event.layers
    assert mon.layers.names[-1] not in event.layers
    assert event.evidence["depth_ratio"] < 1e-3


def _stats(step, grad_sq, nonfinite=None, numel=None, zeros=None):
    n = len(grad_sq)
    return StepStats(step=step, grad_sq=np.asarray(grad_sq, float), grad_max=np.ones(n),
                     nonfinite=np.zeros(n) if nonfinite is None else np.asarray(nonfinite, float),
                     zeros=np.zeros(n) if zeros is None else np.asarray(zeros, float),
                     numel=np.full(n, 100.0) if numel is None else np.asarray(numel, float))


@pytest.fixture
def three_layers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    return LayerMap.from_model(net)


def test_nonfinite_lists_layers_in_backward_order_once_per_run(three_layers):
    d = NonFinite()
    assert d.observe(_stats(0, [1, 1, 1]), three_layers) == []
    events = d.observe(_stats(1, [1, 1, 1], nonfinite=[3, 0, 1]), three_layers)
    assert [e.layers for e in events] == [["2", "0"]]
    assert events[0].evidence["nonfinite"] == {"2": 1, "0": 3}
    assert d.observe(_stats(2, [1, 1, 1], nonfinite=[3, 0, 1]), three_layers) == []  # same run
    assert d.observe(_stats(3, [1, 1, 1]), three_layers) == []
    assert len(d.observe(_stats(4, [1, 1, 1], nonfinite=[0, 1, 0]), three_layers)) == 1


def test_exploding_ignores_recovery_from_a_dip(three_layers):
    d = Exploding(growth=3.0, steps=2, rise=10.0)
    norms = [1.0] * 10 + [0.01, 0.05, 0.3, 1.0]  # dips then climbs back: not an explosion
    assert all(d.observe(_stats(i, [n * n, 0, 0]), three_layers) == []
               for i, n in enumerate(norms))
    fired = [d.observe(_stats(20 + i, [n * n, 0, 0]), three_layers) for i, n in
             enumerate([4.0, 16.0, 64.0])]
    assert fired[0] == [] and len(fired[1]) == 1 and fired[1][0].kind == "exploding"


def test_spike_needs_both_factor_and_z(three_layers):
    d = Spike(factor=5.0, z_thresh=6.0, warmup=5)
    for i in range(30):
        assert d.observe(_stats(i, [1.0 + 0.01 * (i % 3), 0, 0]), three_layers) == []
    assert d.observe(_stats(30, [4.0, 0, 0]), three_layers) == []     # 2x: below the factor
    events = d.observe(_stats(31, [100.0, 0, 0]), three_layers)         # 10x the average
    assert [e.kind for e in events] == ["spike"]


def test_vanishing_respects_patience_and_floor(three_layers):
    d = Vanishing(ratio=0.1, patience=3, floor=1e-10, min_layers=2)
    sick = [1e-6, 1.0, 1.0]  # first layer's RMS 1e-3 of the last one's
    assert d.observe(_stats(0, sick), three_layers) == []
    assert d.observe(_stats(1, sick), three_layers) == []
    events = d.observe(_stats(2, sick), three_layers)
    assert [e.kind for e in events] == ["vanishing"] and events[0].layers == ["0"]
    d = Vanishing(ratio=1e-9, patience=1, floor=1e-3, min_layers=2)
    events = d.observe(_stats(0, [1.0, 1e-12, 1.0]), three_layers)
    assert events and events[0].layers == ["1"]


def test_every_threshold_is_a_parameter():
    from gradkern import detectors

    for cls in (detectors.Exploding, detectors.Spike, detectors.Vanishing, detectors.Stalled,
                detectors.Dead):
        assert "cooldown" in cls.__init__.__code__.co_varnames


def test_event_kinds_and_advice():
    with pytest.raises(ValueError, match="unknown event kind"):
        gk.Event("weird", 0, [], "")
    e = gk.Event("vanishing", 3, ["a"], "m", {"x": 1})
    assert any("ReLU" in a for a in e.advice)
    assert e.as_dict()["event"] == "vanishing"
