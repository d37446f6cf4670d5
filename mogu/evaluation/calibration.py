"""The usability/safety dial: choose a router offset on validation prompts.

Every MoGU router produces two logits per token, unwill and glad. The dial d
(``MoGUConfig.router_offset``) shifts them to ``unwill - d`` and ``glad + d`` before the
sigmoid: d > 0 leans every gate towards the usable expert (fewer refusals), d < 0
towards the safe one. :func:`calibrate` sweeps d over a grid, generates with MoGU (the
published protocol, through :func:`mogu.evaluate`) on labelled *validation* prompts,
judges refusals, and picks

    the smallest d of the grid such that the benign refusal rate is <= the target at d
    and at every larger d of the grid

(the safest point that keeps benign refusals under the target, robust to a noisy
non-monotone measured curve). With ``refine=k`` (default 2) the interval between the
chosen point and the grid point below it is then bisected k times (each midpoint
measured and the rule applied again to the whole curve), so the dial lands close to
where benign refusals cross the target instead of on the coarse grid. If no grid point
qualifies, the d with the lowest benign refusal rate is taken and ``met_target`` is
False. The chosen d is set on the model and, with ``mogu_dir``, written into that
folder's ``mogu_config.json``, so generation, evaluation and export use it from then on.

Output folder ``out``: ``offset_<d>/`` (one :func:`mogu.evaluate` folder per grid point,
resumable), ``calibration.json`` (the curve, the rule, the choice) and, with matplotlib,
``calibration.png`` (refusal on malicious vs benign prompts as d moves).

Tune d on validation prompts only; report the test split once, at the chosen d.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..checkpoint import OWN_CONFIG, atomic_write, atomic_write_text
from ..config import MoGUConfig
from ..patching import is_patched, router_offset, set_router_offset
from .evaluator import PromptFiles, evaluate

DEFAULT_OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
CALIBRATION_FILE = "calibration.json"
CALIBRATION_PLOT = "calibration.png"


@dataclass
class CalibrationResult:
    """offsets: the grid (ascending); curve: per measured offset (the grid and the
    refinement midpoints, ascending) {"offset", "benign", "malicious",
    and, where the prompts carry categories, "borderline", "jailbreak"} refusal rates in
    [0, 1] (None where the validation set has no such prompt); chosen: the offset set on the
    model; met_target: whether it meets ``target_benign_refusal``."""
    offsets: List[float]
    curve: List[Dict[str, Optional[float]]]
    chosen: float
    met_target: bool
    target_benign_refusal: float
    out: Optional[str] = None
    files: List[str] = field(default_factory=list)


def choose_offset(curve: Sequence[Dict[str, Optional[float]]], target_benign_refusal: float) -> Tuple[float, bool]:
    """The rule of the module docstring on a measured curve (rows sorted by offset).

    Returns (offset, met_target). Pure: tested on synthetic curves.
    """
    if not curve:
        raise ValueError("choose_offset: empty curve")
    rows = sorted(curve, key=lambda r: r["offset"])
    ok_from = None
    for i in range(len(rows) - 1, -1, -1):          # walk down from the largest offset
        if rows[i]["benign"] is None or rows[i]["benign"] > target_benign_refusal:
            break
        ok_from = i
    if ok_from is not None:
        return float(rows[ok_from]["offset"]), True
    best = min(rows, key=lambda r: (r["benign"] if r["benign"] is not None else 2.0, -r["offset"]))
    return float(best["offset"]), False


def _rates(summary: Dict) -> Dict[str, Optional[float]]:
    """Refusal rates of the MoGU column by label and, when present, by category."""
    def rate(group):
        stats = (group or {}).get("mogu") or {}
        return stats.get("refusal_rate")
    by_label, by_category = summary.get("by_label", {}), summary.get("by_category") or {}
    rates = {"benign": rate(by_label.get("benign")), "malicious": rate(by_label.get("malicious"))}
    for cat in ("borderline", "jailbreak"):
        if cat in by_category:
            rates[cat] = rate(by_category[cat])
    return rates


def write_mogu_offset(mogu_dir, offset: float) -> str:
    """Store ``router_offset`` in ``mogu_dir/mogu_config.json`` (atomic rewrite); returns its path."""
    path = os.path.join(os.fspath(mogu_dir), OWN_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"mogu calibrate: {path} not found (the dial is stored in a MoGU folder written by "
                                f"mogu.save_pretrained / training)")
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"mogu calibrate: {path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"mogu calibrate: {path} has no 'config' object")
    config = MoGUConfig.from_dict({**meta["config"], "router_offset": offset})      # validates
    meta["config"] = {**meta["config"], "router_offset": config.router_offset}   # the rest byte for byte
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return path


def _plot(result: CalibrationResult, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["offset"] for r in result.curve]
    styles = {"malicious": ("tab:red", "o"), "jailbreak": ("tab:purple", "s"), "benign": ("tab:green", "o"),
              "borderline": ("tab:olive", "s")}
    for key, (color, marker) in styles.items():
        ys = [r.get(key) for r in result.curve]
        if any(y is not None for y in ys):
            shown = {"malicious": "malicious label (incl. jailbreak)",
                     "benign": "benign label (incl. borderline)"}.get(key, key)
            ax1.plot(xs, [100 * y if y is not None else float("nan") for y in ys], marker=marker, color=color,
                     label=shown)
    ax1.axhline(100 * result.target_benign_refusal, color="gray", ls=":", lw=1, label="benign target")
    ax1.axvline(result.chosen, color="black", ls="--", lw=1, label=f"chosen d={result.chosen:g}")
    ax1.set_xlabel("router offset d (unwill - d, glad + d)")
    ax1.set_ylabel("refused (%)")
    ax1.set_title("refusal as the dial moves (validation)")
    ax1.legend(fontsize=8)
    ben = [100 * r["benign"] if r["benign"] is not None else float("nan") for r in result.curve]
    mal = [100 * r["malicious"] if r["malicious"] is not None else float("nan") for r in result.curve]
    ax2.plot(ben, mal, marker="o", color="tab:blue")
    for x, b, m in zip(xs, ben, mal):
        ax2.annotate(f"{x:g}", (b, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("benign-label prompts refused (%)")
    ax2.set_ylabel("malicious-label prompts refused (%)")
    ax2.set_title("trade-off (each point one d)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def calibrate(model: nn.Module, tokenizer, prompt_files: PromptFiles = None, *, out, benign=None, malicious=None,
              borderline=None, target_benign_refusal: float = 0.05, offsets: Sequence[float] = DEFAULT_OFFSETS,
              mogu_dir=None, max_new_tokens: int = 16, batch_size: int = 8, system: Optional[str] = None,
              refusal_phrases: Optional[Sequence[str]] = None, judge=None, refine: int = 2, resume: bool = True,
              overwrite: bool = False, plots: bool = True, progress: bool = True) -> CalibrationResult:
    """Sweep the router offset on validation prompts and set the chosen one (module docstring).

    model, tokenizer: a MoGU-patched model with its weights loaded, and its tokenizer.
    prompt_files / benign / malicious / borderline: labelled validation prompts, as for
        :func:`mogu.evaluate` (benign and borderline rows count as benign).
    target_benign_refusal: the highest benign refusal rate accepted, in [0, 1].
    offsets: the grid of d (sorted, distinct). max_new_tokens: per response (refusals
        show in the first words; 16 keeps the sweep cheap). mogu_dir: a MoGU folder
        whose ``mogu_config.json`` receives the chosen d (None: only the model is set).
    refine: bisection steps between the chosen grid point and the one below it (0: the
        grid only); each costs one more pass over the prompts.
    Other arguments as in :func:`mogu.evaluate`.

    Returns CalibrationResult; the model is left at the chosen offset. Raises ValueError
    for an unpatched model, a bad target or grid.
    """
    if not is_patched(model):
        raise ValueError("mogu.calibrate: the model is not MoGU-patched; load a MoGU folder first")
    if not 0.0 <= float(target_benign_refusal) <= 1.0:
        raise ValueError(f"mogu.calibrate: target_benign_refusal must be in [0, 1], got {target_benign_refusal!r}")
    grid = [float(d) for d in offsets]
    if not grid or sorted(set(grid)) != grid:
        raise ValueError(f"mogu.calibrate: offsets must be a non-empty ascending list of distinct numbers, got "
                         f"{list(offsets)!r}")
    for d in grid:
        MoGUConfig(router_offset=d)                                   # finite numbers only
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"mogu.calibrate: refine must be an integer >= 0, got {refine!r}")
    if mogu_dir is not None and not os.path.exists(os.path.join(os.fspath(mogu_dir), OWN_CONFIG)):
        raise FileNotFoundError(f"mogu.calibrate: {os.path.join(os.fspath(mogu_dir), OWN_CONFIG)} not found")
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    extra = {"benign": benign, "malicious": malicious}
    if borderline is not None:
        extra["borderline"] = borderline

    def measure(d: float) -> Dict[str, Optional[float]]:
        with router_offset(model, d):
            res = evaluate(model, tokenizer, prompt_files, out=os.path.join(out, f"offset_{d:+.3f}"), **extra,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, judge=judge,
                           refusal_phrases=refusal_phrases, compare_base=False, resume=resume, overwrite=overwrite,
                           plots=False, progress=progress, print_summary=False)
        rates = _rates(res.summary)
        if progress:
            shown = "  ".join(f"{k} {100 * v:.1f}%" for k, v in rates.items() if v is not None)
            print(f"calibrate: d={d:+.3f}  refused: {shown}", flush=True)
        return {"offset": d, **rates}

    curve = [measure(d) for d in grid]
    if all(r["benign"] is None for r in curve):
        raise ValueError("mogu.calibrate: the validation prompts hold no benign row; the dial needs benign and "
                         "malicious rows (labels)")
    target = float(target_benign_refusal)
    chosen, met = choose_offset(curve, target)
    below = [d for d in grid if d < chosen]
    if met and below:                       # bisect (lower, chosen]: lower fails the rule, chosen meets it
        lower = below[-1]
        for _ in range(refine):
            mid = round((lower + chosen) / 2, 6)
            if mid in (lower, chosen):
                break
            curve = sorted(curve + [measure(mid)], key=lambda r: r["offset"])
            new_choice, met = choose_offset(curve, target)
            if new_choice == mid:
                chosen = mid
            else:
                lower = mid
    set_router_offset(model, chosen)
    result = CalibrationResult(offsets=grid, curve=curve, chosen=chosen, met_target=met,
                               target_benign_refusal=float(target_benign_refusal), out=out)
    if mogu_dir is not None:
        result.files.append(write_mogu_offset(mogu_dir, chosen))
    report = {"offsets": grid, "refine": refine, "curve": curve, "chosen": chosen, "met_target": met,
              "target_benign_refusal": float(target_benign_refusal), "max_new_tokens": max_new_tokens,
              "rule": "smallest offset whose benign refusal rate is <= target there and at every larger offset",
              "mogu_dir": None if mogu_dir is None else os.path.abspath(os.fspath(mogu_dir))}
    path = os.path.join(out, CALIBRATION_FILE)
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    result.files.append(path)
    if plots:
        png = _plot(result, os.path.join(out, CALIBRATION_PLOT))
        if png:
            result.files.append(png)
    return result
