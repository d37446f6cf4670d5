"""Reading and writing MoGU parameters.

Three formats:

* the published release (``load_official``): two peft LoRA adapter folders (glad and
  unwill) and one ``torch.save`` router state dict with keys
  ``<prefix>routers.{i}.{alpha_,beta_}.linear_{0,1,2}.{weight,bias}``;
* this project's own format (``save_pretrained``/``from_pretrained``): ``mogu_config.json``
  plus ``mogu_model.safetensors`` with keys ``<module name>.<parameter>``, router heads
  either unfolded or folded (deployment: a few MB);
* a plain peft adapter for one expert (``export_peft``).

Every loader reads and validates everything before it touches the model, so an error
(missing file, unknown/missing key, wrong shape, layer-count mismatch) leaves the model
exactly as it was. Checkpoints are untrusted: ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import EXPERTS, ROUTER_HEADS, MoGUConfig
from .patching import find_targets, is_patched, patch_model, patched_modules, unpatch

OWN_CONFIG = "mogu_config.json"
OWN_WEIGHTS = "mogu_model.safetensors"
FORMAT_NAME = "mogu-kernels"
FORMAT_VERSION = 1

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_ROUTER_KEY = re.compile(r"^(?:.*\.)?routers\.(?P<i>\d+)\.(?P<head>alpha_|beta_)\.(?P<lin>linear_[012])\."
                         r"(?P<kind>weight|bias)$")


# ------------------------------------------------------------------ helpers
def _require_path(path, what: str) -> str:
    if path is None:
        raise ValueError(f"mogu: {what} path is required")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"mogu: {what} not found: {path}")
    return path


def _torch_load(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"mogu: cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"mogu: {path} is not a state dict of tensors")
    return obj


def _module_index(model: nn.Module, config: MoGUConfig) -> "OrderedDict[str, nn.Module]":
    """Name -> module that carries (or would carry) MoGU, in layer order."""
    if is_patched(model):
        return OrderedDict(patched_modules(model))
    return OrderedDict(find_targets(model, config))


def _out_in(module: nn.Module) -> Tuple[int, int]:
    return tuple(module.weight.shape)


def _check_shape(key: str, tensor: torch.Tensor, expected: Tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"mogu: {source}: key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")


def _match_module(name: str, modules: "OrderedDict[str, nn.Module]") -> Optional[str]:
    """Map a module path from a file onto the model: exact, or by dropping leading parts
    (a file written for XForCausalLM loaded into the bare XModel, or vice versa)."""
    if name in modules:
        return name
    for candidate in modules:
        if candidate.endswith("." + name) or name.endswith("." + candidate):
            return candidate
    return None


# --------------------------------------------------------- published release
def _read_adapter(folder: str, expert: str) -> Tuple[dict, Dict[str, torch.Tensor], str]:
    folder = _require_path(folder, f"{expert} adapter folder")
    if not os.path.isdir(folder):
        raise ValueError(f"mogu: {expert} adapter must be a peft adapter folder, got file {folder}")
    config_path = _require_path(os.path.join(folder, "adapter_config.json"), f"{expert} adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        try:
            adapter_config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"mogu: {config_path} is not valid JSON: {exc}") from exc
    for key in ("r", "lora_alpha"):
        if key not in adapter_config:
            raise ValueError(f"mogu: {config_path} lacks {key!r}")
    st, binary = os.path.join(folder, "adapter_model.safetensors"), os.path.join(folder, "adapter_model.bin")
    if os.path.exists(st):
        return adapter_config, load_file(st), st
    if os.path.exists(binary):
        return adapter_config, _torch_load(binary), binary
    raise FileNotFoundError(f"mogu: {expert} adapter weights not found: {st} (or {binary})")


def _parse_adapter(tensors, source: str, modules, r: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """peft keys -> {model module name: {"A": (r, K), "B": (N, r)}}, all validated."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        target = _match_module(m.group("module"), modules) if m else None
        if target is None:
            raise ValueError(f"mogu: {source}: unknown key {key!r} (not a LoRA weight of a MoGU target module; "
                             f"targets look like {next(iter(modules))!r})")
        N, K = _out_in(modules[target])
        _check_shape(key, t, (r, K) if m.group("ab") == "A" else (N, r), source)
        slot = out.setdefault(target, {})
        if m.group("ab") in slot:
            raise ValueError(f"mogu: {source}: key {key!r} duplicates lora_{m.group('ab')} of {target!r}")
        slot[m.group("ab")] = t
    for name in modules:
        for ab in "AB":
            if ab not in out.get(name, {}):
                raise ValueError(f"mogu: {source}: missing key 'base_model.model.{name}.lora_{ab}.weight' "
                                 f"(the model has {len(modules)} target modules)")
    return out


def _parse_router(tensors, source: str, modules) -> Tuple[int, Dict[str, Dict[str, torch.Tensor]]]:
    """Router keys -> (hidden width, {module name: {"alpha_.linear_0.weight": ..., ...}})."""
    names = list(modules)
    hidden = None
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _ROUTER_KEY.match(key)
        if m is None:
            raise ValueError(f"mogu: {source}: unknown key {key!r} (expected '<prefix>routers.<i>.alpha_|beta_."
                             f"linear_0|1|2.weight|bias')")
        i = int(m.group("i"))
        if i >= len(names):
            raise ValueError(f"mogu: {source}: key {key!r} is for layer {i} but the model has only "
                             f"{len(names)} MoGU target modules (layer count mismatch)")
        if m.group("lin") == "linear_0" and m.group("kind") == "weight":
            hidden = t.shape[0] if hidden is None else hidden
        out.setdefault(names[i], {})[f"{m.group('head')}.{m.group('lin')}.{m.group('kind')}"] = t
    if hidden is None:
        raise ValueError(f"mogu: {source}: no router weights found")
    prefix = next(iter(tensors)).rsplit("routers.", 1)[0]
    for i, name in enumerate(names):
        N, K = _out_in(modules[name])
        got = out.get(name, {})
        for suffix, shape in _head_param_shapes(hidden, K).items():
            key = f"{prefix}routers.{i}.{suffix}"
            if suffix not in got:
                raise ValueError(f"mogu: {source}: missing key {key!r}")
            _check_shape(key, got[suffix], shape, source)
    return hidden, out


def _head_param_shapes(hidden: int, d: int) -> Dict[str, Tuple[int, ...]]:
    shapes = {}
    for head in ROUTER_HEADS:
        shapes.update({f"{head}.linear_0.weight": (hidden, d), f"{head}.linear_1.weight": (d, hidden),
                       f"{head}.linear_1.bias": (d,), f"{head}.linear_2.weight": (1, d),
                       f"{head}.linear_2.bias": (1,)})
    return shapes


def _apply(model: nn.Module, config: MoGUConfig, experts, routers, folded=None) -> nn.Module:
    """Patch if needed and copy validated tensors in. Undoes its own patching on failure.

    experts: {module name: (lora_A (2, r, K), lora_B (2, N, r))}
    routers: {module name: {"alpha_.linear_0.weight": ..., ...}} (unfolded) or None
    folded:  {module name: (router_weight (2, K), router_bias (2,))} or None
    """
    newly_patched = not is_patched(model)
    try:
        if newly_patched:
            patch_model(model, config)
        layers = patched_modules(model)
        for name, layer in layers.items():
            lora_A, lora_B = experts[name]
            if layer.r != config.r or layer.lora_alpha != float(config.lora_alpha):
                layer.reset_experts(config.r, config.lora_alpha)
            with torch.no_grad():
                layer.lora_A.copy_(lora_A)
                layer.lora_B.copy_(lora_B)
            if routers is not None:
                if layer.is_folded or layer.router_hidden != config.router_hidden:
                    layer.reset_routers(config.router_hidden)
                heads = nn.ModuleDict({"alpha_": layer.alpha_, "beta_": layer.beta_})
                heads.load_state_dict(routers[name], strict=True)
            if folded is not None:
                layer.set_folded_router(*folded[name])
            layer.router_offset = config.router_offset
        model.mogu_config = config
    except BaseException:
        if newly_patched:
            unpatch(model)
        raise
    return model


def load_official(model: nn.Module, glad, unwill, router, config: Optional[MoGUConfig] = None) -> nn.Module:
    """Load the published MoGU release into ``model`` (patching it if needed); returns it.

    glad, unwill: peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``
        or ``adapter_model.bin``) with keys ``base_model.model.<module>.lora_{A,B}.weight``.
    router: the ``torch.save`` router state dict (``<prefix>routers.{i}.{alpha_,beta_}...``,
        alpha_ gating unwill, beta_ gating glad; layer i = the i-th target module).
    config: MoGU settings other than the experts' (target modules, mogu_tokens); r and
        lora_alpha come from adapter_config.json, the router width from the router file.

    Raises FileNotFoundError naming a missing path, ValueError naming the key for an
    unknown/missing key, a wrong shape or a layer-count mismatch. On any error the model
    is left exactly as it was.
    """
    base_config = config or getattr(model, "mogu_config", None) or MoGUConfig()
    paths = {"glad": glad, "unwill": unwill}
    adapters = {e: _read_adapter(paths[e], e) for e in EXPERTS}
    router_path = _require_path(router, "router state dict")
    (cfg_u, _, src_u), (cfg_g, _, src_g) = adapters["unwill"], adapters["glad"]
    if (int(cfg_u["r"]), float(cfg_u["lora_alpha"])) != (int(cfg_g["r"]), float(cfg_g["lora_alpha"])):
        raise ValueError(f"mogu: the experts differ in r/lora_alpha ({src_u}: r={cfg_u['r']}, "
                         f"lora_alpha={cfg_u['lora_alpha']}; {src_g}: r={cfg_g['r']}, "
                         f"lora_alpha={cfg_g['lora_alpha']})")
    r, lora_alpha = int(cfg_u["r"]), float(cfg_u["lora_alpha"])
    modules = _module_index(model, base_config)
    parsed = {e: _parse_adapter(adapters[e][1], adapters[e][2], modules, r) for e in EXPERTS}
    hidden, routers = _parse_router(_torch_load(router_path), router_path, modules)
    config = MoGUConfig(**{**base_config.to_dict(), "r": r, "lora_alpha": lora_alpha,
                           "lora_dropout": float(cfg_u.get("lora_dropout", base_config.lora_dropout)),
                           "router_hidden": hidden})
    experts = {n: (torch.stack([parsed[e][n]["A"] for e in EXPERTS]), torch.stack([parsed[e][n]["B"] for e in EXPERTS]))
               for n in modules}
    return _apply(model, config, experts, routers)


# --------------------------------------------------------------- own format
def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half files."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write a UTF-8 text file atomically (temporary file in the same folder + rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(path, write)


def save_pretrained(model: nn.Module, directory, folded: bool = False) -> None:
    """Save the MoGU parameters of a patched model to ``directory``.

    Writes ``mogu_config.json`` and ``mogu_model.safetensors`` (keys ``<module>.lora_A``
    (2, r, K), ``<module>.lora_B`` (2, N, r), and either the unfolded heads
    ``<module>.{alpha_,beta_}.linear_{0,1,2}.{weight,bias}`` or, with ``folded=True``,
    ``<module>.router_weight`` (2, K) and ``<module>.router_bias`` (2,) in fp32: the
    deployment file, a few MB for a 7B model). The base model is not saved.
    """
    layers = patched_modules(model)
    if not layers:
        raise ValueError("mogu.save_pretrained: the model is not MoGU-patched")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach()
        if folded or layer.is_folded:
            with torch.no_grad():
                w, b = layer.router_vectors()
            tensors[f"{name}.router_weight"], tensors[f"{name}.router_bias"] = w.detach(), b.detach()
        else:
            for head in ROUTER_HEADS:
                for k, v in getattr(layer, head).state_dict().items():
                    tensors[f"{name}.{head}.{k}"] = v.detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    config = model.mogu_config
    is_folded = bool(folded or any(layer.is_folded for layer in layers.values()))
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "folded": is_folded,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "modules": list(layers), "config": config.to_dict()}
    _atomic_write(os.path.join(directory, OWN_WEIGHTS),
                  lambda p: save_file(tensors, p, metadata={"format": FORMAT_NAME}))
    atomic_write_text(os.path.join(directory, OWN_CONFIG), json.dumps(meta, indent=2) + "\n")


def from_pretrained(model: nn.Module, directory) -> nn.Module:
    """Load a folder written by ``save_pretrained`` (full or folded) into ``model``.

    Patches the model if needed (with the saved config); same errors and the same
    all-or-nothing guarantee as ``load_official``.
    """
    directory = _require_path(directory, "MoGU folder")
    config_path = _require_path(os.path.join(directory, OWN_CONFIG), "MoGU config")
    weights_path = _require_path(os.path.join(directory, OWN_WEIGHTS), "MoGU weights")
    with open(config_path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"mogu: {config_path} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"mogu: {config_path}: format {meta.get('format')!r} version {meta.get('version')!r} "
                         f"is not {FORMAT_NAME!r} version {FORMAT_VERSION}")
    config = MoGUConfig.from_dict(meta["config"])
    if is_patched(model):
        modules = OrderedDict(patched_modules(model))
    else:
        modules = OrderedDict(find_targets(model, config))
    saved_modules = meta.get("modules", [])
    mapping = {}
    for saved in saved_modules:
        target = _match_module(saved, modules)
        if target is None:
            raise ValueError(f"mogu: {config_path}: module {saved!r} does not exist among the model's MoGU "
                             f"targets (e.g. {next(iter(modules))!r})")
        mapping[saved] = target
    if len(saved_modules) != len(modules):
        raise ValueError(f"mogu: {config_path} has {len(saved_modules)} modules but the model has "
                         f"{len(modules)} MoGU target modules (layer count mismatch)")
    tensors = load_file(weights_path)
    folded = bool(meta.get("folded"))
    expected = {}
    r, E = config.r, len(EXPERTS)
    for saved, target in mapping.items():
        N, K = _out_in(modules[target])
        expected[f"{saved}.lora_A"] = (E, r, K)
        expected[f"{saved}.lora_B"] = (E, N, r)
        if folded:
            expected[f"{saved}.router_weight"] = (E, K)
            expected[f"{saved}.router_bias"] = (E,)
        else:
            expected.update({f"{saved}.{k}": s for k, s in _head_param_shapes(config.router_hidden, K).items()})
    for key in tensors:
        if key not in expected:
            raise ValueError(f"mogu: {weights_path}: unknown key {key!r}")
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"mogu: {weights_path}: missing key {key!r}")
        _check_shape(key, tensors[key], shape, weights_path)
    experts = {t: (tensors[f"{s}.lora_A"], tensors[f"{s}.lora_B"]) for s, t in mapping.items()}
    if folded:
        fold = {t: (tensors[f"{s}.router_weight"], tensors[f"{s}.router_bias"]) for s, t in mapping.items()}
        return _apply(model, config, experts, None, folded=fold)
    routers = {t: {k: tensors[f"{s}.{k}"] for k in _head_param_shapes(config.router_hidden, 1)}
               for s, t in mapping.items()}
    return _apply(model, config, experts, routers)


# ------------------------------------------------------------------- peft
def export_peft(model: nn.Module, directory, expert: str) -> None:
    """Write one expert ("glad" or "unwill") as a standard peft LoRA adapter folder.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then reproduces the
    patched model's ``mode(model, expert)`` output (dropout aside).
    """
    from peft import LoraConfig

    if expert not in EXPERTS:
        raise ValueError(f"mogu.export_peft: expert must be one of {list(EXPERTS)}, got {expert!r}")
    layers = patched_modules(model)
    if not layers:
        raise ValueError("mogu.export_peft: the model is not MoGU-patched")
    e = EXPERTS.index(expert)
    config = model.mogu_config
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[e].detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[e].detach().contiguous().cpu()
    first = next(iter(layers.values()))
    lora_config = LoraConfig(
        r=first.r, lora_alpha=first.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.resolve_targets(getattr(getattr(model, "config", None), "model_type", None)),
        bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None)
    _atomic_write(os.path.join(directory, "adapter_model.safetensors"),
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    lora_config.save_pretrained(directory)


# ------------------------------------------------------------- any folder
def _latest(folder: str, suffix: str) -> str:
    """The entry of ``folder`` named '<step><suffix>' with the largest step."""
    entries = [e for e in os.listdir(folder) if e.endswith(suffix) and e[: -len(suffix)].isdigit()]
    if not entries:
        raise FileNotFoundError(f"mogu: no '<step>{suffix}' entry in {folder}")
    return os.path.join(folder, max(entries, key=lambda e: int(e[: -len(suffix)])))


def load(model: nn.Module, path, config: Optional[MoGUConfig] = None) -> nn.Module:
    """Load MoGU parameters from ``path`` in whichever format it holds; returns the model.

    * own format: a folder with ``mogu_config.json`` (``save_pretrained``);
    * published release root: ``resp_glad/<step>_lora/``, ``resp_unwill/<step>_lora/``
      and ``router_layer/<step>_router.pth`` (the largest step of each is taken).
    """
    path = _require_path(path, "MoGU folder")
    if os.path.exists(os.path.join(path, OWN_CONFIG)):
        return from_pretrained(model, path)
    parts = {d: os.path.join(path, d) for d in ("resp_glad", "resp_unwill", "router_layer")}
    missing = [p for p in parts.values() if not os.path.isdir(p)]
    if missing:
        raise FileNotFoundError(f"mogu: {path} holds neither {OWN_CONFIG} nor a published release "
                                f"(missing {', '.join(missing)})")
    return load_official(model, glad=_latest(parts["resp_glad"], "_lora"),
                         unwill=_latest(parts["resp_unwill"], "_lora"),
                         router=_latest(parts["router_layer"], "_router.pth"), config=config)
