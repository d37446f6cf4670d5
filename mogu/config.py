"""MoGU configuration and the per-family default target projection."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

# Expert order everywhere in this project (op, checkpoints, gates): index 0 = unwill
# (safe, gated by the router head alpha_), index 1 = glad (usable, gated by beta_).
EXPERTS: Tuple[str, str] = ("unwill", "glad")
ROUTER_HEADS: Tuple[str, str] = ("alpha_", "beta_")

# config.model_type -> the attention output projection MoGU adapts (module name suffix).
FAMILY_TARGETS: Dict[str, List[str]] = {
    "llama": ["self_attn.o_proj"],      # Llama-2, Vicuna, Dolphin, SmolLM2, ...
    "mistral": ["self_attn.o_proj"],
    "qwen2": ["self_attn.o_proj"],
    "falcon": ["self_attention.dense"],
}


@dataclass
class MoGUConfig:
    """Hyper-parameters of a MoGU-patched model (published defaults).

    target_modules: module-name suffixes to patch; None = the family default from
        ``FAMILY_TARGETS[model.config.model_type]``.
    r, lora_alpha, lora_dropout: the two LoRA experts (scaling = lora_alpha / r).
    router_hidden: width of each router head (Linear(d, h) -> Linear(h, d) -> Linear(d, 1)).
    mogu_tokens: how many new tokens MoGU decides before the base model takes over.
    layers: which of the matching target modules carry MoGU, as indices into the list of
        matches in model order (for one target per decoder layer: the layer index); the
        others stay the plain base layer, bitwise (MoGU v2's layer selection). None = all.
        ``"auto:K"`` = the K layers whose activations best separate benign from malicious
        prompts; it must be resolved to a list by ``mogu.select_layers`` before
        ``patch_model`` or training.
    router_offset: the usability/safety dial d: every router adds -d to the unwill logit
        and +d to the glad logit (0 = as trained; > 0 fewer refusals, < 0 more). Chosen
        on validation data by ``mogu.calibrate`` and saved in ``mogu_config.json``, so
        generation, evaluation and export all use it.
    """

    target_modules: Optional[List[str]] = None
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    router_hidden: int = 512
    mogu_tokens: int = 5
    layers: Optional[Union[List[int], str]] = None
    router_offset: float = 0.0

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.layers = _check_layers(self.layers)
        if isinstance(self.router_offset, bool) or not isinstance(self.router_offset, (int, float)) \
                or not math.isfinite(self.router_offset):
            raise ValueError(f"MoGUConfig: router_offset must be a finite number, got {self.router_offset!r}")
        self.router_offset = float(self.router_offset)
        if int(self.r) <= 0:
            raise ValueError(f"MoGUConfig: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"MoGUConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if int(self.router_hidden) <= 0:
            raise ValueError(f"MoGUConfig: router_hidden must be positive, got {self.router_hidden!r}")
        if int(self.mogu_tokens) < 0:
            raise ValueError(f"MoGUConfig: mogu_tokens must be >= 0, got {self.mogu_tokens!r}")

    @property
    def auto_layers(self) -> Optional[int]:
        """K of ``layers="auto:K"`` (layer selection still to be resolved), else None."""
        return int(self.layers.split(":", 1)[1]) if isinstance(self.layers, str) else None

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / int(self.r)

    def resolve_targets(self, model_type: Optional[str]) -> List[str]:
        """The module-name suffixes to patch for a model of ``model_type``."""
        if self.target_modules:
            return list(self.target_modules)
        if model_type in FAMILY_TARGETS:
            return list(FAMILY_TARGETS[model_type])
        raise ValueError(
            f"MoGU: no default target module for model_type={model_type!r}; known families: "
            f"{ {k: v for k, v in FAMILY_TARGETS.items()} }. Pass MoGUConfig(target_modules=[...]).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoGUConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MoGUConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_layers(layers) -> Optional[Union[List[int], str]]:
    """None, a sorted list of distinct non-negative ints, or the string "auto:K" (K >= 1)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        head, _, k = layers.partition(":")
        if head != "auto" or not k.isdigit() or int(k) < 1:
            raise ValueError(f"MoGUConfig: layers must be a list of layer indices or 'auto:K' with K >= 1, "
                             f"got {layers!r}")
        return f"auto:{int(k)}"
    try:
        values = list(layers)
    except TypeError:
        raise ValueError(f"MoGUConfig: layers must be a list of layer indices or 'auto:K', got {layers!r}") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"MoGUConfig: layers must be a non-empty list of non-negative integers, got {layers!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"MoGUConfig: layers has repeated indices: {layers!r}")
    return sorted(values)
