"""The documentation's examples run: every fenced block marked ```python run in docs/*.md and README.md.

Each runs in a fresh interpreter (an example may register a component; nothing leaks into other tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python run[^\n]*\n(.*?)^```", re.S | re.M)


def _examples():
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(REPO)}:{line}")


@pytest.mark.parametrize("code", list(_examples()))
def test_example_runs(code, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
