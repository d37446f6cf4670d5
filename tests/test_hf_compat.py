"""mogu.hf_compat: the version gate and the helpers over transformers / peft internals.

These run on whichever transformers is installed; CI runs them (with the generation and
training tests) on both ends of the tested range, see .ci/run.
"""
import os
import re
import warnings

import pytest
import torch

from mogu import hf_compat
from tiny_models import tiny_llama

ROOT = os.path.join(os.path.dirname(__file__), "..")
LOW, HIGH = hf_compat.TESTED_TRANSFORMERS


def test_version_gate_errors_below_and_warns_above_the_tested_range(monkeypatch):
    monkeypatch.delenv(hf_compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(hf_compat.TransformersVersionError, match=rf"older than the lowest tested release {LOW}"):
        hf_compat.check_transformers("5.16.2")
    with pytest.raises(hf_compat.TransformersVersionError, match="hf_compat"):
        hf_compat.check_transformers("4.57.6")
    with pytest.warns(hf_compat.UntestedTransformersWarning, match=rf"newer than the highest tested release {HIGH}"):
        hf_compat.check_transformers("5.25.0")
    with pytest.warns(hf_compat.UntestedTransformersWarning):
        hf_compat.check_transformers("6.0.0.dev0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # both ends of the range, any patch release: silent
        for version in (f"{LOW}.0", f"{LOW}.3", f"{HIGH}.0", f"{HIGH}.9"):
            assert hf_compat.check_transformers(version) == version
    monkeypatch.setenv(hf_compat.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(hf_compat.UntestedTransformersWarning, match="older"):
        hf_compat.check_transformers("5.16.2")


def test_generate_and_training_helpers_pass_the_gate_first(monkeypatch):
    """An untested-old transformers stops mogu.generate and the training helpers with the
    named error before anything runs (the gate runs on the first use of hf_compat)."""
    import mogu

    monkeypatch.delenv(hf_compat.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(hf_compat, "installed_transformers", lambda: "5.10.0")
    model = tiny_llama()
    mogu.patch_model(model)
    for call in (lambda: mogu.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=2),
                 lambda: hf_compat.set_checkpointing(model, True), lambda: hf_compat.checkpointing_enabled(model)):
        monkeypatch.setattr(hf_compat, "_CHECKED", False)
        with pytest.raises(hf_compat.TransformersVersionError, match="5.10.0"):
            call()


def test_installed_transformers_is_tested_and_setup_py_states_the_same_range():
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_compat.check_transformers(transformers.__version__)
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    pins = re.findall(r'"transformers>=([\d.]+),<([\d.]+)"', setup)
    major, minor = (int(p) for p in HIGH.split("."))
    assert pins == [(LOW, f"{major}.{minor + 1}")], pins
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert f"transformers=={LOW}." in ci          # CI also runs the lowest tested release


def test_cache_kwarg_is_the_name_this_release_uses():
    """The cache keyword the helper reports is the one the model's forward takes (and the
    output dataclass field), so passing a cache under it is not an unused-kwarg error."""
    import inspect

    from transformers import LlamaForCausalLM

    key = hf_compat.cache_kwarg()
    assert key in hf_compat.CACHE_KEYS
    assert key in inspect.signature(LlamaForCausalLM.forward).parameters
    other = [k for k in hf_compat.CACHE_KEYS if k != key]
    assert not any(k in inspect.signature(LlamaForCausalLM.forward).parameters for k in other)


def _filled_cache(rows, seed):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(2):
        k, v = torch.randn(rows, 2, 3, 4, generator=g), torch.randn(rows, 2, 3, 4, generator=g)
        cache.update(k, v, layer)
    return cache


def test_empty_cache_frees_keys_in_place_and_the_cache_refills():
    """What the exact protocol does at the switch to the base model: the same cache object,
    emptied (its old key tensors no longer referenced), then filled by a prefill again."""
    import weakref

    model = tiny_llama()
    cache = _filled_cache(3, 0)
    assert hf_compat.is_dynamic_cache(cache) and cache.get_seq_length() == 3
    old_keys = weakref.ref(cache.layers[0].keys)
    hf_compat.empty_cache(cache, model)
    assert cache.get_seq_length() == 0 and old_keys() is None
    ids = torch.randint(3, 50, (2, 6))
    with torch.no_grad():
        model(ids, **{hf_compat.cache_kwarg(): cache}, use_cache=True)
    assert cache.get_seq_length() == 6 and len(cache.layers) == model.config.num_hidden_layers


def test_checkpointing_on_and_off_leaves_no_input_grad_hook():
    model = tiny_llama()
    assert not hf_compat.checkpointing_enabled(model)
    hf_compat.set_checkpointing(model, True)
    assert hf_compat.checkpointing_enabled(model)
    hf_compat.set_checkpointing(model, False)
    assert not hf_compat.checkpointing_enabled(model)
    assert not hasattr(model, "_require_grads_hook")         # HF leaves it on non-peft models


def test_peft_model_round_trip_leaves_the_plain_model():
    from peft import LoraConfig

    model = tiny_llama()
    before = {name: type(m) for name, m in model.named_modules()}
    assert not hf_compat.has_peft_adapter(model)
    peft_model = hf_compat.make_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"],
                                                             task_type="CAUSAL_LM"))
    assert hf_compat.has_peft_adapter(peft_model) and hf_compat.has_peft_adapter(model)
    assert hf_compat.unload_peft(peft_model, model) is model
    assert not hf_compat.has_peft_adapter(model)
    assert {name: type(m) for name, m in model.named_modules()} == before

    class LeavesConfigBehind:            # a peft release whose unload() keeps peft_config on the base
        def unload(self):
            pass

    model.__dict__["peft_config"] = {"default": object()}
    assert hf_compat.has_peft_adapter(model)
    hf_compat.unload_peft(LeavesConfigBehind(), model)
    assert not hf_compat.has_peft_adapter(model) and "peft_config" not in model.__dict__
