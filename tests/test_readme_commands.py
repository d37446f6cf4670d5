"""The README's two fresh-machine commands work as written.

* The main command's benchmark step runs: the script it names, with the arguments it
  gives, from the repository root, on one tiny shape (``--shapes``), and writes its JSON.
  (tests/test_benchmark_smoke.py checks the benchmark's outputs in its ``--quick`` mode.)
* The test command is what CI executes: ``.ci/run`` is run with ``pip`` and ``python``
  replaced by recording stand-ins, and the commands it actually runs must start with the
  README's test command, step by step, followed by the lowest-transformers run.
"""
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap

from mogu import hf_compat

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def readme_commands():
    """(main, test): the two bash blocks of the README's "The two commands" section, each
    as a list of steps (argv lists) split on ``&&``."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = re.search(r"^## The two commands\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert section, "README.md has no '## The two commands' section"
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)]
    assert len(blocks) == 2, blocks
    for block in blocks:
        assert "\n" not in block, f"each README command is one line: {block!r}"
    main = next(b for b in blocks if "pytest" not in b)
    test = next(b for b in blocks if "pytest" in b)
    return [shlex.split(step) for step in main.split("&&")], [shlex.split(step) for step in test.split("&&")]


def test_readme_benchmark_command_runs_as_written(tmp_path):
    main, test = readme_commands()
    *installs, run = main
    assert all(step[:2] == ["pip", "install"] for step in installs), installs
    assert ["pip", "install", "-e", "."] in installs
    torch_pin = [s for s in installs if any(a.startswith("torch==") for a in s)]
    assert torch_pin and torch_pin[0] in test          # both commands install the same torch
    assert run[0] == "python" and run[1].endswith(".py"), run
    script, args = run[1], run[2:]
    out = tmp_path / "bench.json"
    # The install steps make the packages importable (pip install -e .); PYTHONPATH stands in
    # for them here, the way pytest itself finds the repository's packages.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, script, *args, "--shapes", "3x64x48", "--repeats", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["shape"] for r in rows} == {"M=3,K=64,N=48,r=8"}
    assert {"base", "published", "mogu:reference"} <= {r["impl"] for r in rows}
    assert all(r["ms"] > 0 for r in rows)


# A stand-in for pip and python: records its argv, creates the venv folders asked for (with
# itself as their python), reads a script from stdin, and does nothing else.
SHIM = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    name = os.path.basename(sys.argv[0])
    if os.path.dirname(os.path.abspath(sys.argv[0])) != {shim_dir!r}:
        name = "venv-" + name
    args = sys.argv[1:]
    with open({log!r}, "a") as f:
        f.write(json.dumps([name] + args) + "\\n")
    if args[:2] == ["-m", "venv"]:
        bindir = os.path.join(args[-1], "bin")
        os.makedirs(bindir, exist_ok=True)
        os.symlink(os.path.abspath(sys.argv[0]), os.path.join(bindir, "python"))
    elif args[:1] == ["-"]:
        sys.stdin.read()
    """)


def run_ci_recorded(tmp_path):
    """Run .ci/run with recording pip/python; returns the argv lists it ran, in order."""
    shim_dir, log = str(tmp_path / "shims"), str(tmp_path / "ran.jsonl")
    os.makedirs(shim_dir)
    for name in ("pip", "python"):
        path = os.path.join(shim_dir, name)
        with open(path, "w") as f:
            f.write(SHIM.format(python=sys.executable, shim_dir=shim_dir, log=log))
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    vllm_tier = os.path.join(shim_dir, "vllm-tier")          # records that .ci/run calls the vLLM tier
    with open(vllm_tier, "w") as f:
        f.write(SHIM.format(python=sys.executable, shim_dir=shim_dir, log=log))
    os.chmod(vllm_tier, os.stat(vllm_tier).st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": shim_dir + os.pathsep + os.environ["PATH"], "TMPDIR": str(tmp_path),
           "MOGU_CI_VLLM_RUNNER": vllm_tier}
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "run")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(log) as f:
        return [json.loads(line) for line in f]


def test_ci_runs_the_readme_test_command_then_the_lowest_transformers(tmp_path):
    _, test = readme_commands()
    ran = run_ci_recorded(tmp_path)
    # The main suite: exactly the README's test command, first, step by step.
    assert ran[:len(test)] == test, (ran[:len(test)], test)
    # Then the generation, training and hf_compat tests under the lowest tested transformers.
    rest = ran[len(test):]
    low = hf_compat.TESTED_TRANSFORMERS[0]
    installs = [r for r in rest if r[:4] == ["venv-python", "-m", "pip", "install"]]
    assert any(f"transformers=={low}.0" in r for r in installs), rest
    pytest_runs = [r for r in rest if r[:3] == ["venv-python", "-m", "pytest"]]
    assert len(pytest_runs) == 1, rest
    assert {"tests/test_generation.py", "tests/test_training.py", "tests/test_hf_compat.py"} <= set(pytest_runs[0])
    assert rest.index(installs[0]) < rest.index(pytest_runs[0])
    # Last, the vLLM tier (its own venv; .ci/run_vllm fails when it does not fully run).
    assert rest[-1] == ["vllm-tier"], rest
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert '"${MOGU_CI_VLLM_RUNNER:-.ci/run_vllm}"' in f.read()
