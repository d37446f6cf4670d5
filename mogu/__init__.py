"""mogu: MoGU for Hugging Face models on top of the fused ``mogu_kernels`` op.

    import mogu
    mogu.patch_model(model)                      # wrap each layer's attention output projection
    mogu.load_official(model, glad=..., unwill=..., router=...)   # the published release
    with mogu.mode(model, "base"): ...           # or "mogu" (default), "glad", "unwill"
    with mogu.capture_gates(model) as gates: ... # module name -> (..., 2) [unwill, glad]
    ids = mogu.prompt_ids(tok, "instruction")    # chat prompt -> token ids (format_prompt + encode_prompt)
    mogu.generate(model, input_ids, max_new_tokens=64)   # published protocol, cached (= model.generate)
    mogu.train_expert(...), mogu.train_router(...)        # the two training stages (mogu.training)
    mogu.build_data(model, tok, benign=..., malicious=..., out=...)   # training data (mogu.evaluation.data_building)
    mogu.evaluate(model, tok, ["prompts.json"], out=...)  # refusals, ASR, gates (mogu.evaluation.evaluator)
    mogu.calibrate(model, tok, ["val.jsonl"], out=..., mogu_dir=...)   # the usability/safety dial
    mogu.probe_layers(model, tok, train, heldout)          # MoGU v2 layer selection (mogu.evaluation.probing)
    mogu.init_routers_from_probe(model, tok, train_rows)   # router heads started at a per-layer probe
"""
# The core (config, layer, patching, checkpoint, prompting), then the layers above it
# (docs/design.md section 7): generation, then training and evaluation.
from .checkpoint import CheckpointError, export_peft, from_pretrained, load, load_official, save_pretrained
from .config import EXPERTS, FAMILY_TARGETS, MoGUConfig
from .layer import MODES, MoGULinear, RouterHead
from .patching import (capture_gates, fold_routers, get_mode, is_patched, mode, patch_model,
                       patched_modules, router_offset, set_mode, set_router_offset, unpatch)
from .prompting import encode_prompt, format_chat, format_prompt, prompt_ids
from .generation import PROTOCOLS, generate, install_generate, load_for_inference, uninstall_generate
from .training import train_expert, train_router
from .evaluation import (apply_template, build_data, calibrate, evaluate, load_templates, probe_layers,
                         select_layers)
from .evaluation.probing import init_routers_from_probe

__all__ = [
    "MoGUConfig", "MoGULinear", "RouterHead", "EXPERTS", "FAMILY_TARGETS", "MODES",
    "patch_model", "unpatch", "is_patched", "patched_modules", "set_mode", "get_mode", "mode",
    "capture_gates", "fold_routers", "set_router_offset", "router_offset",
    "load", "load_official", "save_pretrained", "from_pretrained", "export_peft", "CheckpointError",
    "generate", "PROTOCOLS", "install_generate", "uninstall_generate", "load_for_inference",
    "format_prompt", "format_chat", "prompt_ids", "encode_prompt",
    "train_expert", "train_router", "build_data", "evaluate", "calibrate", "probe_layers", "select_layers",
    "init_routers_from_probe",
    "load_templates", "apply_template",
]
