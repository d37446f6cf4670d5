"""Helpers shared by the modules that run a model over prompt files (data building,
evaluation, calibration, probing): batched greedy-decoding inputs and outputs, the model's
name for resume checks, and claiming an output folder.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one batch.

    Returns input_ids (B, T) int64 (``pad_id`` on the left) and attention_mask (B, T)
    int64 (1 on real tokens), T = the longest row. Every row must be non-empty.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad: every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def eos_ids(model: nn.Module, tokenizer) -> List[int]:
    """Every id that ends an answer: the generation config's eos id(s) and the tokenizer's."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def greedy_kwargs() -> Dict:
    """Generation kwargs for greedy decoding whatever sampling defaults the model's config carries."""
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def cut_answer(ids: Sequence[int], stop_ids: Iterable[int]) -> Tuple[List[int], bool]:
    """The answer tokens before the first stop id, and whether a stop id was found."""
    stop = set(stop_ids)
    for i, t in enumerate(ids):
        if int(t) in stop:
            return [int(x) for x in ids[:i]], True
    return [int(x) for x in ids], False


def model_name(model: nn.Module) -> str:
    """The model's ``config.name_or_path`` (or its class name): recorded in settings so a
    resumed run can tell it is continuing with the same model."""
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def claim_output_folder(out, owned: Sequence[str], *, overwrite: bool, resume: bool, caller: str,
                        resume_means: str) -> str:
    """Create ``out`` and settle the files of ``owned`` already in it: overwrite deletes
    them (only them), resume keeps them, neither raises FileExistsError naming them.
    ``caller`` and ``resume_means`` word that error. Returns ``out`` as a str."""
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    present = [f for f in owned if os.path.exists(os.path.join(out, f))]
    if present and overwrite:
        for f in present:
            os.remove(os.path.join(out, f))
    elif present and not resume:
        raise FileExistsError(f"{caller}: {out} already holds {present}; pass resume=True ({resume_means}) or "
                              f"overwrite=True (start again)")
    return out
