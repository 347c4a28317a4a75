"""The linter's rules (pyproject.toml, [tool.ruff]) hold over the whole repository: no unused import, no undefined
name, imports in order, no mutable default argument."""

import subprocess
import sys

from helpers import REPO


def test_ruff_finds_nothing():
    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-1000:]
