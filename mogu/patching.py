"""Patch a Hugging Face model's target projections with ``MoGULinear`` and undo it.

Also the model-wide switches built on the patched modules: modes, gate capture, folding.
The model's MoGU config is kept on the model as ``model.mogu_config``.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import MoGUConfig
from .layer import MODES, MoGULinear


# Called with the model after every patch_model / unpatch that changed it, in registration
# order. Layers above this one attach model-wide behaviour here without this module
# importing them: mogu.generation registers install_generate / uninstall_generate (so that
# model.generate follows the MoGU protocol on a patched model).
_ON_PATCH: List[Callable[[nn.Module], object]] = []
_ON_UNPATCH: List[Callable[[nn.Module], object]] = []


def register_patch_hooks(on_patch: Callable[[nn.Module], object], on_unpatch: Callable[[nn.Module], object]) -> None:
    """Run ``on_patch(model)`` after each patch_model and ``on_unpatch(model)`` after each
    unpatch (idempotent per pair of callables)."""
    if on_patch not in _ON_PATCH:
        _ON_PATCH.append(on_patch)
    if on_unpatch not in _ON_UNPATCH:
        _ON_UNPATCH.append(on_unpatch)


def patched_modules(model: nn.Module) -> "OrderedDict[str, MoGULinear]":
    """Module name -> MoGULinear, in the model's module order (layer 0 first)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, MoGULinear))


def is_patched(model: nn.Module) -> bool:
    return any(isinstance(m, MoGULinear) for m in model.modules())


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_targets(model: nn.Module, config: MoGUConfig) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``patch_model`` would wrap; ValueError if there are none.

    A module matches a target suffix t when its name is t or ends with "." + t. With
    ``config.layers`` only those indices of the matches (in model order) are returned.
    """
    found = all_targets(model, config)
    if config.auto_layers is not None:
        raise ValueError(f"MoGU: layers={config.layers!r} is not resolved yet; pick the layers with "
                         f"mogu.select_layers(model, tokenizer, config, train, heldout) (or mogu probe) before "
                         f"patching or training")
    if config.layers is not None:
        bad = [i for i in config.layers if i >= len(found)]
        if bad:
            raise ValueError(f"MoGU: layers={config.layers} names indices {bad} but the model has only "
                             f"{len(found)} target modules (0 .. {len(found) - 1})")
        found = [found[i] for i in config.layers]
    return found


def all_targets(model: nn.Module, config: MoGUConfig) -> List[Tuple[str, nn.Module]]:
    """Every (name, module) matching the config's target suffixes, ignoring ``config.layers``
    (layer i of ``config.layers`` is element i of this list). ValueError if none match."""
    targets = config.resolve_targets(_model_type(model))
    found = [(n, m) for n, m in model.named_modules()
             if n and any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(f"MoGU: no module of {type(model).__name__} (model_type={_model_type(model)!r}) "
                         f"matches target_modules={targets} (a module name equal to a target or ending "
                         f"in '.<target>')")
    for n, m in found:
        w = getattr(m, "weight", None)
        if isinstance(m, MoGULinear) or not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"MoGU: target module {n!r} is a {type(m).__name__}, not a linear layer "
                             f"with a 2-D weight")
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def patch_model(model: nn.Module, config: Optional[MoGUConfig] = None) -> nn.Module:
    """Wrap the model's target projections with MoGULinear, in place; returns the model.

    Default targets: the attention output projection of the model's family (see
    ``mogu.config.FAMILY_TARGETS``). Patching an already patched model with no config or
    the same config is a no-op; with a different config it is a ValueError (unpatch
    first). The experts start as peft does (B = 0) and the routers at random, so load
    a release (``load_official``/``from_pretrained``) or train before use.
    """
    if is_patched(model):
        current = getattr(model, "mogu_config", None)
        if config is None or config == current:
            return model
        raise ValueError(f"MoGU: model is already patched with {current}; call mogu.unpatch(model) "
                         f"before patching with {config}")
    config = config if config is not None else MoGUConfig()
    found = find_targets(model, config)
    wrapped = [(n, MoGULinear(m, config)) for n, m in found]   # build all before changing anything
    for n, w in wrapped:
        _set_submodule(model, n, w)
    model.mogu_config = config
    set_router_offset(model, config.router_offset)
    for hook in _ON_PATCH:                       # e.g. model.generate follows the MoGU protocol
        hook(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original modules back (with the current base weight/bias); returns the model."""
    for name, layer in patched_modules(model).items():
        original = layer.original_module
        original._parameters["weight"] = layer.weight      # in case it was re-pointed meanwhile
        if "bias" in original._parameters:
            original._parameters["bias"] = layer.bias
        _set_submodule(model, name, original)
    if "mogu_config" in model.__dict__:
        del model.__dict__["mogu_config"]
    for hook in _ON_UNPATCH:
        hook(model)
    return model


def _require_patched(model: nn.Module, what: str) -> "OrderedDict[str, MoGULinear]":
    layers = patched_modules(model)
    if not layers:
        raise ValueError(f"{what}: the model is not MoGU-patched; call mogu.patch_model(model) first")
    return layers


def set_mode(model: nn.Module, name: str) -> None:
    """Switch every patched layer to mode ``name``: "mogu", "base", "glad" or "unwill"."""
    if name not in MODES:
        raise ValueError(f"mogu.set_mode: unknown mode {name!r}; expected one of {list(MODES)}")
    for layer in _require_patched(model, "mogu.set_mode").values():
        layer.mode = name


def get_mode(model: nn.Module) -> str:
    modes = {layer.mode for layer in _require_patched(model, "mogu.get_mode").values()}
    return modes.pop() if len(modes) == 1 else "mixed"


@contextlib.contextmanager
def mode(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Context manager: run the block in mode ``name``, restore each layer's mode after."""
    layers = _require_patched(model, "mogu.mode")
    previous = {n: layer.mode for n, layer in layers.items()}
    set_mode(model, name)
    try:
        yield model
    finally:
        for n, layer in layers.items():
            layer.mode = previous[n]


@contextlib.contextmanager
def capture_gates(model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Collect the router gates of every forward pass inside the block.

    Yields an ordered dict, module name -> gates (..., 2) fp32 on the CPU, last dim
    [unwill (alpha), glad (beta)], shaped like that layer's input rows. Successive
    forwards (e.g. decoding steps) are concatenated along the token axis (dim -2 for
    batched (B, T, K) inputs, dim 0 for 2-D inputs). Only "mogu"-mode forwards produce gates.
    """
    layers = _require_patched(model, "mogu.capture_gates")
    captured: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    previous = {n: layer.gate_sink for n, layer in layers.items()}

    def sink_for(name):
        def sink(gates: torch.Tensor) -> None:
            g = gates.detach().float().cpu()
            if name not in captured:
                captured[name] = g
                return
            prev = captured[name]
            dim = -2 if g.dim() >= 3 else 0
            if prev.dim() != g.dim() or prev.shape[:dim] != g.shape[:dim]:
                raise ValueError(f"mogu.capture_gates: {name}: cannot append gates of shape {tuple(g.shape)} "
                                 f"to {tuple(prev.shape)} (batch changed inside one capture block)")
            captured[name] = torch.cat([prev, g], dim=dim)
        return sink

    for n, layer in layers.items():
        layer.gate_sink = sink_for(n)
    try:
        yield captured
    finally:
        for n, layer in layers.items():
            layer.gate_sink = previous[n]


def set_router_offset(model: nn.Module, offset: float) -> None:
    """Set the usability/safety dial on every patched layer and in ``model.mogu_config``.

    offset d: each router's unwill logit gets -d and its glad logit +d (see
    ``MoGUConfig.router_offset``); ``mogu.save_pretrained`` stores it with the weights.
    """
    layers = _require_patched(model, "mogu.set_router_offset")
    config = MoGUConfig(**{**model.mogu_config.to_dict(), "router_offset": offset})   # validates
    for layer in layers.values():
        layer.router_offset = config.router_offset
    model.mogu_config = config


@contextlib.contextmanager
def router_offset(model: nn.Module, offset: float) -> Iterator[nn.Module]:
    """Context manager: run the block with the dial at ``offset``, restore it after."""
    _require_patched(model, "mogu.router_offset")
    previous = model.mogu_config.router_offset
    set_router_offset(model, offset)
    try:
        yield model
    finally:
        set_router_offset(model, previous)


def fold_routers(model: nn.Module) -> nn.Module:
    """Replace every router head by its exact folded vectors (deployment; saves memory)."""
    for layer in _require_patched(model, "mogu.fold_routers").values():
        layer.fold()
    return model
