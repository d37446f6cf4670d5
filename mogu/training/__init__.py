"""MoGU training: stage 1 (one LoRA expert per call) and stage 2 (the routers).

Modules, in import order:

* :mod:`.data`: the training data formats, their validation, tokenisation and batching;
* :mod:`.losses`: the published ratio loss (stage 1) and the CE + gate loss (stage 2);
* :mod:`.loop`: the optimisation loop both stages share, its output folder, checkpoints,
  resume and crash safety;
* :mod:`.stages`: :func:`train_expert` and :func:`train_router`, the public entry points.

See docs/design.md section 1 for the recipe and its published defaults.
"""
from .data import DataError
from .loop import FOLDED_DIR, TrainResult
from .stages import COMMON_DEFAULTS, EXPERT_DEFAULTS, ROUTER_DEFAULTS, load_experts, train_expert, train_router

__all__ = ["COMMON_DEFAULTS", "DataError", "EXPERT_DEFAULTS", "FOLDED_DIR", "ROUTER_DEFAULTS", "TrainResult",
           "load_experts", "train_expert", "train_router"]
