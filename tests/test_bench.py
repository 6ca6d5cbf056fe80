"""The benchmark's building blocks (the timings themselves are never asserted)."""

import math

import torch

from gradkern.backends._cpu_share import thread_times
from gradkern.tools.bench import LimitPasses
from gradkern.tools.scenarios import make_grads, scenarios


def test_gpu_scenarios_are_the_issue_sizes():
    sets = scenarios(quick=False, device="cuda")
    elements = {name: sum(math.prod(shape) for shape, _ in spec) for name, spec in sets.items()}
    assert elements["many-small 20,000 x 4,096"] == 20_000 * 4096
    llama = next(name for name in sets if name.startswith("LLaMA"))
    assert 6.7e9 < elements[llama] < 6.8e9
    assert {dtype for _, dtype in sets[llama]} == {torch.bfloat16}
    assert len(scenarios(quick=False, device="cpu")["many-small 10,000 x 1,000"]) == 10_000


def test_benchmark_parameters_hold_full_gradients_but_no_weight_memory():
    params = make_grads([((300, 7), torch.bfloat16), ((5,), torch.float32)])
    for p, (shape, dtype) in zip(params, [((300, 7), torch.bfloat16), ((5,), torch.float32)]):
        assert p.shape == shape and p.grad.shape == shape and p.grad.dtype == dtype
        assert p.untyped_storage().nbytes() == p.element_size()
        assert p.grad.std() > 0.5


def test_limit_reads_the_gradients_themselves_where_they_are_large():
    large = [torch.ones(1 << 19), torch.ones(3, 1 << 18)]  # 2 MiB and 3 MiB of fp32
    limit = LimitPasses(large + [torch.ones(10, dtype=torch.bfloat16)], device="cpu")
    assert limit.read_source == "the gradients" and limit.read_bytes == 5 << 20
    assert len(limit.passes) == 1 and limit.copy_bytes == 0
    sums = limit.passes[0]()
    assert [s.item() for s in sums] == [t.numel() for t in large]  # every element read
    assert limit.bandwidths([0.5e-3]) == ((5 << 20) / 0.5e-3, None)


def test_limit_reads_a_flat_buffer_for_many_small_tensors():
    small = [torch.ones(1000) for _ in range(50)]
    limit = LimitPasses(small, device="cpu")
    assert limit.read_source == "a flat buffer" and limit.read_bytes == 50 * 4000
    assert limit.passes[0]().item() == 50 * 1000
    # large tensors holding less than half the bytes do not count either
    mixed = LimitPasses([torch.ones(1 << 18), torch.ones(1 << 20, dtype=torch.bfloat16)], "cpu")
    assert mixed.read_source == "a flat buffer"
    # a flat buffer is capped at 4 GiB
    huge = LimitPasses([torch.empty(3 << 30, dtype=torch.float16, device="meta")], "meta")
    assert huge.read_bytes == 4 << 30


def _load_benchmark_script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load_cpu_targets():
    return _load_benchmark_script("cpu_targets")


def test_cpu_targets_read_each_row_the_way_round_its_target_names():
    targets = _load_cpu_targets()
    many, gpt2, huge = targets.MANY, targets.GPT2, targets.HUGE

    def row(op, scenario, speedup, share=0.5):
        return dict(op=op, scenario=scenario, speedup=speedup, limit_share=share)

    run = {"rows": [
        row("total norm", many, 9.9), row("total norm", huge, 1.2, share=0.86),
        row("clip_grad_norm_, no clipping", many, 12.0),
        row("clip_grad_value_, <1% clamped", gpt2, 2.5),
        row("clip_grad_value_, nothing clamped", gpt2, 2.6),
        # speed-up = total-norm time / grad_stats time: 0.8 means stats take 1.25x the time
        row("grad_stats vs gradkern total norm", many, 0.8),
        row("grad_stats vs gradkern total norm", gpt2, 1.1),
        row("grad_stats vs per-tensor torch", many, 40.0),
        row("grad_stats vs per-tensor torch", gpt2, 4.0),
        # the "torch" column is Numba: speed-up = Numba time / C++ time
        row("total norm: numba vs gradkern", huge, 2.5),
    ], "monitor_rows": [dict(op="training step + gradkern", inside_ms=4.0),
                        dict(op="training step + hooks", inside_ms=44.0)],
        "contention_rows": [
            dict(op="total norm", scenario=targets.SMALL, busy=3, torch_median_ms=3.0,
                 torch_p90_ms=10.0, gradkern_median_ms=0.5, gradkern_p90_ms=6.0,
                 read_median_ms=0.25, read_p90_ms=4.0, torch_lost_core=0.45,
                 gradkern_lost_core=0.15, torch_kept_median_ms=2.8,
                 gradkern_kept_median_ms=0.7),
            # a run from before the lost-core columns, or where they could not be read
            dict(op="clip_grad_norm_, no clipping", scenario=targets.SMALL, busy=3,
                 torch_median_ms=9.0, torch_p90_ms=12.0, gradkern_median_ms=1.0,
                 gradkern_p90_ms=1.5, read_median_ms=0.2, read_p90_ms=0.3),
            # another number of busy processes is not the target's
            dict(op="total norm", scenario=gpt2, busy=1, torch_median_ms=50.0,
                 torch_p90_ms=60.0, gradkern_median_ms=5.0, gradkern_p90_ms=6.0)]}
    report = targets.report([run])
    lines = {line[:58].strip(): line[58:] for line in report}
    assert lines["total norm, 10,000 x 1,000, >= 10x"].split() == ["9.90x", "met", "in", "0", "of", "1"]
    assert "12.00x   met in 1 of 1" in lines["clip_grad_norm_, 10,000 x 1,000, >= 10x"]
    assert "2.50x   met in 1 of 1" in lines["clip_grad_value_, GPT-2, < 1% clamped, >= 2.5x"]
    assert lines["its ceiling (torch / gradkern reading, writing nothing)"].split() == ["2.60x"]
    assert "1.25x   met in 0 of 1" in lines["grad_stats vs total norm alone, <= 1.15x the time"]
    assert "4.00x   met in 0 of 1" in lines["grad_stats vs per-tensor torch calls, >= 5x"]
    assert "86%   met in 1 of 1" in lines["total norm, 4 x 64M, >= 85% of read bandwidth"]
    assert "0.40x   met in 0 of 1" in lines["Numba vs C++, 4 x 64M, >= 0.5x"]
    assert "11.00x   met in 1 of 1" in lines["Monitor vs per-parameter hooks, >= 10x less time in hooks"]
    assert "6.00x   met in 1 of 1" in lines["3 busy: total norm, 1,000 x 1,000, median >= 5x"]
    assert "1.67x   met in 0 of 1" in lines["3 busy: total norm, 1,000 x 1,000, p90 >= 2x"]
    assert lines["3 busy: total norm, GPT-2, median >= 5x"].split()[0] == "-"
    # each contention line is followed by torch over the read pass of the same row
    after = {report[i - 1][:58].strip(): report[i][58:].split() for i in range(1, len(report))
             if report[i].strip().startswith("within reach")}
    assert after["3 busy: total norm, 1,000 x 1,000, median >= 5x"] == ["12.00x"]
    assert after["3 busy: total norm, 1,000 x 1,000, p90 >= 2x"] == ["2.50x"]
    assert after["3 busy: total norm, GPT-2, median >= 5x"] == ["-"]
    # then what the statistic rests on: for a median, the share of torch's calls that lost the
    # core and the speed-up over the calls that kept it; for a p90, gradkern's share
    under = {}
    for line in report:
        if not line.startswith(" "):
            target = line[:58].strip()
        else:
            under.setdefault(target, []).append((line[:58].strip(), line[58:].split()))
    assert under["3 busy: total norm, 1,000 x 1,000, median >= 5x"][1:] == [
        ("torch's calls that lost the core mid-call", ["45%"]),
        ("calls that kept the core (torch / gradkern medians)", ["4.00x"])]
    assert under["3 busy: total norm, 1,000 x 1,000, p90 >= 2x"][1:] == [
        ("gradkern's calls that lost the core mid-call", ["15%"])]
    assert under["3 busy: clip_grad_norm_, 1,000 x 1,000, median >= 5x"][1:] == [
        ("torch's calls that lost the core mid-call", ["-"]),
        ("calls that kept the core (torch / gradkern medians)", ["-"])]
    # a run without a row shows "-" and does not count
    assert lines["clip_grad_norm_, GPT-2, clipping, >= 1.0x"].split() == ["-", "met", "in", "0", "of", "0"]


def test_fused_step_times_run_every_way():
    from gradkern.tools.bench import best_times
    from gradkern.tools.bench_fused_step import fused_step_times

    for amp in (False, True):
        t = fused_step_times(1, "cpu", 1, best_times, amp=amp)
        assert set(t) == {"torch_clip", "gradkern", "unclipped", "read"}
        assert all(v > 0 for v in t.values())


def test_contention_scenario_starts_and_stops_its_busy_processes(monkeypatch):
    from gradkern.tools import bench_contention

    monkeypatch.setattr(bench_contention, "SETS",
                        {"small": lambda: [((100,), torch.float32)] * 50})
    with bench_contention.busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)  # stopped
    rows = bench_contention.contention_times(1, calls=5)
    assert {r["op"] for r in rows} == {"total norm", "clip_grad_norm_, no clipping"}
    for r in rows:
        assert r["busy"] == 1 and r["calls"] == 5
        assert 0 < r["gradkern_median_ms"] <= r["gradkern_p90_ms"]
        assert 0 < r["torch_median_ms"] <= r["torch_p90_ms"]
        assert 0 < r["read_median_ms"] <= r["read_p90_ms"]
        if thread_times() is not None:  # Linux: which calls lost the core is known
            for who in ("torch", "gradkern", "read"):
                assert 0.0 <= r[f"{who}_lost_core"] <= 1.0
                kept = r[f"{who}_kept_median_ms"]
                assert (kept is None) == (r[f"{who}_lost_core"] == 1.0)


def test_contention_summary_splits_the_calls_that_lost_the_core():
    from gradkern.tools.bench_contention import LOST_CORE_MS, _summary

    # (wall ms, ms the calling thread waited for a core during the call)
    calls = [(1.0, 0.0), (9.0, 8.0), (1.2, LOST_CORE_MS / 2), (7.5, LOST_CORE_MS), (1.1, 0.0)]
    row = _summary("gradkern", calls)
    assert row["gradkern_median_ms"] == 1.2 and row["gradkern_p90_ms"] == 9.0
    assert row["gradkern_lost_core"] == 2 / 5
    assert row["gradkern_kept_median_ms"] == 1.1
    # every call lost the core: no kept median
    assert _summary("torch", [(9.0, 8.0), (8.0, 7.0)])["torch_kept_median_ms"] is None
    # where the waits could not be read, only the times
    assert set(_summary("read", [(1.0, None), (2.0, None)])) == {"read_median_ms", "read_p90_ms"}


def test_device_name_names_the_gpu(monkeypatch):
    from gradkern.tools.bench import device_name

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: asked.append(d) or "H100")
    assert device_name("cuda") == "H100" and asked == [torch.device("cuda")]
    assert device_name("cpu") not in ("", "H100")


def test_contention_rows_alone_are_saved_as_a_bench_run(monkeypatch, tmp_path, capsys):
    import json

    from gradkern.tools import bench_contention

    monkeypatch.setattr(bench_contention, "SETS",
                        {"small": lambda: [((100,), torch.float32)] * 50})
    path = tmp_path / "run.json"
    assert bench_contention.main(["1", "--json", str(path)]) == 0
    run = json.loads(path.read_text())
    assert run["rows"] == [] and run["command"].endswith("bench_contention 1")
    assert [r["busy"] for r in run["contention_rows"]] == [1, 1]
    assert "contention: 1 busy process beside the loop" in capsys.readouterr().out
    targets = _load_cpu_targets()
    # its rows are not the targets' (one busy process): every target reads "-"
    assert all(line.endswith("-   met in 0 of 0")
               for line in targets.report([run]) if "met in" in line)


def test_the_table_of_a_run_of_contention_rows_alone():
    table = _load_benchmark_script("table")
    row = dict(op="total norm", scenario="many-small 1,000 x 1,000", busy=3, calls=60,
               torch_median_ms=3.0, torch_p90_ms=10.0, gradkern_median_ms=1.0,
               gradkern_p90_ms=8.0, read_median_ms=0.2, read_p90_ms=12.0,
               torch_lost_core=0.35, gradkern_lost_core=0.2)
    lines = table.markdown({"rows": [], "contention_rows": [row],
                            "command": "python -m gradkern.tools.bench_contention 3"}).splitlines()
    assert "best of 7" not in lines[0]
    assert lines[-1] == ("| total norm | many-small 1,000 x 1,000 | 3.00 / 10.00 | 1.00 / 8.00 | "
                         "3.00x / 1.25x | 0.20 / 12.00 | 15.00x / 0.83x | 35% / 20% |")
    assert sum(l.startswith("| op | set |") for l in lines) == 1  # no empty quiet table
    del row["torch_lost_core"], row["gradkern_lost_core"]  # a run from before those columns
    assert table.markdown({"rows": [], "contention_rows": [row]}).splitlines()[-1].endswith(
        "| 15.00x / 0.83x |")
