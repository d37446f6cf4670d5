"""Running a (MoGU) model over labelled prompts and measuring what it does.

Modules, in import order:

* :mod:`.judge`: is an answer a refusal (keyword judge), optional harm scorer;
* :mod:`.prompt_files`: the prompt file formats read everywhere (.json/.jsonl/.csv/.txt);
* :mod:`.jailbreak_templates`: jailbreak templates with a prompt slot, applied to prompts;
* :mod:`.safety_data`: the shipped safety instruction set and its splits;
* :mod:`.common`: batched greedy-decoding helpers and output-folder claiming;
* :mod:`.data_building`: training data made by the base model itself (self-distillation);
* :mod:`.evaluator`: :func:`evaluate`, refusal/harm rates of base vs MoGU, with plots;
* :mod:`.calibration`: :func:`calibrate`, the usability/safety dial chosen on validation;
* :mod:`.probing`: :func:`probe_layers` / :func:`select_layers`, MoGU v2 layer selection.
"""
from .calibration import calibrate
from .data_building import build_data
from .evaluator import evaluate
from .jailbreak_templates import apply_template, load_templates
from .probing import probe_layers, select_layers

__all__ = ["apply_template", "build_data", "calibrate", "evaluate", "load_templates", "probe_layers",
           "select_layers"]
