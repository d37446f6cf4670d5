"""Static checks of the whole tree.

* ruff with the project's configuration ([tool.ruff] in pyproject.toml): pyflakes (unused
  imports, undefined names) and pycodestyle, lines <= 120;
* import-linter with the contracts in [tool.importlinter] (pyproject.toml): the import
  direction of docs/design.md section 7 (cli -> evaluation | training | vllm_plugin ->
  generation -> core -> mogu_kernels) and mogu_kernels never importing mogu. A test below
  also proves the contract can fail: a copy of the package with one upward import is
  reported broken.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str, module: str):
    exe = shutil.which(name)
    return [exe] if exe else [sys.executable, "-m", module]


def test_ruff_is_clean():
    out = subprocess.run(_tool("ruff", "ruff") + ["check", "--no-cache", ROOT], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _lint_imports(root: str):
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(_tool("lint-imports", "importlinter.cli") + ["--no-cache", "--config",
                                                                      os.path.join(root, "pyproject.toml")],
                          capture_output=True, text=True, cwd=root, env=env)


def test_import_direction_contracts_are_kept():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout, out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The same contracts on a copy of the sources where the core (mogu.patching) imports a
    layer above it (mogu.generation): lint-imports must report the broken contract."""
    for name in ("mogu", "mogu_kernels"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "samples"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    patching = tmp_path / "mogu" / "patching.py"
    patching.write_text(patching.read_text() + "\nfrom .generation import PROTOCOLS  # noqa: E402,F401\n")
    out = _lint_imports(str(tmp_path))
    assert out.returncode != 0, out.stdout
    assert "mogu.patching -> mogu.generation" in out.stdout, out.stdout
