"""The README's two fresh-machine commands stay true: CI runs the test one verbatim."""
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    blocks = _bash_blocks(readme)
    test_cmd = next(b for b in blocks if "pytest" in b)
    main_cmd = next(b for b in blocks if "benchmarks/throughput.py" in b)
    assert test_cmd in ci.splitlines()
    assert main_cmd.startswith("pip install torch==2.13.0 && pip install -e .")
    assert os.path.exists(os.path.join(ROOT, "benchmarks", "throughput.py"))
