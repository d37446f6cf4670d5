"""The ``reference`` backend: the op contract of ``mogu_linear`` in plain PyTorch.

It is the executable specification every other backend is tested against, the fallback
on any device, and (because it already works on the folded router vectors and one stacked
shrink) the "folded plain-PyTorch" baseline of the benchmarks. Autograd comes for free.

It is also the one Python statement of the MoGU math (docs/design.md section 2): every
other Python path that computes the layer calls these functions instead of restating
them. ``MoGULinear``'s LoRA-dropout training path (the experts see dropout(x), so the op's
one-shared-x premise breaks) calls :func:`mix_experts` with its own base output and
shrink; the benchmarks' folded layers use :func:`fold_router_head`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .validation import accumulation_dtype


def gate_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the gate math for input x: ``accumulation_dtype(x.dtype)`` (fp32, fp64 for fp64)."""
    return accumulation_dtype(x.dtype)


def router_gates(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor) -> torch.Tensor:
    """gates = sigmoid(x @ router_weight.T + router_bias) in ``gate_dtype(x)``: (..., K) -> (..., E)."""
    acc = gate_dtype(x)
    logits = F.linear(x.to(acc), router_weight.to(acc), router_bias.to(acc))
    return torch.sigmoid(logits)


def stacked_lora_B(lora_B: torch.Tensor) -> torch.Tensor:
    """(E, N, r) -> (N, E*r): the expand matrix [B_0 | B_1 | ...] of the rank-space formulation."""
    E, N, r = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(N, E * r)


def fold_router_head(weights: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold one published router head into its affine map: logit = v . x + c.

    weights: (W0 (h, K), W1 (K, h), b1 (K,), W2 (1, K), b2 (1,)) of
    Linear(K, h, no bias) -> Linear(h, K) -> Linear(K, 1), no activation in between.
    Returns (v (K,), c ()) in fp32: v = W2 W1 W0, c = W2 b1 + b2 (the thin side is
    multiplied first: W2 W1 is (1, h)). Differentiable in the weights.
    """
    w0, w1, b1, w2, b2 = (t.float() for t in weights)
    w21 = w2 @ w1                                                              # (1, h)
    return (w21 @ w0).squeeze(0), (w2 @ b1 + b2).squeeze(0)


def mix_experts(
    base: torch.Tensor,
    shrink: torch.Tensor,
    gates: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    base_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The gated mixture, given its three inputs: the step every MoGU path shares.

    base (..., N): the base layer's output x W^T + b, in the GEMM dtype (x's dtype).
    shrink (..., E*r): the stacked LoRA shrink [A_0 x | A_1 x | ...], in x's dtype.
    gates (..., E): the router gates in the accumulation dtype (``router_gates``).
    lora_B (E, N, r); scaling: lora_alpha / r; base_rows: bool (...) or None.

    Returns y (..., N) in base's dtype:
        y = sum_e g_e * base + scaling * sum_e g_e * B_e shrink_e
    and on base rows y = base exactly (gate sum 1, no expert delta). The gate scaling of
    the rank-space activations and the final sum run in ``gates.dtype``; the expand GEMM
    runs in base's dtype; y is cast back once at the end.
    """
    E, N, r = lora_B.shape
    mix = gates
    if base_rows is not None:
        # A base row gets gate sum 1 and no expert delta: y = x W^T + b exactly.
        mix = torch.where(base_rows.unsqueeze(-1), torch.zeros_like(gates), gates)
    acc = gates.dtype
    scaled = (shrink.to(acc).unflatten(-1, (E, r)) * (scaling * mix).unsqueeze(-1)).flatten(-2)
    delta = F.linear(scaled.to(base.dtype), stacked_lora_B(lora_B))            # (..., N)
    gate_sum = mix.sum(-1, keepdim=True)
    if base_rows is not None:
        gate_sum = torch.where(base_rows.unsqueeze(-1), torch.ones_like(gate_sum), gate_sum)
    return (gate_sum * base.to(acc) + delta.to(acc)).to(base.dtype)


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
    scaling run in ``accumulation_dtype(x.dtype)``; y is cast back to x's dtype once at
    the end (:func:`mix_experts`).
    """
    E, r, K = lora_A.shape
    gates = router_gates(x, router_weight, router_bias)                       # (..., E) fp32
    base = F.linear(x, weight, bias)                                           # (..., N)
    shrink = F.linear(x, lora_A.reshape(E * r, K))                             # (..., E*r)
    y = mix_experts(base, shrink, gates, lora_B, scaling, base_rows)
    return y, gates.to(x.dtype)
