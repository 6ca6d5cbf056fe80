"""gradkern demo --quick and gradkern report: the pictures exist and the verdicts are right."""

import os

import pytest

import gradkern as gk
from gradkern.tools.cases import CASES, train

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from gradkern.tools.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, {(r.scenario, r.remedy): r for r in run_demo(str(out), quick=True)}


def events(results, scenario, prefix):
    return next(set(r.events) for (s, remedy), r in results.items()
                if s == scenario and remedy.startswith(prefix))


def test_demo_writes_a_report_with_every_picture(demo):
    out, results = demo
    report = (out / "report.html").read_text()
    for r in results.values():
        for kind in ("layer_norms", "gradient_flow", "total_norm"):
            name = f"{r.run.file_key()}_{kind}"
            assert (out / f"{name}.png").stat().st_size > 5000
            assert f"alt='{name}'" in report
    for name in ("depth", "clip_direction"):
        assert (out / f"{name}.png").exists() and f"alt='{name}'" in report
    assert report.count("data:image/png;base64,") == 3 * len(results) + 2


def test_demo_verdicts(demo):
    _, results = demo
    bad = {"vanishing", "exploding", "nonfinite"}
    assert "vanishing" in events(results, "1 vanishing", "baseline")
    assert {"exploding", "nonfinite"} <= events(results, "2 exploding", "baseline")
    for scenario, remedy in (("1 vanishing", "He init"), ("1 vanishing", "ReLU"),
                             ("2 exploding", "clip by value"), ("2 exploding", "clip by norm")):
        assert not events(results, scenario, remedy) & bad, (scenario, remedy)
    baseline = next(r for (s, m), r in results.items() if s == "2 exploding" and m.startswith("baseline"))
    assert baseline.run.summary["skipped steps"] > 0


def test_the_demo_advice_matches_what_the_demo_shows(demo):
    """Each event kind's first advice is a remedy the demo shows working, and every remedy
    that does not save its case says why."""
    from gradkern.events import ADVICE
    from gradkern.tools.demo import FIRST_ADVICE_SHOWN_BY

    _, results = demo
    concept = {"vanishing": "non-saturating activation", "exploding": "clip gradients by norm",
               "nonfinite": "lower the learning rate"}
    for kind, (scenario, remedy) in FIRST_ADVICE_SHOWN_BY.items():
        assert concept[kind] in ADVICE[kind][0]
        shown = results[(scenario, remedy)]
        assert shown.saved, (kind, remedy, shown.verdict)
    baselines = {scenario: r for (scenario, remedy), r in results.items()
                 if remedy.startswith("baseline")}
    assert "vanishing" in baselines["1 vanishing"].events
    assert {"exploding", "nonfinite"} <= set(baselines["2 exploding"].events)
    for (scenario, remedy), r in results.items():
        if not remedy.startswith("baseline"):
            assert r.saved or r.why, f"{remedy} does not save {scenario} and does not say why"
            assert not (r.saved and r.why)


def test_report_command_on_a_monitor_jsonl(tmp_path):
    from gradkern.tools.cli import main

    path = tmp_path / "run.jsonl"
    train(CASES["relu_regression_uniform_4_5"](), 12, log_every=4, sinks=[gk.sinks.JSONL(path)])
    out = tmp_path / "report.html"
    assert main(["report", str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert "exploding" in text and "nonfinite" in text
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".png")]) == 3
