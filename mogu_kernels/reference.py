"""The ``reference`` backend: the op contract of ``mogu_linear`` in plain PyTorch.

It is the executable specification every other backend is tested against, the fallback
on any device, and (because it already works on the folded router vectors and one stacked
shrink) the "folded plain-PyTorch" baseline of the benchmarks. Autograd comes for free.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def gate_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the gate math: fp32, or fp64 for fp64 inputs (never below fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def router_gates(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor) -> torch.Tensor:
    """gates = sigmoid(x @ router_weight.T + router_bias) in ``gate_dtype(x)``: (..., K) -> (..., E)."""
    acc = gate_dtype(x)
    logits = F.linear(x.to(acc), router_weight.to(acc), router_bias.to(acc))
    return torch.sigmoid(logits)


def stacked_lora_B(lora_B: torch.Tensor) -> torch.Tensor:
    """(E, N, r) -> (N, E*r): the expand matrix [B_0 | B_1 | ...] of the rank-space formulation."""
    E, N, r = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(N, E * r)


def reference_mogu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    scaling: float,
    base_rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``mogu_linear``; arguments and result as in :func:`mogu_kernels.mogu_linear`.

    GEMMs run in x's dtype; the router logits, sigmoid, gate sum and rank-space gate
    scaling run in fp32; y is cast back to x's dtype once at the end.
    """
    E, r, K = lora_A.shape
    gates = router_gates(x, router_weight, router_bias)                       # (..., E) fp32
    base = F.linear(x, weight, bias)                                           # (..., N)
    shrink = F.linear(x, lora_A.reshape(E * r, K))                             # (..., E*r)
    mix = gates
    if base_rows is not None:
        # A base row gets gate sum 1 and no expert delta: y = x W^T + b exactly.
        mix = torch.where(base_rows.unsqueeze(-1), torch.zeros_like(gates), gates)
    acc = gates.dtype
    scaled = (shrink.to(acc).unflatten(-1, (E, r)) * (scaling * mix).unsqueeze(-1)).flatten(-2)
    delta = F.linear(scaled.to(x.dtype), stacked_lora_B(lora_B))               # (..., N)
    gate_sum = mix.sum(-1, keepdim=True)
    if base_rows is not None:
        gate_sum = torch.where(base_rows.unsqueeze(-1), torch.ones_like(gate_sum), gate_sum)
    y = (gate_sum * base.to(acc) + delta.to(acc)).to(x.dtype)
    return y, gates.to(x.dtype)
