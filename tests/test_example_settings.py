"""examples/safer_smollm2.py --combine: which runs may be merged into one 3-seed report."""
from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def example():
    path = os.path.join(HERE, os.pardir, "examples", "safer_smollm2.py")
    spec = importlib.util.spec_from_file_location("safer_smollm2_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_from_before_an_option_compare_with_its_default(example):
    now = vars(example.parse_args(["--router-epochs", "5"]))
    before = {k: v for k, v in now.items() if k not in ("router_init", "probe_logit_std")}
    assert example.comparable_settings(before) == example.comparable_settings(now)


def test_where_a_run_ran_does_not_matter_but_its_training_settings_do(example):
    a = vars(example.parse_args(["--seeds", "0", "--out", "a", "--experts-from", "runs/x", "--no-base"]))
    b = vars(example.parse_args(["--seeds", "1", "2", "--out", "b"]))
    assert example.comparable_settings(a) == example.comparable_settings(b)
    for flag, value in (("--router-epochs", "5"), ("--router-lr", "1e-3"), ("--router-init", "probe")):
        c = vars(example.parse_args([flag, value]))
        assert example.comparable_settings(c) != example.comparable_settings(b), flag
