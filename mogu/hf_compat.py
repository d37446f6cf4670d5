"""Every use of Hugging Face internals in mogu, in one file, behind a version gate.

mogu's decoding loop (mogu/generation.py) runs inside ``GenerationMixin.generate`` as a
``custom_generate`` callable and so leans on pieces of transformers that are not public
API (underscore names, cache layer attributes, output dataclass fields); training
(mogu/training/) leans on a few of transformers' and peft's. Each such use is a small
named function here whose docstring says what it relies on, so that a transformers
upgrade breaks in this one file, and the tests of this file (tests/test_hf_compat.py) and
of generation and training say where.

Tested range: transformers ``TESTED_TRANSFORMERS`` (lowest and highest minor release the
test suite has run on; setup.py asks for exactly this range; CI runs the generation and
training tests on both ends, see .ci/run). The gate (:func:`check_transformers`, run by
the first call of any function here) raises :class:`TransformersVersionError` below the
lowest and warns once (:class:`UntestedTransformersWarning`) above the highest.
``MOGU_ALLOW_UNTESTED_TRANSFORMERS=1`` turns the error into the warning too, for trying
an older release at one's own risk.

Names that differ between the ends of the range (handled here, nowhere else):

* the KV cache keyword and output field: ``past_key_values`` (5.17 ... 5.2x) became
  ``cache`` (5.24); :data:`CACHE_KEYS`, :func:`cache_kwarg`, :func:`find_cache`;
* activation checkpointing: ``gradient_checkpointing_enable/disable`` and
  ``is_gradient_checkpointing`` (5.17) gained the new names
  ``activation_checkpointing_*`` / ``is_activation_checkpointing`` (5.24, the old ones
  warn); :func:`checkpointing_enabled`, :func:`set_checkpointing`.

Nothing here imports transformers or peft at module import (``import mogu`` stays light).
"""
from __future__ import annotations

import functools
import inspect
import os
import re
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

# Lowest and highest tested transformers minor releases; setup.py: transformers>=5.17,<5.25.
TESTED_TRANSFORMERS: Tuple[str, str] = ("5.17", "5.24")
ALLOW_UNTESTED_ENV = "MOGU_ALLOW_UNTESTED_TRANSFORMERS"

# The model-kwargs key / output field of the KV cache: "cache" in the newest tested
# release, "past_key_values" in the older ones. Looked up in this order.
CACHE_KEYS = ("cache", "past_key_values")


class TransformersVersionError(RuntimeError):
    """The installed transformers is older than the lowest tested release."""


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the highest tested release."""


def _minor(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as "5.17.0", "5.25.0.dev0" or "5.3"."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"mogu: cannot read the transformers version {version!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def installed_transformers() -> str:
    """The installed transformers version, from the package metadata (no transformers import)."""
    from importlib.metadata import version
    return version("transformers")


def check_transformers(version: Optional[str] = None) -> str:
    """Check a transformers version (default: the installed one) against the tested range.

    Returns the version. Raises :class:`TransformersVersionError` below
    ``TESTED_TRANSFORMERS[0]`` (unless ``MOGU_ALLOW_UNTESTED_TRANSFORMERS=1``, then it
    warns); warns :class:`UntestedTransformersWarning` above ``TESTED_TRANSFORMERS[1]``.
    Reads the installed version with :func:`installed_transformers`.
    """
    if version is None:
        version = installed_transformers()
    low, high = TESTED_TRANSFORMERS
    have = _minor(version)
    tested = f"mogu is tested with transformers {low} to {high} (setup.py: transformers>={low},<{_next(high)})"
    if have < _minor(low):
        message = (f"transformers {version} is older than the lowest tested release {low}: {tested}. mogu's "
                   f"decoding and training use transformers internals (all in mogu/hf_compat.py) that differ in "
                   f"older releases. Install a tested one: pip install 'transformers>={low},<{_next(high)}'")
        if os.environ.get(ALLOW_UNTESTED_ENV) != "1":
            raise TransformersVersionError(message + f" (or set {ALLOW_UNTESTED_ENV}=1 to try it anyway)")
        warnings.warn(message, UntestedTransformersWarning, stacklevel=3)
    elif have > _minor(high):
        warnings.warn(f"transformers {version} is newer than the highest tested release {high}: {tested}. If "
                      f"generation or training fails, the transformers internals mogu relies on (all in "
                      f"mogu/hf_compat.py) have changed; pip install 'transformers>={low},<{_next(high)}' is "
                      f"known to work", UntestedTransformersWarning, stacklevel=3)
    return version


def _next(minor: str) -> str:
    major, m = _minor(minor)
    return f"{major}.{m + 1}"


_CHECKED = False


def _gate() -> None:
    """Run :func:`check_transformers` once per process (every helper here calls this)."""
    global _CHECKED
    if not _CHECKED:
        check_transformers()
        _CHECKED = True


# ===================================================================== generation
def cache_kwarg() -> str:
    """The keyword under which the installed transformers passes the KV cache to
    ``generate`` / ``forward`` and returns it in ``GenerateDecoderOnlyOutput``: "cache"
    (5.24) or "past_key_values" (5.17). Relies on the output dataclass's field names."""
    _gate()
    from transformers.generation.utils import GenerateDecoderOnlyOutput
    fields = GenerateDecoderOnlyOutput.__dataclass_fields__
    for key in CACHE_KEYS:
        if key in fields:
            return key
    raise RuntimeError(f"mogu: transformers' GenerateDecoderOnlyOutput has none of the cache fields {CACHE_KEYS}; "
                       f"update mogu/hf_compat.py for this transformers release")


def find_cache(model_kwargs: Dict[str, Any]):
    """The KV cache object in HF generation model kwargs (under either name), or None."""
    for key in CACHE_KEYS:
        if model_kwargs.get(key) is not None:
            return model_kwargs[key]
    return None


def output_cache(output):
    """The KV cache held by a ``GenerateDecoderOnlyOutput`` or a model output (either field name)."""
    for key in CACHE_KEYS:
        value = getattr(output, key, None)
        if value is not None:
            return value
    return None


def pad_token_tensor(generation_config, device: torch.device) -> Optional[torch.Tensor]:
    """The pad token id as a 0-d tensor on ``device``, or None. Relies on the private
    ``generation_config._pad_token_tensor`` that ``generate`` sets before calling a
    ``custom_generate`` loop (with the eos fallback HF applies when pad is unset)."""
    pad = generation_config._pad_token_tensor
    return pad.to(device) if pad is not None else None


@functools.lru_cache(maxsize=None)
def _takes_next_sequence_length(model_class: type) -> bool:
    return "next_sequence_length" in inspect.signature(model_class.prepare_inputs_for_generation).parameters


def prefill_inputs(model: nn.Module, input_ids: torch.Tensor, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model inputs for the prompt pass: ``prepare_inputs_for_generation`` with
    ``is_first_iteration=True`` (the flag ``GenerationMixin._sample`` passes on its first
    step in both ends of the tested range)."""
    return model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)


def decode_inputs(model: nn.Module, input_ids: torch.Tensor, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model inputs for one decode step of ``input_ids`` (B, L): as ``_sample`` prepares
    them, passing ``next_sequence_length`` (1 with a cache, None without) where the
    model's ``prepare_inputs_for_generation`` takes it."""
    extra = {}
    if _takes_next_sequence_length(type(model)):
        extra["next_sequence_length"] = 1 if model_kwargs.get("use_cache", True) else None
    return model.prepare_inputs_for_generation(input_ids, **extra, **model_kwargs)


def update_model_kwargs(model: nn.Module, outputs, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The model kwargs for the next step after a forward (cache, attention mask, cache
    position): the private ``GenerationMixin._update_model_kwargs_for_generation`` for a
    decoder-only model, as ``_sample`` calls it."""
    return model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)


def is_dynamic_cache(cache) -> bool:
    """Whether ``cache`` is a ``transformers.DynamicCache`` (it can drop batch rows)."""
    from transformers import DynamicCache
    return isinstance(cache, DynamicCache)


def new_dynamic_cache(model: nn.Module):
    """An empty ``DynamicCache`` laid out for ``model``'s decoder (its text config)."""
    from transformers import DynamicCache
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def empty_cache(cache, model: nn.Module) -> None:
    """Drop every key/value of the DynamicCache ``cache`` in place, freeing their memory.

    The object stays the one the caller (or HF ``generate``) holds; its layers are
    replaced by the empty layers of a new cache built for ``model``
    (:func:`new_dynamic_cache`). Writes ``Cache.layers`` directly: ``Cache.reset()`` zeroes
    the tensors without dropping them in 5.17, and ``crop(0)`` keeps their storage alive.
    """
    _gate()
    cache.layers[:] = new_dynamic_cache(model).layers
    if cache.get_seq_length() != 0:
        raise RuntimeError(f"mogu.generate: could not empty the {type(cache).__name__} for the base prefill; "
                           f"update mogu/hf_compat.py for this transformers release")


def decoder_only_output(sequences: torch.Tensor, scores, logits, cache):
    """HF's ``GenerateDecoderOnlyOutput`` for a custom loop's result, the cache under the
    installed release's field name (:func:`cache_kwarg`)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits, **{cache_kwarg(): cache})


def generate_with_loop(model: nn.Module, input_ids: torch.Tensor, loop: Callable, **generation_kwargs):
    """Run the model class's ``generate`` with ``loop`` as its decoding loop.

    Relies on ``generate``'s ``custom_generate`` accepting a callable, which it calls as
    ``loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
    synced_gpus=..., streamer=..., **model_kwargs)`` after preparing everything (and
    dropping ``tokenizer``). Calls the class's ``generate``, so an instance override (such
    as the one ``mogu.install_generate`` sets) is bypassed.
    """
    _gate()
    return type(model).generate(model, input_ids, custom_generate=loop, **generation_kwargs)


# ===================================================================== training
def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether HF activation (gradient) checkpointing is on: ``is_activation_checkpointing``
    (5.24) or ``is_gradient_checkpointing`` (5.17; deprecated later); False for a model
    with neither."""
    _gate()
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Turn HF activation checkpointing on or off, non-reentrant.

    Uses ``activation_checkpointing_enable/disable`` (5.24) or
    ``gradient_checkpointing_enable/disable`` (5.17). Non-reentrant checkpointing keeps
    autograd from the recomputed segments to tensors used outside them (the router gates
    of the stage-2 loss). Enabling also installs HF's input-embedding requires-grad hook
    (``enable_input_require_grads``, stored in the private ``_require_grads_hook``);
    disabling removes it only for peft-loaded models, so it is removed here explicitly.
    ValueError for a model that supports neither.
    """
    _gate()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_enable"):
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    else:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    if not enable and hasattr(model, "_require_grads_hook") and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def has_peft_adapter(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model or carries a peft adapter (peft's ``get_peft_model``
    and transformers' PEFT integration leave a ``peft_config`` attribute on the base)."""
    from peft import PeftModel
    return isinstance(model, PeftModel) or bool(getattr(model, "peft_config", None))


def make_peft_model(model: nn.Module, lora_config):
    """``peft.get_peft_model(model, lora_config)`` without the FutureWarning about
    ``is_gradient_checkpointing`` that peft triggers by reading that property, which
    transformers 5.2x deprecates (nothing the caller can act on)."""
    _gate()
    from peft import get_peft_model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config)


def unload_peft(peft_model, base_model: nn.Module) -> nn.Module:
    """Remove peft's LoRA layers from ``base_model`` (``peft_model.unload()``, the wrapped
    modules back in place) and the ``peft_config`` attribute that ``get_peft_model`` set on
    the base model's instance ``__dict__``: peft 0.21's ``unload`` removes it, releases
    before it left it behind, and a leftover makes the model look adapter-carrying to
    :func:`has_peft_adapter` and to transformers. Returns ``base_model``."""
    peft_model.unload()
    if "peft_config" in base_model.__dict__:
        del base_model.__dict__["peft_config"]
    return base_model
