"""The two MoGU training objectives (docs/design.md section 1).

Stage 1, per pair (same instruction, a compliant ``affirm`` and a refusing ``reject``
answer), the published ratio loss::

    glad:   CE(affirm) / CE(reject)        unwill: CE(reject) / CE(affirm)

Stage 2, per example with label y (1 malicious, 0 benign)::

    CE(response) + lam * [mean((a - t_a)^2) + mean((b - t_b)^2)],  t_a = y, t_b = 1 - y

CE = mean token cross-entropy over the answer's tokens; a = unwill gate, b = glad gate,
the means over every patched layer and the example's gate tokens.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EXPERTS
from ..patching import patched_modules
from .data import IGNORE_INDEX

def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy over the labelled tokens.

    logits (B, T, V) any float dtype; labels (B, T) int64 with -100 where no loss is
    taken (prompt, padding). Position t predicts labels[t] from logits[t - 1]. Returns
    (B,) fp32. ValueError if a row has no labelled token.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                               ignore_index=IGNORE_INDEX, reduction="none")          # (B, T-1)
    mask = shift_labels != IGNORE_INDEX
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
        tokens = tokens & (batch["labels"] == IGNORE_INDEX)
    mask = tokens.to(g.dtype)[None, :, :, None]                            # (1, B, T, 1)
    denom = tokens.sum(1).clamp_min(1).to(g.dtype) * g.shape[0]           # (B,) layers x tokens
    target = gate_targets(batch["label"]).to(g.device)[None, :, None, :]  # (1, B, 1, 2)
    mse = ((g - target).square() * mask).sum(dim=(0, 2)) / denom[:, None]  # (B, 2)
    mean_gate = (g.detach() * mask).sum(dim=(0, 2)) / denom[:, None]       # (B, 2)
    loss = ce + lam * mse.sum(-1)
    return loss, {"ce": ce, "gate_mse": mse.sum(-1), "alpha": mean_gate[:, 0], "beta": mean_gate[:, 1]}
