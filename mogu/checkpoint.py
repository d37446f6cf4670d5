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
(missing files, all of them named; a truncated or corrupted safetensors / ``.pth`` / JSON
file; unknown/missing key; wrong shape, dtype or a non-finite value; a checksum that does
not match; layer-count mismatch) is a :class:`CheckpointError` (a ValueError) or a
FileNotFoundError naming the file, and leaves the model exactly as it was. Checkpoints are
untrusted: ``torch.load(..., weights_only=True)``.

Every file written here goes through :func:`atomic_write` (temporary file in the same
folder, fsync, ``os.replace``): a crash leaves the old file or the new one, never half of
one. Files written here carry a sha256: ``mogu_config.json`` records the one of
``mogu_model.safetensors`` (``"sha256"``), adapter folders get ``mogu_checksums.json``;
loaders check it when present (older folders without it still load).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load as _st_load
from safetensors.torch import save_file

from .config import EXPERTS, ROUTER_HEADS, MoGUConfig
from .patching import all_targets, find_targets, is_patched, patch_model, patched_modules, unpatch

OWN_CONFIG = "mogu_config.json"
OWN_WEIGHTS = "mogu_model.safetensors"
FORMAT_NAME = "mogu-kernels"
FORMAT_VERSION = 1
TRAINING_INCOMPLETE = "training_incomplete.json"   # in a training output folder while a run is unfinished
CHECKSUMS = "mogu_checksums.json"      # {"sha256": {file name: hex}} beside files without a config to hold it

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_ROUTER_KEY = re.compile(r"^(?:.*\.)?routers\.(?P<i>\d+)\.(?P<head>alpha_|beta_)\.(?P<lin>linear_[012])\."
                         r"(?P<kind>weight|bias)$")


# ------------------------------------------------------------------ helpers
class CheckpointError(ValueError):
    """A MoGU file that cannot be used (unreadable, corrupted, inconsistent); the message
    names the file, and the key when one is at fault."""


def _require_path(path, what: str) -> str:
    if path is None:
        raise ValueError(f"mogu: {what} path is required")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"mogu: {what} not found: {path}")
    return path


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: str, sha256: Optional[str] = None) -> dict:
    """A JSON object from ``path`` (checked against ``sha256`` when given); CheckpointError
    naming the file for anything else."""
    try:
        value = json.loads(_read_bytes(path, sha256).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"mogu: {path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"mogu: {path} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_bytes(path: str, sha256: Optional[str]) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"mogu: {path} does not match its recorded sha256 (the file is corrupted or was "
                              f"changed after it was written)")
    return data


def read_safetensors(path, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors (CPU), checked against ``sha256`` when given;
    CheckpointError naming the file when it is truncated or corrupted."""
    path = os.fspath(path)
    data = _read_bytes(path, sha256)
    try:
        return _st_load(data)
    except Exception as exc:            # safetensors' SafetensorError and friends name no file
        raise CheckpointError(f"mogu: cannot read {path} as safetensors (truncated or corrupted?): "
                              f"{type(exc).__name__}: {exc}") from exc


def _torch_load(path: str, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    import io

    data = _read_bytes(path, sha256)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"mogu: cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"mogu: {path} is not a state dict of tensors")
    return obj


def _check_values(tensors: Dict[str, torch.Tensor], source: str) -> None:
    """Every tensor floating point and finite (a NaN/inf weight would poison every output)."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"mogu: {source}: key {key!r} has dtype {t.dtype}, expected a floating-point "
                                  f"dtype")
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"mogu: {source}: key {key!r} holds {bad} NaN/inf value(s)")


def _recorded_checksums(folder: str) -> Dict[str, str]:
    """{file name: sha256} from ``folder/mogu_checksums.json``, {} when there is none."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.exists(path):
        return {}
    sums = _read_json(path).get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"mogu: {path}: 'sha256' must map file names to hex digests")
    for name in sums:
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"mogu: {path} records a sha256 for {name!r}, which is not in {folder}")
    return sums


def write_checksums(folder, names: Sequence[str]) -> str:
    """Record the sha256 of ``folder/<name>`` for each name in ``folder/mogu_checksums.json``
    (atomically); the loaders check them. Returns its path."""
    folder = os.fspath(folder)
    sums = {n: sha256_file(os.path.join(folder, n)) for n in names}
    path = os.path.join(folder, CHECKSUMS)
    atomic_write_text(path, json.dumps({"sha256": sums}, indent=2, sort_keys=True) + "\n")
    return path


def _module_index(model: nn.Module, config: MoGUConfig) -> "OrderedDict[str, nn.Module]":
    """Name -> module that carries (or would carry) MoGU, in layer order."""
    if is_patched(model):
        return OrderedDict(patched_modules(model))
    return OrderedDict(find_targets(model, config))


def _out_in(module: nn.Module) -> Tuple[int, int]:
    return tuple(module.weight.shape)


def _check_shape(key: str, tensor: torch.Tensor, expected: Tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"mogu: {source}: key {key!r} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected)}")


def match_module(name: str, modules: "OrderedDict[str, nn.Module]") -> Optional[str]:
    """Map a module path from a file onto the model: exact, or by dropping leading parts
    (a file written for XForCausalLM loaded into the bare XModel, or vice versa)."""
    if name in modules:
        return name
    for candidate in modules:
        if candidate.endswith("." + name) or name.endswith("." + candidate):
            return candidate
    return None


def _after_layer_index(path: str) -> str:
    """'model.layers.19.mlp.down_proj' -> 'mlp.down_proj': the path after its last numeric
    part (the layer index); the whole path when it has none."""
    parts = path.split(".")
    numeric = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric else path


def targets_of_adapter(model: nn.Module, config: MoGUConfig, lora_modules: Sequence[str]) -> MoGUConfig:
    """``config`` with ``target_modules`` read off an adapter's LoRA module paths, when it
    names none and the model family's default target (e.g. ``self_attn.o_proj``) does not
    cover them all: experts trained on another projection (``train_expert(target_modules=
    ["mlp.down_proj"])``) or for a family without a default. The suffix of each path after
    its layer index becomes a target. Any other case (explicit targets, a patched model, a
    default that covers the adapter) returns ``config`` unchanged."""
    if config.target_modules or is_patched(model) or not lora_modules:
        return config
    try:
        default = OrderedDict(all_targets(model, MoGUConfig(**{**config.to_dict(), "layers": None})))
        if all(match_module(m, default) is not None for m in lora_modules):
            return config
    except ValueError:                      # no default target for this family, or none in the model
        pass
    suffixes = sorted({_after_layer_index(m) for m in lora_modules})
    return MoGUConfig(**{**config.to_dict(), "target_modules": suffixes})


# --------------------------------------------------------- published release
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _adapter_missing(folder, expert: str) -> List[str]:
    """What a peft adapter folder lacks ([] when complete), each as 'what PATH'."""
    if folder is None:
        raise ValueError(f"mogu: {expert} adapter folder path is required")
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        return [f"{expert} adapter folder {folder}"]
    if not os.path.isdir(folder):
        raise CheckpointError(f"mogu: {expert} adapter must be a peft adapter folder, got file {folder}")
    _refuse_unfinished(folder)
    missing = []
    if not os.path.exists(os.path.join(folder, ADAPTER_CONFIG)):
        missing.append(f"{expert} {ADAPTER_CONFIG} {os.path.join(folder, ADAPTER_CONFIG)}")
    st, binary = (os.path.join(folder, n) for n in ADAPTER_WEIGHTS)
    if not os.path.exists(st) and not os.path.exists(binary):
        missing.append(f"{expert} adapter weights {st} (or {binary})")
    return missing


def _refuse_unfinished(folder: str) -> None:
    if os.path.exists(os.path.join(folder, TRAINING_INCOMPLETE)):
        raise CheckpointError(f"mogu: {folder} holds an unfinished training run ({TRAINING_INCOMPLETE} is there): "
                              f"resume it (resume=True / --resume) or train again")


def _raise_missing(missing: List[str]) -> None:
    if missing:
        raise FileNotFoundError("mogu: not found: " + "; ".join(missing))


def _number(value, positive_int: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return False
    return not positive_int or float(value).is_integer()


def _read_adapter(folder, expert: str, tensors: bool = True
                  ) -> Tuple[dict, Optional[Dict[str, torch.Tensor]], str]:
    """(adapter_config, {key: tensor} or None without ``tensors``, weights path) of a peft
    adapter folder, everything checked (names the file on any fault)."""
    _raise_missing(_adapter_missing(folder, expert))
    folder = os.fspath(folder)
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    sums = _recorded_checksums(folder)
    adapter_config = _read_json(config_path, sums.get(ADAPTER_CONFIG))
    for key in ("r", "lora_alpha"):
        if key not in adapter_config:
            raise CheckpointError(f"mogu: {config_path} lacks {key!r}")
    if not _number(adapter_config["r"], positive_int=True):
        raise CheckpointError(f"mogu: {config_path}: 'r' must be a positive integer, got {adapter_config['r']!r}")
    if not _number(adapter_config["lora_alpha"]):
        raise CheckpointError(f"mogu: {config_path}: 'lora_alpha' must be a positive number, got "
                              f"{adapter_config['lora_alpha']!r}")
    dropout = adapter_config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise CheckpointError(f"mogu: {config_path}: 'lora_dropout' must be in [0, 1), got {dropout!r}")
    st, binary = (os.path.join(folder, n) for n in ADAPTER_WEIGHTS)
    path = st if os.path.exists(st) else binary
    if not tensors:
        return adapter_config, None, path
    sha = sums.get(os.path.basename(path))
    weights = read_safetensors(path, sha) if path == st else _torch_load(path, sha)
    _check_values(weights, path)
    return adapter_config, weights, path


def _parse_adapter(tensors, source: str, modules, r: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """peft keys -> {model module name: {"A": (r, K), "B": (N, r)}}, all validated."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        target = match_module(m.group("module"), modules) if m else None
        if target is None:
            raise CheckpointError(f"mogu: {source}: unknown key {key!r} (not a LoRA weight of a MoGU target module; "
                             f"targets look like {next(iter(modules))!r})")
        N, K = _out_in(modules[target])
        _check_shape(key, t, (r, K) if m.group("ab") == "A" else (N, r), source)
        slot = out.setdefault(target, {})
        if m.group("ab") in slot:
            raise CheckpointError(f"mogu: {source}: key {key!r} duplicates lora_{m.group('ab')} of {target!r}")
        slot[m.group("ab")] = t
    for name in modules:
        for ab in "AB":
            if ab not in out.get(name, {}):
                raise CheckpointError(f"mogu: {source}: missing key 'base_model.model.{name}.lora_{ab}.weight' "
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
            raise CheckpointError(f"mogu: {source}: unknown key {key!r} (expected '<prefix>routers.<i>.alpha_|beta_."
                             f"linear_0|1|2.weight|bias')")
        i = int(m.group("i"))
        if i >= len(names):
            raise CheckpointError(f"mogu: {source}: key {key!r} is for layer {i} but the model has only "
                             f"{len(names)} MoGU target modules (layer count mismatch)")
        if m.group("lin") == "linear_0" and m.group("kind") == "weight" and hidden is None:
            if t.dim() != 2 or t.shape[0] < 1:
                raise CheckpointError(f"mogu: {source}: key {key!r} has shape {tuple(t.shape)}, expected "
                                      f"(hidden, {_out_in(modules[names[i]])[1]}) with hidden >= 1")
            hidden = int(t.shape[0])
        out.setdefault(names[i], {})[f"{m.group('head')}.{m.group('lin')}.{m.group('kind')}"] = t
    if hidden is None:
        raise CheckpointError(f"mogu: {source}: no router weights found")
    prefix = next(iter(tensors)).rsplit("routers.", 1)[0]
    for i, name in enumerate(names):
        N, K = _out_in(modules[name])
        got = out.get(name, {})
        for suffix, shape in _head_param_shapes(hidden, K).items():
            key = f"{prefix}routers.{i}.{suffix}"
            if suffix not in got:
                raise CheckpointError(f"mogu: {source}: missing key {key!r}")
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

    Raises FileNotFoundError naming every missing path; CheckpointError (a ValueError)
    naming the file (and key) for an unreadable, truncated or corrupted file, an
    unknown/missing key, a wrong shape or dtype, a NaN/inf weight, a checksum mismatch or a
    layer-count mismatch. On any error the model is left exactly as it was.
    """
    base_config = config or getattr(model, "mogu_config", None) or MoGUConfig()
    if router is None:
        raise ValueError("mogu: router state dict path is required")
    missing = _adapter_missing(glad, "glad") + _adapter_missing(unwill, "unwill")
    if not os.path.exists(os.fspath(router)):
        missing.append(f"router state dict {os.fspath(router)}")
    _raise_missing(missing)
    router_path = os.fspath(router)
    config, experts = read_experts(model, glad, unwill, base_config)
    modules = _module_index(model, config)
    tensors = _torch_load(router_path, _recorded_checksums(os.path.dirname(router_path) or ".").get(
        os.path.basename(router_path)))
    _check_values(tensors, router_path)
    hidden, routers = _parse_router(tensors, router_path, modules)
    config = _config_or_error(router_path, {**config.to_dict(), "router_hidden": hidden})
    return _apply(model, config, experts, routers)


def _config_or_error(source: str, values: dict) -> MoGUConfig:
    try:
        return MoGUConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"mogu: {source}: {exc}") from exc


def read_experts(model: nn.Module, glad, unwill, config: Optional[MoGUConfig] = None
                 ) -> Tuple[MoGUConfig, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """Read and check the two expert adapters (peft folders) for ``model``; touches nothing.

    Returns (config, experts): ``config`` = ``config`` (default: the model's, else the
    defaults) with r, lora_alpha and lora_dropout from the adapters' ``adapter_config.json``
    (which must agree); ``experts`` = {target module name: (lora_A (2, r, K), lora_B
    (2, N, r))}, index 0 unwill, 1 glad, for every module ``config`` puts MoGU on. Same
    errors as :func:`load_official`.
    """
    base = config or getattr(model, "mogu_config", None) or MoGUConfig()
    _raise_missing(_adapter_missing(glad, "glad") + _adapter_missing(unwill, "unwill"))
    adapters = {e: _read_adapter({"glad": glad, "unwill": unwill}[e], e) for e in EXPERTS}
    (cfg_u, _, src_u), (cfg_g, _, src_g) = adapters["unwill"], adapters["glad"]
    if (int(cfg_u["r"]), float(cfg_u["lora_alpha"])) != (int(cfg_g["r"]), float(cfg_g["lora_alpha"])):
        raise ValueError(f"mogu: the experts differ in r/lora_alpha ({src_u}: r={cfg_u['r']}, "
                         f"lora_alpha={cfg_u['lora_alpha']}; {src_g}: r={cfg_g['r']}, "
                         f"lora_alpha={cfg_g['lora_alpha']})")
    r, lora_alpha = int(cfg_u["r"]), float(cfg_u["lora_alpha"])
    config = _config_or_error(src_u, {**base.to_dict(), "r": r, "lora_alpha": lora_alpha,
                                      "lora_dropout": float(cfg_u.get("lora_dropout", base.lora_dropout))})
    config = targets_of_adapter(model, config, _lora_modules(adapters["unwill"][1]))
    modules = _module_index(model, config)
    parsed = {e: _parse_adapter(adapters[e][1], adapters[e][2], modules, r) for e in EXPERTS}
    experts = {n: (torch.stack([parsed[e][n]["A"] for e in EXPERTS]), torch.stack([parsed[e][n]["B"] for e in EXPERTS]))
               for n in modules}
    return config, experts


def load_experts(model: nn.Module, glad, unwill, config: Optional[MoGUConfig] = None) -> nn.Module:
    """Load the two expert adapters (peft folders, as :func:`load_official`) but no router:
    :func:`read_experts`, then patch if needed (fresh router heads) and copy them in. Same
    errors and all-or-nothing guarantee as :func:`load_official`."""
    config, experts = read_experts(model, glad, unwill, config)
    return _apply(model, config, experts, routers=None)


def read_adapter_config(folder, expert: str = "adapter") -> dict:
    """A peft adapter folder's checked ``adapter_config.json`` (r, lora_alpha, lora_dropout
    valid); the weights are not read. FileNotFoundError / CheckpointError naming the file."""
    return _read_adapter(folder, expert, tensors=False)[0]


def adapter_modules(folder, expert: str = "adapter") -> List[str]:
    """The module paths a peft adapter folder holds LoRA weights for (as written in its keys,
    ``base_model.model.`` dropped), in file order, each once; the file is fully checked."""
    return _lora_modules(_read_adapter(folder, expert)[1])


def _lora_modules(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The module paths of an adapter's LoRA keys, in key order, each once."""
    out: List[str] = []
    for key in tensors:
        m = _PEFT_KEY.match(key)
        if m and m.group("module") not in out:
            out.append(m.group("module"))
    return out


def router_file_hidden(path) -> int:
    """The router width (hidden size of the heads) of a published router state dict."""
    path = _require_path(path, "router state dict")
    for key, t in _torch_load(path).items():
        if key.endswith("linear_0.weight") and t.dim() == 2:
            return int(t.shape[0])
    raise CheckpointError(f"mogu: {path}: no router weights found")


# --------------------------------------------------------------- own format
def atomic_write(path, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` all at once: ``write(tmp)`` fills a temporary file in the
    same folder, which is flushed to disk and renamed over ``path`` (``os.replace``). A
    crash at any point leaves the old file (or none) or the new one, never half of one;
    the temporary file is removed on an error. Every file the project writes goes through
    here (or is written into a folder that is itself renamed into place when complete).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:          # the bytes reach the disk before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_atomic_write = atomic_write          # the older private name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path, value, indent: Optional[int] = 1, **kwargs) -> None:
    """``json.dump(value)`` plus a final newline, atomically (see :func:`atomic_write`)."""
    atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False, **kwargs) + "\n")


def read_appended_jsonl(path, fix: str = "") -> Tuple[List[Tuple[int, object, str]], bool]:
    """The lines of a JSONL file that a run appends to (a generation cache, responses, a
    training log): ([(1-based line number, parsed value, the line's text)], cut) where cut
    says the last line was cut short (no newline after it and not valid JSON: a kill in the
    middle of an append) and was left out; the caller rewrites the file without it (the
    appends are not atomic, a rewrite is). Any other line that is not valid JSON is a
    ValueError naming the file and line, then ``fix`` (what the user can do)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append((i + 1, json.loads(line), line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                return records, True
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc.msg})" + (f"; {fix}" if fix else "")) \
                from exc
    return records, False


# Settings of mogu_config.json meant to be changed by hand (or by mogu.calibrate) after
# saving; the recorded settings digest leaves them out.
EDITABLE_SETTINGS = ("router_offset", "mogu_tokens")


def _settings_digest(meta: dict) -> str:
    """sha256 of mogu_config.json's content other than its sha256 field and the editable
    settings (canonical JSON, so whitespace and key order do not count)."""
    core = {k: v for k, v in meta.items() if k != "sha256"}
    if isinstance(core.get("config"), dict):
        core["config"] = {k: v for k, v in core["config"].items() if k not in EDITABLE_SETTINGS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_settings_digest(meta: dict, config_path: str) -> Dict[str, str]:
    """The recorded {file name: sha256} of mogu_config.json, its settings digest checked."""
    sums = meta.get("sha256", {})
    if (not isinstance(sums, dict) or not set(sums) <= {OWN_WEIGHTS, OWN_CONFIG}
            or not all(isinstance(v, str) for v in sums.values())):
        raise CheckpointError(f"mogu: {config_path}: 'sha256' must map {OWN_WEIGHTS!r} and {OWN_CONFIG!r} to hex "
                              f"digests, got {sums!r}")
    if OWN_CONFIG in sums and sums[OWN_CONFIG] != _settings_digest(meta):
        raise CheckpointError(f"mogu: {config_path}: the settings do not match their recorded sha256 (the file is "
                              f"corrupted, or was edited beyond {' / '.join(EDITABLE_SETTINGS)})")
    return sums


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
    weights = os.path.join(directory, OWN_WEIGHTS)
    atomic_write(weights, lambda p: save_file(tensors, p, metadata={"format": FORMAT_NAME}))
    meta["sha256"] = {OWN_WEIGHTS: sha256_file(weights), OWN_CONFIG: _settings_digest(meta)}
    atomic_write_text(os.path.join(directory, OWN_CONFIG), json.dumps(meta, indent=2) + "\n")


def from_pretrained(model: nn.Module, directory) -> nn.Module:
    """Load a folder written by ``save_pretrained`` (full or folded) into ``model``.

    Patches the model if needed (with the saved config); same errors and the same
    all-or-nothing guarantee as ``load_official``. When ``mogu_config.json`` records the
    sha256 of the weights and of its own settings (every folder written since checksums were
    added), a mismatch is an error; ``router_offset`` and ``mogu_tokens`` may be edited.
    """
    directory = _require_path(directory, "MoGU folder")
    _refuse_unfinished(directory)
    config_path, weights_path = os.path.join(directory, OWN_CONFIG), os.path.join(directory, OWN_WEIGHTS)
    _raise_missing([f"MoGU {what} {p}" for p, what in ((config_path, "config"), (weights_path, "weights"))
                    if not os.path.exists(p)])
    meta = _read_json(config_path)
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"mogu: {config_path}: format {meta.get('format')!r} version {meta.get('version')!r} "
                              f"is not {FORMAT_NAME!r} version {FORMAT_VERSION}")
    sums = _check_settings_digest(meta, config_path)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"mogu: {config_path}: 'config' must be a JSON object (the MoGUConfig)")
    try:
        config = MoGUConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"mogu: {config_path}: {exc}") from exc
    saved_modules = meta.get("modules", [])
    if not isinstance(saved_modules, list) or not all(isinstance(m, str) for m in saved_modules):
        raise CheckpointError(f"mogu: {config_path}: 'modules' must be a list of module names")
    folded = meta.get("folded", False)
    if not isinstance(folded, bool):
        raise CheckpointError(f"mogu: {config_path}: 'folded' must be true or false, got {folded!r}")
    if is_patched(model):
        modules = OrderedDict(patched_modules(model))
    else:
        modules = OrderedDict(find_targets(model, config))
    mapping = {}
    for saved in saved_modules:
        target = match_module(saved, modules)
        if target is None:
            raise CheckpointError(f"mogu: {config_path}: module {saved!r} does not exist among the model's MoGU "
                                  f"targets (e.g. {next(iter(modules))!r})")
        mapping[saved] = target
    if len(saved_modules) != len(modules) or len(set(mapping.values())) != len(modules):
        raise CheckpointError(f"mogu: {config_path} has {len(saved_modules)} modules but the model has "
                              f"{len(modules)} MoGU target modules (layer count mismatch)")
    tensors = read_safetensors(weights_path, sums.get(OWN_WEIGHTS))
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
            raise CheckpointError(f"mogu: {weights_path}: unknown key {key!r}")
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"mogu: {weights_path}: missing key {key!r}")
        _check_shape(key, tensors[key], shape, weights_path)
    _check_values(tensors, weights_path)
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
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None)
    atomic_write(os.path.join(directory, "adapter_model.safetensors"),
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(directory, ADAPTER_CONFIG), peft_config_json(lora_config))
    write_checksums(directory, ["adapter_model.safetensors", ADAPTER_CONFIG])


def peft_config_json(peft_config) -> str:
    """The text ``peft_config.save_pretrained`` writes as adapter_config.json (for an atomic write)."""
    out = {k: list(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    return json.dumps(out, indent=2, sort_keys=True)


# ------------------------------------------------------------- any folder
def latest_step_entry(folder: str, suffix: str) -> str:
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
    _refuse_unfinished(path)
    if os.path.exists(os.path.join(path, OWN_CONFIG)):
        return from_pretrained(model, path)
    parts = {d: os.path.join(path, d) for d in ("resp_glad", "resp_unwill", "router_layer")}
    missing = [p for p in parts.values() if not os.path.isdir(p)]
    if missing:
        raise FileNotFoundError(f"mogu: {path} holds neither {OWN_CONFIG} nor a published release "
                                f"(missing {', '.join(missing)})")
    return load_official(model, glad=latest_step_entry(parts["resp_glad"], "_lora"),
                         unwill=latest_step_entry(parts["resp_unwill"], "_lora"),
                         router=latest_step_entry(parts["router_layer"], "_router.pth"), config=config)
