"""``import gradkern`` stays cheap: the tools, matplotlib, Numba, Dynamo, DTensor and the torch
layout probe load when first used, not with the package."""

import json
import subprocess
import sys

import pytest

LAZY = ("gradkern.tools", "gradkern._torch_layout", "gradkern._compiled", "gradkern._ops",
        "matplotlib", "numba", "torch._dynamo", "torch.distributed.tensor")


def _loaded_after(code: str) -> list[str]:
    script = (f"import sys, json\n{code}\n"
              f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({LAZY!r}))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_gradkern_loads_none_of_the_heavy_parts():
    assert _loaded_after("import gradkern") == []


def test_first_use_loads_what_it_needs():
    loaded = _loaded_after("import torch, gradkern as gk\n"
                           "gk.clip_grad_norm_(torch.nn.Linear(2, 2).parameters(), 1.0)")
    if gk_native_cpu():
        assert "gradkern._torch_layout" in loaded  # the layout probe ran on first use
    assert not any(m.startswith(("gradkern.tools", "matplotlib", "torch._dynamo")) for m in loaded)


def gk_native_cpu() -> bool:
    from gradkern import _native

    return _native.cpu is not None


def test_report_leaves_the_matplotlib_backend_alone():
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [sys.executable, "-c",
         "import matplotlib; matplotlib.use('svg'); from gradkern.tools import report, demo; "
         "fig, ax = report.new_figure((2, 2)); ax.plot([1, 2]); png = report.png_bytes(fig); "
         "print(matplotlib.get_backend(), png[:4] == b'\\x89PNG')"],
        capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["svg", "True"]


@pytest.mark.parametrize("context", ["torch.no_grad()", "torch.inference_mode()",
                                     "torch.device('meta')"])
def test_the_layout_probe_runs_whatever_the_first_caller_set_up(context):
    """The probe runs at the first table read, inside whatever the caller set up; it must find
    the same layout as a probe from a clean state."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import torch, gradkern as gk\nfrom gradkern import _table\n"
         "t = torch.ones(3, device='cpu')\n"
         f"with {context}:\n    gk.get_total_norm([torch.ones(3, device='cpu')])\n"
         "print(_table.reader_report())"],
        capture_output=True, text=True, check=True, cwd="/")
    if gk_native_cpu():
        assert out.stdout.strip().startswith("direct"), out.stdout
