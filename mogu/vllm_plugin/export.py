"""``export_vllm``: write a folder that ``vllm serve DIR`` / ``vllm.LLM(DIR)`` load with MoGU.

Needs transformers and mogu only (no vLLM). The folder holds:

* the base model's ``config.json`` (``architectures`` naming the MoGU class, e.g.
  ``MoGULlamaForCausalLM``, and the ``"mogu"`` section of mogu/vllm_plugin/common.py),
  its weights (``model.safetensors``), generation config and tokenizer files;
* the MoGU parameters in the project's own folded format (``mogu_config.json``,
  ``mogu_model.safetensors``), so ``mogu.load_for_inference(DIR, DIR)`` loads the same
  model with Hugging Face.

Everything is checked (paths, architecture, the MoGU folder against the model: sizes,
layer count, checksums) before anything is written; the folder is written under a
temporary name beside ``out`` and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from .common import ARCHITECTURES, SECTION_KEY, TARGET, VLLMExportError, make_section


def _check_out(out: str, model: str, mogu: str, overwrite: bool) -> None:
    real = os.path.realpath(out)
    for what, path in (("--model", model), ("--mogu", mogu)):
        other = os.path.realpath(path)
        if real == other or real.startswith(other.rstrip(os.sep) + os.sep) or other.startswith(real + os.sep):
            raise VLLMExportError(f"mogu export-vllm: the output folder {out} overlaps the {what} path {path}")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise VLLMExportError(f"mogu export-vllm: {out} exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise VLLMExportError(f"mogu export-vllm: the output folder {out} exists and is not empty "
                                  f"(choose a new folder, or pass overwrite=True / --overwrite)")


def export_vllm(model, mogu, out, *, gguf_file: Optional[str] = None, dtype=None, overwrite: bool = False) -> str:
    """Write a vLLM-servable MoGU folder to ``out``; returns its path.

    model: the base model (a local Hugging Face folder, a GGUF folder/file; see
        ``mogu.load_for_inference``). mogu: a MoGU folder in this project's format or a
        published release root (``mogu.load``); routers are folded on export.
    dtype: the dtype the weights are written in (None / "auto": the checkpoint's own;
        "float32", "bfloat16", "float16"). A GGUF model is dequantized.
    overwrite: replace a non-empty ``out``.

    Raises VLLMExportError (a ValueError) for an unsupported architecture, MoGU targets
    other than ``self_attn.o_proj``, or an output folder that overlaps the inputs or is
    not empty; FileNotFoundError for a missing path; ``mogu.checkpoint.CheckpointError``
    for a MoGU folder that does not fit the model (another size, layer count, corrupted
    files). Nothing is written when any of these is raised.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import load as load_mogu
    from ..checkpoint import save_pretrained
    from ..generation import check_hub_model, resolve_model_path
    from ..patching import patched_modules, unpatch

    model, mogu, out = os.fspath(model), os.fspath(mogu), os.path.normpath(os.fspath(out))
    if not os.path.exists(mogu):
        raise FileNotFoundError(f"mogu export-vllm: MoGU folder not found: {os.path.normpath(mogu)}")
    model_path, gguf = resolve_model_path(model, gguf_file)
    check_hub_model(model_path, gguf)
    _check_out(out, model_path if os.path.exists(model_path) else model, mogu, overwrite)

    dtypes = {None: "auto", "auto": "auto", "float32": torch.float32, "fp32": torch.float32,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise VLLMExportError(f"mogu export-vllm: dtype must be one of auto, float32, bfloat16, float16, "
                              f"got {dtype!r}")
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(model_path, **extra)
    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, **extra).eval()
    archs = list(getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])
    base_arch = next((a for a in archs if a in ARCHITECTURES), None)
    if base_arch is None:
        raise VLLMExportError(f"mogu export-vllm: the vLLM plugin serves {sorted(ARCHITECTURES)}; {model} is "
                              f"{archs}")
    load_mogu(hf_model, mogu)             # validates the MoGU folder against this model (CheckpointError)
    layers = patched_modules(hf_model)
    bad = [n for n in layers if not n.endswith("." + TARGET)]
    if bad:
        raise VLLMExportError(f"mogu export-vllm: the vLLM plugin wraps {TARGET} only; {mogu} patches {bad[:3]}")
    config = hf_model.mogu_config

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)             # mkdtemp's 0700 would outlive the rename
    try:
        save_pretrained(hf_model, tmp, folded=True)
        unpatch(hf_model)
        if getattr(hf_model, "hf_quantizer", None) is not None:   # GGUF: the weights are dequantized now
            hf_model.hf_quantizer = None
        if getattr(hf_model.config, "quantization_config", None) is not None:
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # save_pretrained writes the class name into "architectures": name the MoGU class afterwards.
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
        hf_config["architectures"] = [ARCHITECTURES[base_arch]]
        hf_config[SECTION_KEY] = make_section(config, layers, "mogu_model.safetensors")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
