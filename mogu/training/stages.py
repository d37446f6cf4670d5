"""The two training stages, published recipe by default (docs/design.md section 1).

Stage 1, :func:`train_expert`: one LoRA expert on the target projection (peft), trained on
pairs with the ratio loss (:mod:`.losses`). Output: a peft adapter folder.

Stage 2, :func:`train_router`: patch the model, load both experts, freeze everything but
the router heads (and, with ``joint=True``, the experts) and train them on the CE + gate
loss (:mod:`.losses`). Output: the own format (``mogu.save_pretrained``) plus a folded
deployment copy in ``<out>/folded``.

Both run through :func:`.loop.run_stage` (optimizer steps, checkpoints, resume, crash safety).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn as nn

from .. import hf_compat
from ..checkpoint import (adapter_modules, from_pretrained, load_official, match_module, read_adapter_config,
                          read_safetensors, router_file_hidden, save_pretrained, targets_of_adapter,
                          write_checksums)
from ..checkpoint import load_experts as _load_experts
from ..config import EXPERTS, ROUTER_HEADS, MoGUConfig
from ..patching import all_targets, find_targets, is_patched, patch_model, patched_modules
from ..prompting import pad_id_of
from . import data as mdata
from .loop import (FOLDED_DIR, Stage, TrainResult, accumulation_steps, adapter_fingerprint, check_positive,
                   fingerprints, make_accelerator, prepare_output, run_stage, training_state)
from .losses import GATE_TOKENS, GateCollector, expert_loss, router_loss

# Published defaults (docs/design.md section 1), shared with the CLI's --help.
EXPERT_DEFAULTS = dict(r=8, lora_alpha=16.0, lora_dropout=0.05, lr=5e-5, pairs_per_step=8, epochs=10)
ROUTER_DEFAULTS = dict(lam=2.0, lr=5e-4, examples_per_step=16, epochs=10, router_hidden=512)
COMMON_DEFAULTS = dict(batch_size=1, max_length=1024, save_steps=100, seed=42, weight_decay=0.01)


# ============================================================ expert loading
def load_experts(model: nn.Module, glad, unwill, config: Optional[MoGUConfig] = None) -> nn.Module:
    """Load the two expert adapters (peft folders, as ``load_official``) but no router.

    Patches the model if needed (fresh router heads, from the current torch RNG); a
    patched model keeps its router heads. r and lora_alpha come from the adapters'
    ``adapter_config.json``. Same checks and all-or-nothing guarantee as ``load_official``.
    """
    return _load_experts(model, glad, unwill, _expert_config(model, glad, unwill, config))


def _expert_config(model: nn.Module, glad, unwill, base: Optional[MoGUConfig]) -> MoGUConfig:
    """The MoGU config with r, lora_alpha, lora_dropout of the two adapters (which must agree)."""
    base = base or getattr(model, "mogu_config", None) or MoGUConfig()
    cfg = {e: read_adapter_config(p, e) for e, p in (("glad", glad), ("unwill", unwill))}
    key = {e: (int(c["r"]), float(c["lora_alpha"])) for e, c in cfg.items()}
    if key["glad"] != key["unwill"]:
        raise ValueError(f"mogu: the experts differ in r/lora_alpha (glad {glad}: {key['glad']}, "
                         f"unwill {unwill}: {key['unwill']})")
    r, alpha = key["glad"]
    dropout = float(cfg["unwill"].get("lora_dropout", base.lora_dropout))
    config = MoGUConfig(**{**base.to_dict(), "r": r, "lora_alpha": alpha, "lora_dropout": dropout})
    lora_modules = adapter_modules(glad)                                   # read once, used twice
    config = targets_of_adapter(model, config, lora_modules)               # experts on another projection
    if config.layers is None and not is_patched(model):
        config = MoGUConfig(**{**config.to_dict(), "layers": _adapter_layers(model, config, lora_modules)})
    return config


def _adapter_layers(model: nn.Module, config: MoGUConfig, lora_modules: List[str]) -> Optional[List[int]]:
    """The target-module indices an adapter's LoRA module paths (``adapter_modules``) cover,
    or None when they cover them all (experts trained with ``layers=`` carry LoRA on those
    layers only)."""
    names = [n for n, _ in all_targets(model, config)]
    index = {n: i for i, n in enumerate(names)}
    modules = OrderedDict((n, None) for n in names)
    covered = set()
    for module in lora_modules:
        target = match_module(module, modules)
        if target is not None:
            covered.add(index[target])
    return None if not covered or len(covered) == len(names) else sorted(covered)


# ================================================================= stage 1
def train_expert(model: nn.Module, tokenizer, expert: str, affirm, reject, out, *,
                 r: int = EXPERT_DEFAULTS["r"], lora_alpha: float = EXPERT_DEFAULTS["lora_alpha"],
                 lora_dropout: float = EXPERT_DEFAULTS["lora_dropout"], target_modules: Optional[List[str]] = None,
                 layers: Optional[List[int]] = None, lr: float = EXPERT_DEFAULTS["lr"],
                 pairs_per_step: int = EXPERT_DEFAULTS["pairs_per_step"],
                 batch_size: int = COMMON_DEFAULTS["batch_size"], epochs: int = EXPERT_DEFAULTS["epochs"],
                 max_steps: Optional[int] = None, max_length: int = COMMON_DEFAULTS["max_length"],
                 system: Optional[str] = None, save_steps: Optional[int] = COMMON_DEFAULTS["save_steps"],
                 save_total_limit: Optional[int] = None, seed: int = COMMON_DEFAULTS["seed"], shuffle: bool = True,
                 weight_decay: float = COMMON_DEFAULTS["weight_decay"], max_grad_norm: Optional[float] = None,
                 bf16: bool = False, gradient_checkpointing: bool = False, overwrite: bool = False,
                 resume: bool = False, progress: bool = True) -> TrainResult:
    """Stage 1: train one LoRA expert with the published ratio loss; write a peft adapter.

    model: a plain (not MoGU-patched, not peft) causal LM; peft injects LoRA into it for
        the run and removes it afterwards (``unload``: the model's own weights are never
        modified; with ``bf16=True`` it is cast to bfloat16 in place, LoRA kept in fp32).
    tokenizer: its tokenizer (chat template, or the Llama-2 [INST] template without one).
    expert: "glad" (loss CE(affirm) / CE(reject): learns to comply; published data
        ``unsafety_{affirm,reject}.json``) or "unwill" (CE(reject) / CE(affirm): learns to
        refuse; ``safety_{affirm,reject}.json``).
    affirm, reject: aligned JSON/JSONL files of {"instruction", "output"}: compliant and
        refusing answers to the same instructions (see ``mogu.training.data``).
    out: output folder; ends up a peft adapter folder (``PeftModel.from_pretrained`` and
        ``mogu.load_official(glad=..., unwill=...)`` read it) plus log and checkpoints.
    r, lora_alpha, lora_dropout, target_modules: the LoRA (default target: the family's
        attention output projection, ``mogu.FAMILY_TARGETS``).
    layers: only these target-module indices get LoRA (``MoGUConfig.layers``; resolve
        ``"auto:K"`` first with ``mogu.select_layers``); None = every target module.
    lr, pairs_per_step, batch_size, epochs, weight_decay, max_grad_norm: AdamW at lr, one
        step per pairs_per_step pairs (a multiple of batch_size, the pairs per forward).
    max_steps: stop after this many optimizer steps in total (None: all epochs).
    max_length: token limit per sequence (prompt + answer), cut at the end.
    system: optional system prompt for the template. save_steps: checkpoint every N
        optimizer steps (None: only at the end); save_total_limit: keep the newest N.
    seed, shuffle: data order and initialisation; deterministic on CPU.
    overwrite: replace the training outputs in a non-empty ``out``; resume: continue from
        its newest checkpoint (same arguments required, except epochs/max_steps/saving).

    Raises DataError (before anything is written) for bad data, FileExistsError for an
    existing output without overwrite/resume, ValueError for bad arguments.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    if expert not in EXPERTS:
        raise ValueError(f"train_expert: expert must be one of {list(EXPERTS)}, got {expert!r}")
    if hf_compat.has_peft_adapter(model):
        raise ValueError("train_expert: the model already carries a peft adapter; pass the plain base model")
    if is_patched(model):
        raise ValueError("train_expert: the model is MoGU-patched; experts are trained on the plain base model "
                         "(mogu.unpatch(model) first)")
    accumulation_steps(pairs_per_step, batch_size, "pairs_per_step")
    check_positive("epochs", epochs)
    check_positive("max_steps", max_steps, allow_none=True)
    check_positive("max_length", max_length)
    check_positive("save_steps", save_steps, allow_none=True)
    MoGUConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)          # validates r, dropout
    targets = MoGUConfig(target_modules=target_modules).resolve_targets(getattr(model.config, "model_type", None))
    if layers is not None:       # peft takes exact module names: only the chosen layers
        targets = [n for n, _ in find_targets(model, MoGUConfig(target_modules=target_modules, layers=layers))]

    pairs = mdata.load_pairs(affirm, reject)                                   # DataError: nothing written yet
    features = mdata.tokenize_pairs(tokenizer, pairs, max_length, system)
    out = os.fspath(out)
    args = dict(stage="expert", expert=expert, data=fingerprints(affirm=affirm, reject=reject),
                affirm=os.fspath(affirm),
                reject=os.fspath(reject), r=int(r), lora_alpha=float(lora_alpha), lora_dropout=float(lora_dropout),
                target_modules=targets, layers=layers, lr=lr, per_step=pairs_per_step, batch_size=batch_size,
                epochs=epochs,
                max_steps=max_steps, max_length=max_length, system=system, save_steps=save_steps, seed=seed,
                shuffle=shuffle, weight_decay=weight_decay, max_grad_norm=max_grad_norm, bf16=bool(bf16),
                gradient_checkpointing=bool(gradient_checkpointing), examples=len(features))
    accelerator = make_accelerator()
    checkpoint = prepare_output(accelerator, out, overwrite, resume, args)

    from accelerate.utils import set_seed
    set_seed(seed)
    if bf16:
        model.to(torch.bfloat16)
    with training_state(model, gradient_checkpointing):
        lora = LoraConfig(r=int(r), lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
        peft_model = hf_compat.make_peft_model(model, lora)
        try:
            def load_weights(m, folder):
                state = read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
                result = set_peft_model_state_dict(m, state)
                if getattr(result, "unexpected_keys", None):
                    raise ValueError(f"resume: {folder}: unexpected adapter keys {result.unexpected_keys[:3]}")

            def save_final(m, d):
                m.save_pretrained(d)
                write_checksums(d, ["adapter_model.safetensors", "adapter_config.json"])

            stage = Stage(
                name="expert", model=peft_model,
                params=[p for p in peft_model.parameters() if p.requires_grad], features=features,
                collate=mdata.PairCollator(pad_id_of(tokenizer)),
                loss=lambda m, b: expert_loss(m, b, expert), stat_names=("ce_affirm", "ce_reject"),
                rows_per_example=2,
                save_weights=lambda m, d: m.save_pretrained(d),
                load_weights=load_weights,
                save_final=save_final)
            return run_stage(stage, args, out, accelerator=accelerator, checkpoint=checkpoint,
                             per_step=pairs_per_step, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                             lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                             shuffle=shuffle, save_steps=save_steps, save_total_limit=save_total_limit,
                             progress=progress)
        finally:
            hf_compat.unload_peft(peft_model, model)   # LoRA layers out; the base modules back in place


# ================================================================= stage 2
def train_router(model: nn.Module, tokenizer, glad, unwill, data, out, labels=None, *, router=None,
                 router_hidden: Optional[int] = None, target_modules: Optional[List[str]] = None,
                 layers: Optional[List[int]] = None, joint: bool = False, expert_lr: Optional[float] = None,
                 lam: float = ROUTER_DEFAULTS["lam"], gate_tokens: str = "all", lr: float = ROUTER_DEFAULTS["lr"],
                 examples_per_step: int = ROUTER_DEFAULTS["examples_per_step"],
                 batch_size: int = COMMON_DEFAULTS["batch_size"], epochs: int = ROUTER_DEFAULTS["epochs"],
                 max_steps: Optional[int] = None, max_length: int = COMMON_DEFAULTS["max_length"],
                 system: Optional[str] = None, expert_dropout: float = 0.0,
                 save_steps: Optional[int] = COMMON_DEFAULTS["save_steps"], save_total_limit: Optional[int] = None,
                 seed: int = COMMON_DEFAULTS["seed"], shuffle: bool = True,
                 weight_decay: float = COMMON_DEFAULTS["weight_decay"], max_grad_norm: Optional[float] = None,
                 bf16: bool = False, gradient_checkpointing: bool = False, overwrite: bool = False,
                 resume: bool = False, progress: bool = True) -> TrainResult:
    """Stage 2: train the router heads of a MoGU model; everything else stays frozen.

    model: the base causal LM, patched here if it is not yet (fresh router heads drawn
        after seeding with ``seed``); an already patched model keeps its router heads as
        the starting point. It stays patched, with the trained routers, afterwards.
    glad, unwill: the two experts, peft adapter folders (as written by ``train_expert``).
    data, labels: JSON/JSONL rows {"instruction", "output"} and a JSON list of 0/1 aligned
        with them (1 malicious -> targets a=1, b=0; 0 benign -> a=0, b=1); labels=None
        reads a 0/1 ``"label"`` field from each row.
    out: output folder: own format (``mogu.from_pretrained``/``mogu.load``) plus
        ``folded/`` (deployment copy), log and checkpoints.
    router: optional published router file (``<step>_router.pth``) to start from.
    router_hidden: width of fresh router heads (default 512, the published width).
    layers: the target-module indices that carry MoGU (``MoGUConfig.layers``; the experts
        must have been trained on the same layers); None = the model's config, else all.
    joint: MoGU v2's joint adaptation: the two experts train together with the routers
        in this stage (on the same CE + gate loss), at ``expert_lr`` (default ``lr``).
    lam: weight of the gate loss; gate_tokens: the tokens it covers, "all" (published
        recipe) or "prompt" (see :func:`router_loss`). lr, examples_per_step (accumulation), batch_size,
        epochs, weight_decay, max_grad_norm: AdamW over the router heads only.
    expert_dropout: LoRA dropout on the frozen experts during this stage. 0 (default)
        runs every layer through the fused ``mogu_linear`` op (and its router backward);
        > 0 takes the layer's unfused dropout path.
    Other arguments as in :func:`train_expert`. With ``bf16=True`` the model is cast to
    bfloat16 in place, the MoGU parameters (experts, routers) kept in fp32.

    Raises DataError (before anything is written) for bad data, FileExistsError for an
    existing output without overwrite/resume, ValueError for bad arguments.
    """
    accumulation_steps(examples_per_step, batch_size, "examples_per_step")
    check_positive("epochs", epochs)
    check_positive("max_steps", max_steps, allow_none=True)
    check_positive("max_length", max_length)
    check_positive("save_steps", save_steps, allow_none=True)
    if not 0.0 <= float(expert_dropout) < 1.0:
        raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if gate_tokens not in GATE_TOKENS:
        raise ValueError(f"gate_tokens must be one of {GATE_TOKENS}, got {gate_tokens!r}")
    if is_patched(model) and any(layer.is_folded for layer in patched_modules(model).values()):
        raise ValueError("train_router: the model's routers are folded (deployment state) and cannot be trained; "
                         "load unfolded router heads or pass an unpatched model")

    examples = mdata.load_labelled(data, labels)                            # DataError: nothing written yet
    features = mdata.tokenize_labelled(tokenizer, examples, max_length, system)
    if expert_lr is not None and not joint:
        raise ValueError("train_router: expert_lr is only used with joint=True")
    check_positive("expert_lr", expert_lr, allow_none=True)
    base = None
    if target_modules or layers is not None:
        base = MoGUConfig(target_modules=target_modules, layers=layers)
    config = _expert_config(model, glad, unwill, base)
    if config.auto_layers is not None:
        raise ValueError(f"train_router: layers={config.layers!r} must be resolved first (mogu.select_layers)")
    hidden = router_file_hidden(router) if router is not None else None
    if is_patched(model):
        current = next(iter(patched_modules(model).values())).router_hidden
        if router_hidden is not None and router_hidden != current and router is None:
            raise ValueError(f"train_router: the model is patched with router_hidden={current}, got {router_hidden}")
        hidden = hidden or current
    hidden = hidden or router_hidden or ROUTER_DEFAULTS["router_hidden"]
    config = MoGUConfig(**{**config.to_dict(), "router_hidden": int(hidden)})

    out = os.fspath(out)
    args = dict(stage="router", data=fingerprints(data=data, labels=labels), data_file=os.fspath(data),
                labels_file=None if labels is None else os.fspath(labels), glad=adapter_fingerprint(glad),
                unwill=adapter_fingerprint(unwill),
                router=None if router is None else mdata.file_fingerprint(router), router_hidden=int(hidden),
                target_modules=config.target_modules, layers=config.layers, joint=bool(joint),
                expert_lr=expert_lr if joint else None, lam=lam, gate_tokens=gate_tokens, lr=lr,
                per_step=examples_per_step,
                batch_size=batch_size, epochs=epochs, max_steps=max_steps, max_length=max_length, system=system,
                expert_dropout=float(expert_dropout), save_steps=save_steps, seed=seed, shuffle=shuffle,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm, bf16=bool(bf16),
                gradient_checkpointing=bool(gradient_checkpointing), examples=len(features))
    accelerator = make_accelerator()
    checkpoint = prepare_output(accelerator, out, overwrite, resume, args)

    from accelerate.utils import set_seed
    set_seed(seed)
    newly_patched = not is_patched(model)
    if newly_patched:
        patch_model(model, config)
    layers = patched_modules(model)
    if bf16 or any(layer.weight.dtype != torch.float32 for layer in layers.values()):
        _mogu_params_fp32(layers)          # before loading: expert/router values land in fp32, unrounded
    if router is not None:
        load_official(model, glad=glad, unwill=unwill, router=router, config=config)
    else:
        load_experts(model, glad, unwill, config=config)
    layers = patched_modules(model)
    if bf16:
        _mogu_params_fp32(layers)          # again: a reset inside the loader recreates them in the model dtype
        _cast_base(model, layers, torch.bfloat16)

    heads = [p for layer in layers.values() for h in ROUTER_HEADS for p in getattr(layer, h).parameters()]
    experts = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)] if joint else []
    groups = None
    if joint:
        groups = [{"params": heads}, {"params": experts, "lr": expert_lr if expert_lr is not None else lr}]
    previous = {n: (layer.mode, layer.lora_dropout) for n, layer in layers.items()}
    collector = GateCollector(model)
    with training_state(model, gradient_checkpointing):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in heads + experts:
                p.requires_grad_(True)
            for layer in layers.values():
                layer.mode = "mogu"
                layer.lora_dropout = nn.Dropout(expert_dropout) if expert_dropout > 0 else nn.Identity()
            collector.install()

            def save_final(m, d):
                save_pretrained(m, d)
                save_pretrained(m, os.path.join(d, FOLDED_DIR), folded=True)

            stage = Stage(
                name="router", model=model, params=heads + experts, param_groups=groups, features=features,
                collate=mdata.LabelledCollator(pad_id_of(tokenizer)),
                loss=lambda m, b: router_loss(m, b, collector, lam, gate_tokens),
                stat_names=("ce", "gate_mse", "alpha", "beta"), class_stats=("alpha", "beta"),
                save_weights=lambda m, d: save_pretrained(m, d),
                load_weights=lambda m, d: from_pretrained(m, d),
                save_final=save_final)
            return run_stage(stage, args, out, accelerator=accelerator, checkpoint=checkpoint,
                             per_step=examples_per_step, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                             lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                             shuffle=shuffle, save_steps=save_steps, save_total_limit=save_total_limit,
                             progress=progress)
        finally:
            collector.remove()
            for n, layer in layers.items():
                layer.mode, layer.lora_dropout = previous[n]


def _mogu_params_fp32(layers) -> None:
    """Hold every MoGU parameter (experts, router heads) in fp32, in place (same Parameters)."""
    for layer in layers.values():
        for name, p in layer.named_parameters():
            if name not in ("weight", "bias") and p.dtype != torch.float32:
                p.data = p.data.float()


def _cast_base(model: nn.Module, layers, dtype: torch.dtype) -> None:
    """Cast the model to ``dtype`` in place except the MoGU parameters (kept fp32)."""
    keep = {id(p): p.data for layer in layers.values() for n, p in layer.named_parameters()
            if n not in ("weight", "bias")}
    model.to(dtype)
    for layer in layers.values():
        for n, p in layer.named_parameters():
            if id(p) in keep:
                p.data = keep[id(p)]
