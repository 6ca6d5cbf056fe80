"""``gradkern report`` and the run records it reads: header records, clip factors, runs that
share a file, runs that are broken or huge, and input that is not a gradkern log at all."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradkern as gk
from gradkern.tools import report

pytest.importorskip("matplotlib")


def _run_cli(*args, env=None):
    """``python -m gradkern ...`` in a fresh process: (exit status, stdout, stderr)."""
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-m", "gradkern", *args], capture_output=True,
                         text=True, cwd="/", env=full_env, timeout=300)
    return out.returncode, out.stdout, out.stderr


def _train(path, model, steps=6, lr=0.1, clip=None, data=None, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(0)
    x = torch.randn(16, model[0].in_features) if data is None else data
    with gk.Monitor(model, opt, log_every=2, sinks=[gk.sinks.JSONL(path)], clip=clip,
                    **kwargs) as mon:
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    return mon


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 1))


def test_each_run_starts_with_a_header_naming_its_layers_and_settings(tmp_path):
    path = tmp_path / "run.jsonl"
    mon = _train(path, small_model(), clip=0.01)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    header = records[0]
    assert header["type"] == "run" and header["run_id"] == mon.run_id
    assert header["layer_kinds"] == {"0": "Linear(12->8)", "2": "Linear(8->1)"}
    assert header["clip_threshold"] == 0.01
    assert header["settings"]["log_every"] == 2 and "ClipByNorm" in header["settings"]["clip"]
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 6
    # a threshold of 0.01 clips every step, by the factor max_norm / (norm + 1e-6)
    for r in steps:
        assert r["clipped"] is True
        assert r["clip_factor"] == pytest.approx(0.01 / (r["total_norm"] + 1e-6), rel=1e-6)


def test_records_say_a_step_was_not_clipped(tmp_path):
    path = tmp_path / "run.jsonl"
    _train(path, small_model(), clip=gk.ClipByValue(1e9))
    steps = [json.loads(x) for x in path.read_text().splitlines()][1:]
    assert all(r["clip_factor"] == 1.0 and r["clipped"] is False for r in steps)


def test_clip_by_value_factor_is_that_of_the_largest_element():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.5, -4.0, 1.0])
    clipper = gk.ClipByValue(1.0)
    clipper.clip_([p])
    assert float(clipper.last_factor) == pytest.approx(0.25)


def test_two_runs_in_one_file_are_told_apart(tmp_path):
    path = str(tmp_path / "run.jsonl")
    _train(path, small_model(), steps=4)
    _train(path, small_model(), steps=7)
    runs = report.load_runs(path)
    assert [len(r.steps) for r in runs] == [4, 7]
    assert [r.steps[0]["step"] for r in runs] == [0, 0]
    assert len(report.load_jsonl(path).steps) == 7  # the last by default
    assert len(report.load_jsonl(path, run=1).steps) == 4
    out = tmp_path / "r.html"
    status, stdout, stderr = _run_cli("report", path, "-o", str(out), "--run", "1")
    assert status == 0, stderr
    assert "run 1 of 2" in out.read_text() and "4 steps" in stdout
    status, _, stderr = _run_cli("report", path, "-o", str(out), "--run", "3")
    assert status == 2 and "has 2 run(s)" in stderr and "Traceback" not in stderr


def test_a_run_that_was_never_finite_is_drawn(tmp_path):
    path = str(tmp_path / "nan.jsonl")
    model = small_model()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    _train(path, model)
    run = report.load_jsonl(path)
    assert all(r["total_norm"] == "nan" for r in run.steps)
    figures = report.run_figures(run)
    assert all(len(report.png_bytes(f)) > 1000 for f in figures.values())
    status, _, stderr = _run_cli("report", path, "-o", str(tmp_path / "nan.html"))
    assert status == 0 and "Traceback" not in stderr, stderr


def test_a_300_layer_run_is_a_heatmap_with_named_ends(tmp_path):
    path = str(tmp_path / "deep.jsonl")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(300)])
    _train(path, model, steps=4, lr=0.01, detectors=None, track_updates=False)
    run = report.load_jsonl(path)
    fig = report.layer_norms_figure(run)
    ax = fig.axes[0]
    assert ax.get_images(), "many layers are drawn as an image (layer x step)"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "0 Linear(4->4)" and labels[-1] == "299 Linear(4->4)"
    assert len(labels) <= 8
    assert ax.get_legend() is None
    assert all(float(t).is_integer() for t in ax.get_xticks())
    status, _, stderr = _run_cli("report", path, "-o", str(tmp_path / "deep.html"))
    assert status == 0 and "Traceback" not in stderr and "Tight layout" not in stderr, stderr


def test_pictures_name_layers_by_what_they_are_on_integer_steps(tmp_path):
    path = str(tmp_path / "run.jsonl")
    _train(path, small_model(), steps=4)
    run = report.load_jsonl(path)
    ax = report.layer_norms_figure(run).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0 Linear(12->8)",
                                                                  "2 Linear(8->1)"]
    assert all(float(t).is_integer() for t in ax.get_xticks())


FOREIGN = {
    "json that is not a record": '{"hello": 1}\n{"step": "x"}\n',
    "a json list": "[1, 2, 3]\n",
    "plain text": "epoch 1 loss 0.5\n",
    "empty": "",
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_text_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / "foreign.jsonl"
    path.write_text(FOREIGN[kind])
    status, _, stderr = _run_cli("report", str(path), "-o", str(tmp_path / "r.html"))
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and str(path) in stderr and "no gradkern" in stderr


def test_binary_missing_and_directory_inputs_and_a_missing_output_folder(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    good = str(tmp_path / "run.jsonl")
    _train(good, small_model(), steps=2)
    cases = {
        (str(binary), str(tmp_path / "r.html")): "not a text file",
        (str(tmp_path / "missing.jsonl"), str(tmp_path / "r.html")): "no such file",
        (str(tmp_path), str(tmp_path / "r.html")): "is a directory",
        (good, str(tmp_path / "nowhere" / "r.html")): "does not exist",
    }
    for (source, out), words in cases.items():
        status, _, stderr = _run_cli("report", source, "-o", out)
        assert status == 2 and words in stderr and "Traceback" not in stderr, (source, stderr)
        assert stderr.strip().count("\n") == 0


def test_lines_that_are_not_records_are_counted(tmp_path):
    path = str(tmp_path / "run.jsonl")
    _train(path, small_model(), steps=3)
    with open(path, "a") as f:
        f.write("garbage\n{\"type\": \"step\"}\n")
    run = report.load_jsonl(path)
    assert run.skipped_lines == 2 and len(run.steps) == 3
    status, stdout, _ = _run_cli("report", path, "-o", str(tmp_path / "r.html"))
    assert status == 0 and "2 line(s)" in stdout


def test_repeated_events_collapse_into_one_row():
    events = [{"step": s, "event": "nonfinite", "layers": ["0"], "message": "m", "advice": ["a"]}
              for s in range(5, 151)]
    events.append({"step": 151, "event": "exploding", "layers": ["0"], "message": "m",
                   "advice": []})
    rows = report.collapsed_events(events)
    assert [(r["event"], r["step"], r["last_step"], r["count"]) for r in rows] == [
        ("nonfinite", 5, 150, 146), ("exploding", 151, 151, 1)]
    html_table = report.events_table(report.Run("r", [], events))
    assert html_table.count("<tr>") == 3 and "5-150 (146 times)" in html_table


def test_cli_refuses_devices_and_backends_it_cannot_run_in_one_line():
    status, _, stderr = _run_cli("bench", "--device", "tpu", "--quick")
    assert status == 2 and "cpu or cuda" in stderr and "Traceback" not in stderr
    if not torch.cuda.is_available():
        status, _, stderr = _run_cli("bench", "--device", "cuda", "--quick")
        assert status == 2 and "no CUDA device" in stderr and "Traceback" not in stderr
        status, _, stderr = _run_cli("demo", "--quick", env={"GRADKERN_BACKEND": "cuda"})
        assert status == 2 and "GRADKERN_BACKEND=cuda" in stderr and "Traceback" not in stderr
        status, stdout, _ = _run_cli("info", env={"GRADKERN_BACKEND": "cuda"})
        assert status == 0 and "forced to cuda" in stdout and "NOT usable" in stdout


def test_a_forced_backend_that_cannot_run_warns_at_the_first_op():
    if torch.cuda.is_available():
        pytest.skip("cuda is usable here")
    code = ("import warnings, torch, gradkern as gk\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    gk.get_total_norm([torch.ones(3)])\n"
            "print(sum('GRADKERN_BACKEND=cuda' in str(x.message) for x in w))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={**os.environ, "GRADKERN_BACKEND": "cuda"}, check=True)
    assert out.stdout.strip() == "1"
