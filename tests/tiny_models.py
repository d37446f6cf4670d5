"""Test helpers: tiny random Hugging Face models and published-format MoGU files.

Everything here is independent of mogu's own loaders: the files are written the way the
published MoGU code writes them, and ``published_reference_hooks`` states the published
layer math on an *unpatched* copy of the model, in float64.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from safetensors.torch import save_file

from op_spec import rel_err  # noqa: F401  (the one rel_err, re-exported for the model-level tests)

VOCAB = 97


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 40, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=72, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_falcon(seed: int = 0, layers: int = 2, hidden: int = 40, bias: bool = True):
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       bias=bias, new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return FalconForCausalLM(cfg).eval()


def target_names(model) -> List[str]:
    suffix = "self_attention.dense" if model.config.model_type == "falcon" else "self_attn.o_proj"
    return [n for n, _ in model.named_modules() if n.endswith(suffix)]


def random_release(model, r: int = 4, hidden: int = 24, seed: int = 1, scale: float = 0.3) -> Dict:
    """Random non-zero published-style parameters for every target module of ``model``."""
    g = torch.Generator().manual_seed(seed)
    rel = {"r": r, "lora_alpha": 2.0 * r, "hidden": hidden, "layers": []}
    for name in target_names(model):
        N, K = model.get_submodule(name).weight.shape
        layer = {"name": name}
        for expert in ("glad", "unwill"):
            layer[expert] = {"A": torch.randn(r, K, generator=g) * scale, "B": torch.randn(N, r, generator=g) * scale}
        for head in ("alpha_", "beta_"):
            layer[head] = {
                "linear_0.weight": torch.randn(hidden, K, generator=g) * 0.2,
                "linear_1.weight": torch.randn(K, hidden, generator=g) * 0.2,
                "linear_1.bias": torch.randn(K, generator=g) * 0.2,
                "linear_2.weight": torch.randn(1, K, generator=g) * 0.5,
                "linear_2.bias": torch.randn(1, generator=g) * 0.5,
            }
        rel["layers"].append(layer)
    return rel


def write_published(rel: Dict, root: str, model_type: str = "llama", binary: bool = False) -> Dict[str, str]:
    """Write ``rel`` in the published layout; returns {"glad": dir, "unwill": dir, "router": file}."""
    paths = {}
    for expert in ("glad", "unwill"):
        folder = os.path.join(root, f"resp_{expert}", "100_lora")
        os.makedirs(folder, exist_ok=True)
        tensors = {}
        for layer in rel["layers"]:
            key = f"base_model.model.{layer['name']}"
            tensors[f"{key}.lora_A.weight"] = layer[expert]["A"].contiguous()
            tensors[f"{key}.lora_B.weight"] = layer[expert]["B"].contiguous()
        if binary:
            torch.save(tensors, os.path.join(folder, "adapter_model.bin"))
        else:
            save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        target = "dense" if model_type == "falcon" else "o_proj"
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rel["r"], "lora_alpha": rel["lora_alpha"], "lora_dropout": 0.05,
                       "target_modules": [target], "bias": "none", "task_type": "CAUSAL_LM"}, f)
        paths[expert] = folder
    prefix = "transformer.routers" if model_type == "falcon" else "model.routers"
    state = {}
    for i, layer in enumerate(rel["layers"]):
        for head in ("alpha_", "beta_"):
            for k, v in layer[head].items():
                state[f"{prefix}.{i}.{head}.{k}"] = v.clone()
    os.makedirs(os.path.join(root, "router_layer"), exist_ok=True)
    paths["router"] = os.path.join(root, "router_layer", "100_router.pth")
    torch.save(state, paths["router"])
    return paths


def published_reference_hooks(model, rel: Dict, gates_out: Dict = None):
    """Make an UNPATCHED model compute the published MoGU layer, in float64, via hooks.

    y = (a + b) * (W x + bias) + s * (a * B_u A_u x + b * B_g A_g x), with a, b the
    sigmoids of the unfolded router heads (alpha_ -> a, beta_ -> b). Returns the handles.
    """
    s = rel["lora_alpha"] / rel["r"]
    handles = []
    for layer in rel["layers"]:
        module = model.get_submodule(layer["name"])

        def hook(mod, inputs, output, layer=layer):
            x = inputs[0].double()
            def head(h):
                p = {k: v.double() for k, v in layer[h].items()}
                z = x @ p["linear_0.weight"].T
                z = z @ p["linear_1.weight"].T + p["linear_1.bias"]
                return torch.sigmoid(z @ p["linear_2.weight"].T + p["linear_2.bias"])
            a, b = head("alpha_"), head("beta_")
            if gates_out is not None:
                gates_out[layer["name"]] = torch.cat([a, b], -1)
            du = x @ layer["unwill"]["A"].double().T @ layer["unwill"]["B"].double().T
            dg = x @ layer["glad"]["A"].double().T @ layer["glad"]["B"].double().T
            return ((a + b) * output.double() + s * (a * du + b * dg)).to(output.dtype)

        handles.append(module.register_forward_hook(hook))
    return handles
