"""What the exporter writes and the vLLM model classes read (no vLLM import here).

The served folder's ``config.json`` names a MoGU architecture (``architectures``) and
carries a ``"mogu"`` section::

    "mogu": {"format": "mogu-kernels-vllm", "version": 1,
             "config": {... MoGUConfig ...},          # r, lora_alpha, layers, router_offset, ...
             "modules": ["model.layers.0.self_attn.o_proj", ...],
             "weights": "mogu_model.safetensors", "protocol": "always"}

The MoGU tensors themselves are the project's own folded format (``mogu_model.safetensors``
and ``mogu_config.json`` beside the base weights, docs/design.md section 4); vLLM's
weight loader reads every ``*.safetensors`` of the folder, so they arrive through the
model's ``load_weights`` with the base weights.
"""
from __future__ import annotations

from typing import Any, Dict

from ..config import EXPERTS, MoGUConfig

SECTION_KEY = "mogu"
SECTION_FORMAT = "mogu-kernels-vllm"
SECTION_VERSION = 1
# The Hugging Face architecture of the base model -> the MoGU architecture served by vLLM.
ARCHITECTURES: Dict[str, str] = {
    "LlamaForCausalLM": "MoGULlamaForCausalLM",
    "MistralForCausalLM": "MoGUMistralForCausalLM",
    "Qwen2ForCausalLM": "MoGUQwen2ForCausalLM",
}
# The projection the vLLM classes wrap (a RowParallelLinear in all three families).
TARGET = "self_attn.o_proj"
# MoGU parameter names under each target module, in the own format.
TENSOR_NAMES = ("lora_A", "lora_B", "router_weight", "router_bias")


class VLLMExportError(ValueError):
    """Inputs that cannot make a servable MoGU folder (named before anything is written)."""


def make_section(config: MoGUConfig, modules, weights: str) -> Dict[str, Any]:
    return {"format": SECTION_FORMAT, "version": SECTION_VERSION, "config": config.to_dict(),
            "modules": list(modules), "weights": weights, "protocol": "always"}


def read_section(hf_config) -> Dict[str, Any]:
    """The validated ``"mogu"`` section of a served model's config (a transformers config
    or a dict): {"config": MoGUConfig, "modules": [names], ...}. ValueError when missing or
    malformed (the folder was not written by ``mogu export-vllm``)."""
    section = hf_config.get(SECTION_KEY) if isinstance(hf_config, dict) else getattr(hf_config, SECTION_KEY, None)
    if not isinstance(section, dict):
        raise ValueError(f"mogu (vLLM): the model's config.json has no {SECTION_KEY!r} section; write the folder "
                         f"with `mogu export-vllm --model BASE --mogu MOGU_DIR --out DIR`")
    if section.get("format") != SECTION_FORMAT or section.get("version") != SECTION_VERSION:
        raise ValueError(f"mogu (vLLM): config.json's {SECTION_KEY!r} section is format {section.get('format')!r} "
                         f"version {section.get('version')!r}, expected {SECTION_FORMAT!r} version {SECTION_VERSION}")
    try:
        config = MoGUConfig.from_dict(section.get("config") or {})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"mogu (vLLM): config.json's {SECTION_KEY!r} section: {exc}") from exc
    modules = section.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"mogu (vLLM): config.json's {SECTION_KEY!r} section: 'modules' must be a non-empty "
                         f"list of module names")
    bad = [m for m in modules if not (m == TARGET or m.endswith("." + TARGET))]
    if bad:
        raise ValueError(f"mogu (vLLM): the vLLM plugin wraps {TARGET} only; config.json names {bad[:3]}")
    return dict(section, config=config, modules=list(modules), num_experts=len(EXPERTS))
