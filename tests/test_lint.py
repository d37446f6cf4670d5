"""The code passes ruff with the project's configuration ([tool.ruff] in pyproject.toml):
pyflakes (unused imports, undefined names) and pycodestyle, lines <= 120."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    out = subprocess.run(cmd + ["check", "--no-cache", ROOT], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
