"""The README's examples run as written: every ```python block is a whole program, and each runs
in a fresh interpreter and an empty directory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_python_block_is_a_whole_program():
    assert len(BLOCKS) >= 6
    assert all(b.startswith(("import ", "from ")) for b in BLOCKS), [
        b.splitlines()[0] for b in BLOCKS if not b.startswith(("import ", "from "))]


def _title(block: str) -> str:
    return next(line for line in block.splitlines()
                if line.strip() and not line.startswith(("import", "from")))


@pytest.mark.parametrize("block", BLOCKS, ids=[_title(b)[:40] for b in BLOCKS])
def test_readme_example_runs(block, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
