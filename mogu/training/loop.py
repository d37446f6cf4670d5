"""The training loop shared by both stages, and its output folder.

Both stages: one optimizer step per ``pairs_per_step`` / ``examples_per_step`` examples,
the loss being the mean per-example loss over them (so batch_size only changes speed and
memory, not the objective; the last step of an epoch may hold fewer examples); AdamW
(torch defaults besides lr); constant learning rate. Runs through ``accelerate`` (device
placement, DDP under ``accelerate launch``; no hand-written distributed code).

Output folder ``out``::

    training_args.json        the run's arguments and data fingerprints (checked on resume)
    training_log.jsonl        one JSON object per optimizer step (loss and its parts, gates)
    checkpoints/step-NNNNNNNN/ accelerate's save_state folder (optimizer.bin,
                              random_states_<rank>.pkl) holding the stage's own weights (a peft
                              adapter / own format) instead of the full model, plus state.json;
                              written every save_steps and at the end
    stage 1: adapter_config.json + adapter_model.safetensors (final expert), mogu_checksums.json
    stage 2: mogu_config.json + mogu_model.safetensors (final), folded/ (deployment copy)
    training_incomplete.json  present while a run is under way (or was killed): loaders refuse
                              the folder until a run finishes

``resume=True`` continues from the newest checkpoint with its optimizer state, data
position and RNG state: on CPU a resumed run is bitwise the uninterrupted run.

What accelerate does and what this module adds: checkpoints are written and read by
``Accelerator.save_state`` / ``load_state`` (optimizer, every RNG: python, numpy, torch,
CUDA), with a save/load pre-hook that swaps accelerate's full-model state dict for the
stage's own trainable weights (a 7B base model is never copied into a checkpoint); the data
position is restored with ``Accelerator.skip_first_batches``; gradients are accumulated
under ``Accelerator.no_sync`` (what ``Accelerator.accumulate`` does inside) with the step
taken explicitly, because the objective is the mean per-example loss over a step whose
last window may be short (``accumulate`` divides by a fixed number of batches). Kept here,
because accelerate has none of it: the crash safety below, the sha256 check of every
checkpoint file before anything reads it, and the rotation (accelerate's
``total_limit`` deletes old checkpoints before the new one is complete; here they go only
after it is in place).

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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import hf_compat
from ..checkpoint import TRAINING_INCOMPLETE, CheckpointError, atomic_write_text, read_appended_jsonl, sha256_file
from .data import file_fingerprint

CHECKPOINTS = "checkpoints"
LOG_FILE = "training_log.jsonl"
ARGS_FILE = "training_args.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.bin"                  # accelerate save_state's names
RNG_FILE = "random_states_{rank}.pkl"
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

# ================================================================ the loop
@dataclass
class Stage:
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


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def accumulation_steps(per_step: int, batch_size: int, per_step_name: str) -> int:
    check_positive(per_step_name, per_step)
    check_positive("batch_size", batch_size)
    if per_step % batch_size:
        raise ValueError(f"{per_step_name}={per_step} must be a multiple of batch_size={batch_size}")
    return per_step // batch_size


def output_state(out: str, overwrite: bool, resume: bool) -> Optional[str]:
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


def _checkpoint_sums(folder: str) -> Dict[str, str]:
    return {e: sha256_file(os.path.join(folder, e)) for e in sorted(os.listdir(folder))
            if e != STATE_FILE and os.path.isfile(os.path.join(folder, e))}


def verify_checkpoint(folder: str, rank: int = 0) -> Dict[str, Any]:
    """The checkpoint's state.json, after checking every file against the sha256 it records
    (checkpoints written before checksums have none: nothing to check) and that the
    optimizer state and process ``rank``'s RNG state are there (accelerate's load_state
    would only log a missing RNG file, and the resumed run would silently differ)."""
    for name in (OPTIMIZER_FILE, RNG_FILE.format(rank=rank)):
        if not os.path.exists(os.path.join(folder, name)):
            older = os.path.exists(os.path.join(folder, "optimizer.pt"))
            raise CheckpointError(f"resume: {os.path.join(folder, name)} is missing" + (
                "; the checkpoint was written by an older mogu (optimizer.pt, rng-<rank>.pt): resume it with that "
                "version or start again" if older else ""))
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


def run_stage(stage: Stage, args: Dict[str, Any], out: str, *, accelerator, checkpoint: Optional[str],
              per_step: int, batch_size: int, epochs: int, max_steps: Optional[int], lr: float, weight_decay: float,
              max_grad_norm: Optional[float], seed: int, shuffle: bool, save_steps: Optional[int],
              save_total_limit: Optional[int], progress: bool) -> TrainResult:
    """The loop shared by both stages (see the module docstring for the contract): sets up
    the optimizer and the resumed state, then runs :func:`_loop`."""
    accum = per_step // batch_size
    nproc = accelerator.num_processes
    n = len(stage.features)
    batches_per_proc = math.ceil(math.ceil(n / batch_size) / nproc)
    steps_per_epoch = math.ceil(batches_per_proc / accum)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)

    state = {"global_step": 0, "epoch": 0, "windows_done": 0, "examples_seen": 0, "num_processes": nproc}
    if checkpoint is not None:
        saved = verify_checkpoint(checkpoint, accelerator.process_index)
        state.update({k: v for k, v in saved.items() if k not in ("sha256", "finished")})
        if state["num_processes"] != nproc:
            raise ValueError(f"resume: {checkpoint} was written by {state['num_processes']} processes, now {nproc} "
                             f"(the data position depends on it)")

    optimizer = torch.optim.AdamW(stage.param_groups or stage.params, lr=lr, weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(stage.model, optimizer)
    hooks = _own_weights_in_accelerate_state(accelerator, stage)
    try:
        if checkpoint is not None:             # every file checked against its sha256 above
            _load_state(accelerator, checkpoint)
        return _loop(stage, args, out, accelerator=accelerator, model=model, optimizer=optimizer,
                     checkpoint=checkpoint, state=state, accum=accum, n=n, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps, batch_size=batch_size, epochs=epochs, lr=lr,
                     max_grad_norm=max_grad_norm, seed=seed, shuffle=shuffle, save_steps=save_steps,
                     save_total_limit=save_total_limit, progress=progress)
    finally:
        for hook in hooks:
            hook.remove()


def _own_weights_in_accelerate_state(accelerator, stage: Stage) -> list:
    """Make ``save_state`` / ``load_state`` write and read the stage's own weights (a peft
    adapter, or the MoGU own format) instead of the full model's state dict. Returns the
    hook handles (remove them when the run ends)."""
    def save_hook(models, weights, output_dir):
        weights.clear()                                   # not the base model: only what trains
        if accelerator.is_main_process:
            stage.save_weights(accelerator.unwrap_model(models[0]), output_dir)

    def load_hook(models, input_dir):
        model = models.pop()                              # accelerate would look for model.safetensors
        stage.load_weights(accelerator.unwrap_model(model), input_dir)

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]


def _load_state(accelerator, checkpoint: str) -> None:
    """``accelerator.load_state`` (weights through the hook, optimizer, RNG); CheckpointError
    naming the folder when a file cannot be read."""
    try:
        accelerator.load_state(checkpoint)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"resume: cannot read the checkpoint {checkpoint} ({type(exc).__name__}: {exc})") \
            from exc


def _loop(stage: Stage, args: Dict[str, Any], out: str, *, accelerator, model, optimizer, checkpoint: Optional[str],
          state: Dict[str, Any], accum: int, n: int, steps_per_epoch: int, total_steps: int, batch_size: int,
          epochs: int, lr: float, max_grad_norm: Optional[float], seed: int, shuffle: bool,
          save_steps: Optional[int], save_total_limit: Optional[int], progress: bool) -> TrainResult:
    """The epochs: one optimizer step per window of ``accum`` batches, a checkpoint every
    ``save_steps`` steps and at the end, then the final outputs (module docstring)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    nproc = accelerator.num_processes

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
        if main and os.path.exists(tmp):
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)      # own weights (hook), optimizer, RNG of every process
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
            epoch_data = [stage.features[i] for i in _epoch_order(n, seed, state["epoch"], shuffle)]
            loader = DataLoader(epoch_data, batch_size=batch_size, shuffle=False, collate_fn=stage.collate,
                                generator=torch.Generator().manual_seed(0))     # never touches the global RNG
            loader = accelerator.prepare_data_loader(loader)
            if state["windows_done"]:           # resumed mid-epoch: this process's batches already done
                loader = accelerator.skip_first_batches(loader, state["windows_done"] * accum)
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
    records, _ = read_appended_jsonl(path, "resume cannot truncate the log; delete it or start a new run")
    return [line + "\n" for _, record, line in records if record.get("step", 0) <= step]


def _publish_final(stage: Stage, model: nn.Module, out: str) -> None:
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
def training_state(model: nn.Module, gradient_checkpointing: bool):
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


def make_accelerator():
    from accelerate import Accelerator

    # mixed_precision="no" explicitly: autocast would hand the fused op bf16 inputs with
    # fp32 weights; bf16 training casts the model instead (bf16=True).
    return Accelerator(mixed_precision="no")


def prepare_output(accelerator, out: str, overwrite: bool, resume: bool, args: Dict[str, Any]) -> Optional[str]:
    checkpoint = output_state(out, overwrite, resume)
    if checkpoint is not None:
        _check_resume_args(out, args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if checkpoint is None and overwrite and os.path.isdir(out):
            _clear_owned(out)
        os.makedirs(out, exist_ok=True)
    accelerator.wait_for_everyone()
    return checkpoint


def fingerprints(**paths) -> Dict[str, Optional[str]]:
    """name -> sha256 of the file (None for an absent optional file)."""
    return {k: None if p is None else file_fingerprint(p) for k, p in paths.items()}


def adapter_fingerprint(folder) -> Optional[str]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(os.fspath(folder), name)
        if os.path.exists(path):
            return file_fingerprint(path)
    return None
