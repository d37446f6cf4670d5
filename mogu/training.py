"""MoGU training, published recipe by default (docs/design.md section 1).

Stage 1, :func:`train_expert`: one LoRA expert on the target projection (peft), trained on
pairs (same instruction, a compliant ``affirm`` answer and a refusing ``reject`` answer)
with the ratio loss, per pair::

    glad:   CE(affirm) / CE(reject)        unwill: CE(reject) / CE(affirm)

CE = mean token cross-entropy over the answer's tokens. Output: a peft adapter folder.

Stage 2, :func:`train_router`: patch the model, load both experts, freeze everything but
the router heads and train, per example with label y (1 malicious, 0 benign)::

    CE(response) + lam * [mean((a - t_a)^2) + mean((b - t_b)^2)],  t_a = y, t_b = 1 - y

the means over every patched layer and every non-padding token (prompt and response) of
the example; a = unwill gate (``alpha_``), b = glad gate (``beta_``). Output: the own format
(``mogu.save_pretrained``) plus a folded deployment copy in ``<out>/folded``.

Both stages: one optimizer step per ``pairs_per_step`` / ``examples_per_step`` examples,
the loss being the mean per-example loss over them (so batch_size only changes speed and
memory, not the objective; the last step of an epoch may hold fewer examples); AdamW
(torch defaults besides lr); constant learning rate. Runs through ``accelerate`` (device
placement, DDP under ``accelerate launch``; no hand-written distributed code).

Output folder ``out``::

    training_args.json        the run's arguments and data fingerprints (checked on resume)
    training_log.jsonl        one JSON object per optimizer step (loss and its parts, gates)
    checkpoints/step-NNNNNNNN/ weights (a peft adapter / own format), optimizer.pt,
                              state.json, rng-<rank>.pt; written every save_steps and at the end
    stage 1: adapter_config.json + adapter_model.safetensors (final expert), mogu_checksums.json
    stage 2: mogu_config.json + mogu_model.safetensors (final), folded/ (deployment copy)
    training_incomplete.json  present while a run is under way (or was killed): loaders refuse
                              the folder until a run finishes

``resume=True`` continues from the newest checkpoint with its optimizer state, data
position and RNG state: on CPU a resumed run is bitwise the uninterrupted run.

Crash safety: a checkpoint is written into ``step-N.tmp/`` and renamed into place once
complete, its ``state.json`` (written last) recording the sha256 of every file in it,
checked on resume; a folder without ``state.json`` is never resumed from. Every other file
is written atomically (``checkpoint.atomic_write``), the final outputs through a staging
folder moved into place file by file, and ``training_incomplete.json`` is removed last. So a
run killed at any point (SIGKILL included) leaves the previous checkpoint loadable, is
resumed to bitwise the uninterrupted run's weights (CPU), and is never taken for a
finished one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as mdata
from . import hf_compat
from .checkpoint import TRAINING_INCOMPLETE, atomic_write_text, write_checksums
from .config import EXPERTS, ROUTER_HEADS, MoGUConfig
from .patching import find_targets, is_patched, patch_model, patched_modules

# Published defaults (docs/design.md section 1), shared with the CLI's --help.
EXPERT_DEFAULTS = dict(r=8, lora_alpha=16.0, lora_dropout=0.05, lr=5e-5, pairs_per_step=8, epochs=10)
ROUTER_DEFAULTS = dict(lam=2.0, lr=5e-4, examples_per_step=16, epochs=10, router_hidden=512)
COMMON_DEFAULTS = dict(batch_size=1, max_length=1024, save_steps=100, seed=42, weight_decay=0.01)

CHECKPOINTS = "checkpoints"
LOG_FILE = "training_log.jsonl"
ARGS_FILE = "training_args.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
FOLDED_DIR = "folded"
INCOMPLETE_FILE = TRAINING_INCOMPLETE           # the run-in-progress marker, removed last (loaders refuse it)
STAGING_DIR = ".final.tmp"                       # final outputs are assembled here, then moved into out
# The final outputs (removed when a run starts, put back when it ends).
FINAL_ENTRIES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                 "mogu_checksums.json", "mogu_config.json", "mogu_model.safetensors", FOLDED_DIR)
# Entries of an output folder this module writes; overwrite=True removes these only.
OWNED_ENTRIES = (CHECKPOINTS, LOG_FILE, ARGS_FILE, INCOMPLETE_FILE, STAGING_DIR) + FINAL_ENTRIES
# Arguments that define the optimisation trajectory: a resumed run must match them.
RESUME_KEYS = ("stage", "expert", "data", "batch_size", "per_step", "lr", "weight_decay", "max_grad_norm", "seed",
               "shuffle", "max_length", "system", "r", "lora_alpha", "lora_dropout", "target_modules", "lam",
               "gate_tokens", "router_hidden", "expert_dropout", "bf16", "glad", "unwill", "router")


@dataclass
class TrainResult:
    """What a training call did.

    output_dir: the output folder. global_step: optimizer steps done in total (resumed
    steps included). finished: whether the run reached its end (epochs or max_steps).
    losses: the mean loss of each optimizer step run by THIS call, in order (taken
    before the step's update). log_file: the JSONL log.
    """
    output_dir: str
    global_step: int
    finished: bool
    losses: List[float] = field(default_factory=list)
    log_file: str = ""


# =================================================================== losses
def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy over the labelled tokens.

    logits (B, T, V) any float dtype; labels (B, T) int64 with -100 where no loss is
    taken (prompt, padding). Position t predicts labels[t] from logits[t - 1]. Returns
    (B,) fp32. ValueError if a row has no labelled token.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                               ignore_index=mdata.IGNORE_INDEX, reduction="none")          # (B, T-1)
    mask = shift_labels != mdata.IGNORE_INDEX
    count = mask.sum(1)
    if bool((count == 0).any()):
        raise ValueError("sequence_ce: a row has no labelled (response) token")
    return (token_ce * mask).sum(1) / count


def ratio_loss(ce_affirm: torch.Tensor, ce_reject: torch.Tensor, expert: str) -> torch.Tensor:
    """The published stage-1 loss per pair: glad CE(affirm)/CE(reject), unwill CE(reject)/CE(affirm).

    ce_affirm, ce_reject: (B,) per-pair CE of the compliant and the refusing answer.
    Returns (B,).
    """
    if expert == "glad":
        return ce_affirm / ce_reject
    if expert == "unwill":
        return ce_reject / ce_affirm
    raise ValueError(f"expert must be one of {list(EXPERTS)}, got {expert!r}")


def expert_loss(model: nn.Module, batch: Dict[str, torch.Tensor], expert: str
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Stage-1 loss of one collated batch (see ``data.PairCollator``: rows [0, B) affirm,
    [B, 2B) reject). Returns (per-pair loss (B,), {"ce_affirm": (B,), "ce_reject": (B,)})."""
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"expert_loss: a pair batch has an even number of rows, got {n}")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    ce = sequence_ce(logits, batch["labels"])
    ce_affirm, ce_reject = ce[: n // 2], ce[n // 2:]
    return ratio_loss(ce_affirm, ce_reject, expert), {"ce_affirm": ce_affirm, "ce_reject": ce_reject}


class GateCollector:
    """Receives every patched layer's gates WITH autograd, but only inside ``recording()``.

    ``install()`` sets each MoGULinear's ``gate_sink`` (remembering the previous one),
    ``remove()`` restores them. Forwards outside ``recording()`` (e.g. the recomputation
    of gradient checkpointing during backward) are ignored.
    """

    def __init__(self, model: nn.Module):
        self.layers = patched_modules(model)
        if not self.layers:
            raise ValueError("GateCollector: the model is not MoGU-patched")
        self._previous: Dict[str, Any] = {}
        self._active: Optional[List[torch.Tensor]] = None

    def _sink(self, gates: torch.Tensor) -> None:
        if self._active is not None:
            self._active.append(gates)

    def install(self) -> "GateCollector":
        for name, layer in self.layers.items():
            self._previous[name] = layer.gate_sink
            layer.gate_sink = self._sink
        return self

    def remove(self) -> None:
        for name, layer in self.layers.items():
            if name in self._previous:
                layer.gate_sink = self._previous.pop(name)

    @contextlib.contextmanager
    def recording(self) -> Iterator[List[torch.Tensor]]:
        """Yields the list that receives each layer's gates (..., 2) [alpha, beta] in forward order."""
        self._active = []
        try:
            yield self._active
        finally:
            self._active = None


def gate_targets(label: torch.Tensor) -> torch.Tensor:
    """(B,) labels 0/1 -> (B, 2) fp32 targets [t_a, t_b]: 1 -> [1, 0] (unwill), 0 -> [0, 1] (glad)."""
    y = label.float()
    return torch.stack([y, 1.0 - y], dim=-1)


GATE_TOKENS = ("all", "prompt")


def router_loss(model: nn.Module, batch: Dict[str, torch.Tensor], collector: GateCollector, lam: float = 2.0,
                gate_tokens: str = "all") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Stage-2 loss of one collated batch (see ``data.LabelledCollator``).

    Per example i: CE_i(response) + lam * (mse_a_i + mse_b_i), each mse the mean over all
    patched layers and the example's gate tokens: every non-padding token (``"all"``, the
    published recipe) or the prompt tokens only (``"prompt"``: the router must tell the
    request apart, not the reply, whose refusal wording would otherwise give the class
    away on most tokens). The CE term covers the response either way. Returns
    (per-example loss (B,), {"ce", "gate_mse", "alpha", "beta"}: (B,) each, alpha/beta the
    mean gates over the same tokens).
    """
    if gate_tokens not in GATE_TOKENS:
        raise ValueError(f"gate_tokens must be one of {GATE_TOKENS}, got {gate_tokens!r}")
    with collector.recording() as gates:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    if not gates:
        raise RuntimeError("router_loss: no gates were produced; are the patched layers in 'mogu' mode?")
    ce = sequence_ce(logits, batch["labels"])
    g = torch.stack([x.float() for x in gates])                          # (L, B, T, 2)
    tokens = batch["attention_mask"].bool()                               # (B, T)
    if gate_tokens == "prompt":
        tokens = tokens & (batch["labels"] == mdata.IGNORE_INDEX)
    mask = tokens.to(g.dtype)[None, :, :, None]                            # (1, B, T, 1)
    denom = tokens.sum(1).clamp_min(1).to(g.dtype) * g.shape[0]           # (B,) layers x tokens
    target = gate_targets(batch["label"]).to(g.device)[None, :, None, :]  # (1, B, 1, 2)
    mse = ((g - target).square() * mask).sum(dim=(0, 2)) / denom[:, None]  # (B, 2)
    mean_gate = (g.detach() * mask).sum(dim=(0, 2)) / denom[:, None]       # (B, 2)
    loss = ce + lam * mse.sum(-1)
    return loss, {"ce": ce, "gate_mse": mse.sum(-1), "alpha": mean_gate[:, 0], "beta": mean_gate[:, 1]}


# ============================================================ expert loading
def load_experts(model: nn.Module, glad, unwill, config: Optional[MoGUConfig] = None) -> nn.Module:
    """Load the two expert adapters (peft folders, as ``load_official``) but no router.

    Patches the model if needed (fresh router heads, from the current torch RNG); a
    patched model keeps its router heads. r and lora_alpha come from the adapters'
    ``adapter_config.json``. Same checks and all-or-nothing guarantee as ``load_official``.
    """
    from .checkpoint import load_experts as _load_experts

    return _load_experts(model, glad, unwill, _expert_config(model, glad, unwill, config))


def _expert_config(model: nn.Module, glad, unwill, base: Optional[MoGUConfig]) -> MoGUConfig:
    """The MoGU config with r, lora_alpha, lora_dropout of the two adapters (which must agree)."""
    from .checkpoint import read_adapter_config

    base = base or getattr(model, "mogu_config", None) or MoGUConfig()
    cfg = {e: read_adapter_config(p, e) for e, p in (("glad", glad), ("unwill", unwill))}
    key = {e: (int(c["r"]), float(c["lora_alpha"])) for e, c in cfg.items()}
    if key["glad"] != key["unwill"]:
        raise ValueError(f"mogu: the experts differ in r/lora_alpha (glad {glad}: {key['glad']}, "
                         f"unwill {unwill}: {key['unwill']})")
    r, alpha = key["glad"]
    dropout = float(cfg["unwill"].get("lora_dropout", base.lora_dropout))
    config = MoGUConfig(**{**base.to_dict(), "r": r, "lora_alpha": alpha, "lora_dropout": dropout})
    if config.layers is None and not is_patched(model):
        config = MoGUConfig(**{**config.to_dict(), "layers": _adapter_layers(model, config, glad)})
    return config


def _adapter_layers(model: nn.Module, config: MoGUConfig, folder) -> Optional[List[int]]:
    """The target-module indices an adapter folder covers, or None when it covers them all
    (experts trained with ``layers=`` carry LoRA on those layers only)."""
    from .checkpoint import adapter_modules, match_module
    from .patching import all_targets

    names = [n for n, _ in all_targets(model, config)]
    index = {n: i for i, n in enumerate(names)}
    modules = OrderedDict((n, None) for n in names)
    covered = set()
    for module in adapter_modules(folder):
        target = match_module(module, modules)
        if target is not None:
            covered.add(index[target])
    return None if not covered or len(covered) == len(names) else sorted(covered)


def _router_file_hidden(path) -> int:
    from .checkpoint import router_file_hidden

    return router_file_hidden(path)


# ================================================================ the loop
@dataclass
class _Stage:
    """Everything stage specific the shared loop needs."""
    name: str                                    # "expert" or "router"
    model: nn.Module                             # what the loop calls (peft model / patched model)
    params: List[nn.Parameter]                   # trainable parameters
    features: List[Any]                          # tokenised examples
    collate: Callable
    loss: Callable                               # (model, batch) -> (per-example loss, {name: (B,)})
    stat_names: Tuple[str, ...]                  # per-example metrics to log (means over the step)
    save_weights: Callable[[nn.Module, str], None]
    load_weights: Callable[[nn.Module, str], None]
    save_final: Callable[[nn.Module, str], None]
    class_stats: Tuple[str, ...] = ()            # metrics also split by label (stage 2)
    rows_per_example: int = 1                    # batch rows per example (a stage-1 pair is 2 rows)
    param_groups: Optional[List[Dict[str, Any]]] = None   # AdamW groups over params (per-group lr), or None


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _accumulation(per_step: int, batch_size: int, per_step_name: str) -> int:
    _check_positive(per_step_name, per_step)
    _check_positive("batch_size", batch_size)
    if per_step % batch_size:
        raise ValueError(f"{per_step_name}={per_step} must be a multiple of batch_size={batch_size}")
    return per_step // batch_size


def _output_state(out: str, overwrite: bool, resume: bool) -> Optional[str]:
    """Check the output folder before anything is written; returns the checkpoint to resume.

    FileExistsError for a non-empty folder without overwrite/resume; FileNotFoundError
    for resume without a checkpoint.
    """
    if resume:
        latest = _latest_checkpoint(out)
        if latest is None:
            raise FileNotFoundError(f"resume: no checkpoint in {os.path.join(out, CHECKPOINTS)}")
        return latest
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass overwrite=True (--overwrite) "
                              f"to replace the training outputs in it, or resume=True (--resume) to continue")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"output path {out} exists and is not a folder")
    return None


def _clear_owned(out: str) -> None:
    for entry in OWNED_ENTRIES:
        path = os.path.join(out, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _latest_checkpoint(out: str) -> Optional[str]:
    folder = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(folder):
        return None
    done = [e for e in os.listdir(folder) if e.startswith("step-") and e[5:].isdigit()
            and os.path.exists(os.path.join(folder, e, STATE_FILE))]
    return os.path.join(folder, max(done, key=lambda e: int(e[5:]))) if done else None


def _check_resume_args(out: str, args: Dict[str, Any]) -> None:
    path = os.path.join(out, ARGS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"resume: {path} is not valid JSON ({exc}); start a new run") from exc
    diff = [f"{k}: saved {saved.get(k)!r}, now {args.get(k)!r}" for k in RESUME_KEYS
            if json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(args.get(k)))]
    if diff:
        raise ValueError(f"resume: the arguments differ from the run in {out} (start a new run or pass the "
                         f"same values): " + "; ".join(diff))


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _rng_state() -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s
    return state


def _set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _remove(path: str) -> None:
    """Remove a file or folder tree; a folder is first renamed aside (one atomic step), so a
    crash mid-removal never leaves a half-deleted folder under its real name."""
    if os.path.isdir(path):
        trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash)
    elif os.path.lexists(path):
        os.remove(path)


def _clean_debris(out: str) -> None:
    """Remove what a killed run can leave: checkpoint folders still being written
    (``step-N.tmp``), folders renamed aside for removal, a final-output staging folder."""
    for folder, mine in ((out, lambda e: e == STAGING_DIR),
                         (os.path.join(out, CHECKPOINTS), lambda e: e.startswith("step-") and e.endswith(".tmp"))):
        if not os.path.isdir(folder):
            continue
        for e in os.listdir(folder):
            if mine(e) or e.startswith(".trash-") or e.startswith(".tmp-"):
                path = os.path.join(folder, e)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _load_torch(path: str):
    """``torch.load`` (weights only) of a checkpoint file; CheckpointError naming it."""
    from .checkpoint import CheckpointError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"resume: cannot read {path} ({type(exc).__name__}: {exc})") from exc


def _checkpoint_sums(folder: str) -> Dict[str, str]:
    from .checkpoint import sha256_file

    return {e: sha256_file(os.path.join(folder, e)) for e in sorted(os.listdir(folder))
            if e != STATE_FILE and os.path.isfile(os.path.join(folder, e))}


def _verify_checkpoint(folder: str) -> Dict[str, Any]:
    """The checkpoint's state.json, after checking every file against the sha256 it records
    (checkpoints written before checksums have none: nothing to check)."""
    from .checkpoint import CheckpointError, sha256_file

    path = os.path.join(folder, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"resume: {path} is not valid JSON ({exc})") from exc
    for name, digest in (state.get("sha256") or {}).items():
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise CheckpointError(f"resume: {file} is missing from the checkpoint")
        if sha256_file(file) != digest:
            raise CheckpointError(f"resume: {file} does not match the sha256 recorded in {path} (corrupted); "
                                  f"delete {folder} to resume from the checkpoint before it")
    return state


# Progress-bar fields: the loss and its parts (stage 1), the mean gates by class (stage 2).
_POSTFIX = ("loss", "ce_affirm", "ce_reject", "alpha_malicious", "alpha_benign", "beta_malicious", "beta_benign")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _run(stage: _Stage, args: Dict[str, Any], out: str, *, accelerator, checkpoint: Optional[str], per_step: int,
         batch_size: int, epochs: int, max_steps: Optional[int], lr: float, weight_decay: float,
         max_grad_norm: Optional[float], seed: int, shuffle: bool, save_steps: Optional[int],
         save_total_limit: Optional[int], progress: bool) -> TrainResult:
    """The loop shared by both stages (see the module docstring for the contract)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    accum = per_step // batch_size
    main = accelerator.is_main_process
    nproc = accelerator.num_processes
    n = len(stage.features)
    batches_per_proc = math.ceil(math.ceil(n / batch_size) / nproc)
    steps_per_epoch = math.ceil(batches_per_proc / accum)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)

    state = {"global_step": 0, "epoch": 0, "windows_done": 0, "examples_seen": 0, "num_processes": nproc}
    if checkpoint is not None:
        saved = _verify_checkpoint(checkpoint)
        stage.load_weights(stage.model, checkpoint)
        state.update({k: v for k, v in saved.items() if k not in ("sha256", "finished")})
        if state["num_processes"] != nproc:
            raise ValueError(f"resume: {checkpoint} was written by {state['num_processes']} processes, now {nproc} "
                             f"(the data position depends on it)")

    optimizer = torch.optim.AdamW(stage.param_groups or stage.params, lr=lr, weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(stage.model, optimizer)
    if checkpoint is not None:             # checked against its sha256 above (when recorded)
        optimizer.load_state_dict(_load_torch(os.path.join(checkpoint, OPTIMIZER_FILE)))

    log_path = os.path.join(out, LOG_FILE)
    if main:
        atomic_write_text(os.path.join(out, INCOMPLETE_FILE), json.dumps(
            {"stage": stage.name, "note": "a training run is under way or was interrupted; resume it "
             "(resume=True / --resume) or start again (overwrite=True / --overwrite)"}, indent=2) + "\n")
        _clean_debris(out)
        for entry in FINAL_ENTRIES:             # outputs of an earlier call: never mixed with this run's
            _remove(os.path.join(out, entry))
        if checkpoint is not None and os.path.exists(log_path):    # drop lines past the checkpoint
            atomic_write_text(log_path, "".join(_log_lines_upto(log_path, state["global_step"])))
        atomic_write_text(os.path.join(out, ARGS_FILE), json.dumps(args, indent=2, sort_keys=True, default=str))
    accelerator.wait_for_everyone()

    def save_checkpoint(finished: bool) -> None:
        ckpt = os.path.join(out, CHECKPOINTS, f"step-{state['global_step']:08d}")
        tmp = ckpt + ".tmp"
        if main:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
            stage.save_weights(accelerator.unwrap_model(model), tmp)
            torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
        accelerator.wait_for_everyone()
        if main:             # state.json last: a folder without it is never resumed from
            atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(
                {**state, "finished": finished, "sha256": _checkpoint_sums(tmp)}, indent=2))
            _remove(ckpt)
            os.replace(tmp, ckpt)
            if save_total_limit:
                folder = os.path.join(out, CHECKPOINTS)
                done = sorted((e for e in os.listdir(folder) if e.startswith("step-") and e[5:].isdigit()),
                              key=lambda e: int(e[5:]))
                for old in done[:-save_total_limit]:
                    _remove(os.path.join(folder, old))
        accelerator.wait_for_everyone()

    if checkpoint is not None:
        rng_path = os.path.join(checkpoint, f"rng-{accelerator.process_index}.pt")
        if os.path.exists(rng_path):
            _set_rng_state(_load_torch(rng_path))

    losses: List[float] = []
    shown: Dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=min(state["global_step"], total_steps), disable=not (progress and main),
               desc=f"train-{stage.name}", dynamic_ncols=True)
    start = time.time()
    log = open(log_path, "a", encoding="utf-8") if main else None
    try:
        model.train()
        done = state["global_step"] >= total_steps
        while not done and state["epoch"] < epochs:
            order = _epoch_order(n, seed, state["epoch"], shuffle)
            skip = state["windows_done"] * accum * batch_size * nproc
            subset = [stage.features[i] for i in order[skip:]]
            if not subset:                      # a checkpoint taken exactly at an epoch's end
                state.update(epoch=state["epoch"] + 1, windows_done=0)
                continue
            loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=stage.collate,
                                generator=torch.Generator().manual_seed(0))     # never touches the global RNG
            loader = accelerator.prepare_data_loader(loader)
            window: List[Dict[str, torch.Tensor]] = []
            batches = iter(loader)
            while True:
                batch = next(batches, None)
                if batch is not None:
                    window.append(batch)
                    if len(window) < accum:
                        continue
                if not window:
                    break
                # ---- one optimizer step over the window (mean per-example loss)
                count = sum(int(b["input_ids"].shape[0]) // stage.rows_per_example for b in window)
                sums: Dict[str, torch.Tensor] = {}
                for j, b in enumerate(window):
                    sync = j == len(window) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        per_example, stats = stage.loss(model, b)
                        accelerator.backward(per_example.sum() / count)
                    _accumulate(sums, "loss", per_example.detach())
                    for k in stage.stat_names:
                        _accumulate(sums, k, stats[k].detach())
                    for k in stage.class_stats:
                        for y, tag in ((1, "malicious"), (0, "benign")):
                            sel = b["label"] == y
                            _accumulate(sums, f"{k}_{tag}", stats[k].detach()[sel])
                if max_grad_norm:
                    accelerator.clip_grad_norm_(stage.params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window = []
                state["global_step"] += 1
                state["windows_done"] += 1
                state["examples_seen"] += count * nproc
                means = _reduce_means(accelerator, sums)
                losses.append(means["loss"])
                record = {"step": state["global_step"],
                          "epoch": round(state["epoch"] + min(1.0, state["windows_done"] / steps_per_epoch), 4),
                          "lr": lr, "examples": state["examples_seen"], **means,
                          "elapsed_s": round(time.time() - start, 3)}
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                shown.update(means)             # a class absent from this step keeps its last value
                bar.set_postfix({k: _fmt(shown[k]) for k in _POSTFIX if k in shown}, refresh=False)
                if state["global_step"] >= total_steps:
                    done = True
                    break
                if save_steps and state["global_step"] % save_steps == 0:
                    save_checkpoint(finished=False)
            if not done or state["windows_done"] >= steps_per_epoch:
                state.update(epoch=state["epoch"] + 1, windows_done=0)
        finished = state["global_step"] >= total_steps
        save_checkpoint(finished=finished)        # the newest checkpoint always holds the final state
        if main:
            _publish_final(stage, accelerator.unwrap_model(model), out)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        if log is not None:
            log.close()
        accelerator.free_memory()
    return TrainResult(output_dir=out, global_step=state["global_step"], finished=finished, losses=losses,
                       log_file=log_path)


def _log_lines_upto(path: str, step: int) -> List[str]:
    """The log's lines up to ``step`` (a resumed run rewrites the rest); a last line cut
    short by a kill is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"resume: {path}: line {i + 1} is not valid JSON") from None
        if record.get("step", 0) <= step:
            keep.append(line + "\n")
    return keep


def _publish_final(stage: _Stage, model: nn.Module, out: str) -> None:
    """Write the final outputs into a staging folder, move them into ``out`` one rename each,
    then remove the run-in-progress marker: a kill at any point leaves either the marker
    (an unfinished run, refused by the loaders) or the complete outputs."""
    staging = os.path.join(out, STAGING_DIR)
    _remove(staging)
    os.makedirs(staging)
    stage.save_final(model, staging)
    for entry in sorted(os.listdir(staging)):
        _remove(os.path.join(out, entry))
        os.replace(os.path.join(staging, entry), os.path.join(out, entry))
    os.rmdir(staging)
    os.remove(os.path.join(out, INCOMPLETE_FILE))


def _accumulate(sums: Dict[str, torch.Tensor], name: str, values: torch.Tensor) -> None:
    """sums[name] = [sum, count] (float64), for means over a step (and across processes)."""
    v = torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                          device=values.device)])
    sums[name] = sums[name] + v if name in sums else v


def _reduce_means(accelerator, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
    names = sorted(sums)
    stacked = torch.stack([sums[k] for k in names])                     # (S, 2)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="sum")
    out = {}
    for k, (s, c) in zip(names, stacked.tolist()):
        if c > 0:
            out[k] = s / c
    return out


@contextlib.contextmanager
def _training_state(model: nn.Module, gradient_checkpointing: bool):
    """Restore requires_grad flags, train/eval mode and checkpointing afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    turn_on = gradient_checkpointing and not hf_compat.checkpointing_enabled(model)
    try:
        if turn_on:
            hf_compat.set_checkpointing(model, True)
        yield
    finally:
        if turn_on:
            hf_compat.set_checkpointing(model, False)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _make_accelerator():
    from accelerate import Accelerator

    # mixed_precision="no" explicitly: autocast would hand the fused op bf16 inputs with
    # fp32 weights; bf16 training casts the model instead (bf16=True).
    return Accelerator(mixed_precision="no")


def _prepare_out(accelerator, out: str, overwrite: bool, resume: bool, args: Dict[str, Any]) -> Optional[str]:
    checkpoint = _output_state(out, overwrite, resume)
    if checkpoint is not None:
        _check_resume_args(out, args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if checkpoint is None and overwrite and os.path.isdir(out):
            _clear_owned(out)
        os.makedirs(out, exist_ok=True)
    accelerator.wait_for_everyone()
    return checkpoint


def _fingerprints(**paths) -> Dict[str, Optional[str]]:
    """name -> sha256 of the file (None for an absent optional file)."""
    return {k: None if p is None else mdata.file_fingerprint(p) for k, p in paths.items()}


def _adapter_fingerprint(folder) -> Optional[str]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(os.fspath(folder), name)
        if os.path.exists(path):
            return mdata.file_fingerprint(path)
    return None


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
        refusing answers to the same instructions (see ``mogu.data``).
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

    from .checkpoint import read_safetensors

    if expert not in EXPERTS:
        raise ValueError(f"train_expert: expert must be one of {list(EXPERTS)}, got {expert!r}")
    if hf_compat.has_peft_adapter(model):
        raise ValueError("train_expert: the model already carries a peft adapter; pass the plain base model")
    if is_patched(model):
        raise ValueError("train_expert: the model is MoGU-patched; experts are trained on the plain base model "
                         "(mogu.unpatch(model) first)")
    _accumulation(pairs_per_step, batch_size, "pairs_per_step")
    _check_positive("epochs", epochs)
    _check_positive("max_steps", max_steps, allow_none=True)
    _check_positive("max_length", max_length)
    _check_positive("save_steps", save_steps, allow_none=True)
    MoGUConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)          # validates r, dropout
    targets = MoGUConfig(target_modules=target_modules).resolve_targets(getattr(model.config, "model_type", None))
    if layers is not None:       # peft takes exact module names: only the chosen layers
        targets = [n for n, _ in find_targets(model, MoGUConfig(target_modules=target_modules, layers=layers))]

    pairs = mdata.load_pairs(affirm, reject)                                   # DataError: nothing written yet
    features = mdata.tokenize_pairs(tokenizer, pairs, max_length, system)
    out = os.fspath(out)
    args = dict(stage="expert", expert=expert, data=_fingerprints(affirm=affirm, reject=reject),
                affirm=os.fspath(affirm),
                reject=os.fspath(reject), r=int(r), lora_alpha=float(lora_alpha), lora_dropout=float(lora_dropout),
                target_modules=targets, layers=layers, lr=lr, per_step=pairs_per_step, batch_size=batch_size,
                epochs=epochs,
                max_steps=max_steps, max_length=max_length, system=system, save_steps=save_steps, seed=seed,
                shuffle=shuffle, weight_decay=weight_decay, max_grad_norm=max_grad_norm, bf16=bool(bf16),
                gradient_checkpointing=bool(gradient_checkpointing), examples=len(features))
    accelerator = _make_accelerator()
    checkpoint = _prepare_out(accelerator, out, overwrite, resume, args)

    from accelerate.utils import set_seed
    set_seed(seed)
    if bf16:
        model.to(torch.bfloat16)
    with _training_state(model, gradient_checkpointing):
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

            stage = _Stage(
                name="expert", model=peft_model,
                params=[p for p in peft_model.parameters() if p.requires_grad], features=features,
                collate=mdata.PairCollator(mdata.pad_id_of(tokenizer)),
                loss=lambda m, b: expert_loss(m, b, expert), stat_names=("ce_affirm", "ce_reject"),
                rows_per_example=2,
                save_weights=lambda m, d: m.save_pretrained(d),
                load_weights=load_weights,
                save_final=save_final)
            return _run(stage, args, out, accelerator=accelerator, checkpoint=checkpoint, per_step=pairs_per_step,
                        batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, seed=seed, shuffle=shuffle, save_steps=save_steps,
                        save_total_limit=save_total_limit, progress=progress)
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
    from .checkpoint import from_pretrained, load_official, save_pretrained

    _accumulation(examples_per_step, batch_size, "examples_per_step")
    _check_positive("epochs", epochs)
    _check_positive("max_steps", max_steps, allow_none=True)
    _check_positive("max_length", max_length)
    _check_positive("save_steps", save_steps, allow_none=True)
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
    _check_positive("expert_lr", expert_lr, allow_none=True)
    base = None
    if target_modules or layers is not None:
        base = MoGUConfig(target_modules=target_modules, layers=layers)
    config = _expert_config(model, glad, unwill, base)
    if config.auto_layers is not None:
        raise ValueError(f"train_router: layers={config.layers!r} must be resolved first (mogu.select_layers)")
    hidden = _router_file_hidden(router) if router is not None else None
    if is_patched(model):
        current = next(iter(patched_modules(model).values())).router_hidden
        if router_hidden is not None and router_hidden != current and router is None:
            raise ValueError(f"train_router: the model is patched with router_hidden={current}, got {router_hidden}")
        hidden = hidden or current
    hidden = hidden or router_hidden or ROUTER_DEFAULTS["router_hidden"]
    config = MoGUConfig(**{**config.to_dict(), "router_hidden": int(hidden)})

    out = os.fspath(out)
    args = dict(stage="router", data=_fingerprints(data=data, labels=labels), data_file=os.fspath(data),
                labels_file=None if labels is None else os.fspath(labels), glad=_adapter_fingerprint(glad),
                unwill=_adapter_fingerprint(unwill),
                router=None if router is None else mdata.file_fingerprint(router), router_hidden=int(hidden),
                target_modules=config.target_modules, layers=config.layers, joint=bool(joint),
                expert_lr=expert_lr if joint else None, lam=lam, gate_tokens=gate_tokens, lr=lr,
                per_step=examples_per_step,
                batch_size=batch_size, epochs=epochs, max_steps=max_steps, max_length=max_length, system=system,
                expert_dropout=float(expert_dropout), save_steps=save_steps, seed=seed, shuffle=shuffle,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm, bf16=bool(bf16),
                gradient_checkpointing=bool(gradient_checkpointing), examples=len(features))
    accelerator = _make_accelerator()
    checkpoint = _prepare_out(accelerator, out, overwrite, resume, args)

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
    with _training_state(model, gradient_checkpointing):
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

            stage = _Stage(
                name="router", model=model, params=heads + experts, param_groups=groups, features=features,
                collate=mdata.LabelledCollator(mdata.pad_id_of(tokenizer)),
                loss=lambda m, b: router_loss(m, b, collector, lam, gate_tokens),
                stat_names=("ce", "gate_mse", "alpha", "beta"), class_stats=("alpha", "beta"),
                save_weights=lambda m, d: save_pretrained(m, d),
                load_weights=lambda m, d: from_pretrained(m, d),
                save_final=save_final)
            return _run(stage, args, out, accelerator=accelerator, checkpoint=checkpoint, per_step=examples_per_step,
                        batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, seed=seed, shuffle=shuffle, save_steps=save_steps,
                        save_total_limit=save_total_limit, progress=progress)
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
