"""Argument checks for ``mogu_linear`` and its accumulation-dtype rule: one place that
states the op contract's checkable part (docs/design.md section 2).

Every check raises ``ValueError`` naming the offending argument, its shape/dtype/device
and what was expected, so a caller never has to decode a shape error from deep inside a
GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gate math, of the rank-space activations and of the final sum for
    inputs of ``dtype``: fp32 for fp32/fp16/bf16, fp64 for fp64 (never below fp32, so half
    inputs do not round the sigmoid or the gate sum). Every backend follows this rule:
    the reference computes in it, the C++ extension saves its backward state in it, and
    the Triton kernels (fp32/fp16/bf16 only) accumulate in fp32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_mogu_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    scaling: float,
    base_rows: Optional[torch.Tensor] = None,
) -> None:
    """Validate the arguments of ``mogu_linear`` (see its docstring for the contract).

    Rules: x (..., K) floating; weight (N, K), bias (N,) or None, lora_A (E, r, K) and
    lora_B (E, N, r) in x's dtype; router_weight (E, K) and router_bias (E,) floating
    (any float dtype: gate math runs in fp32); everything on x's device; base_rows, when
    given, bool with shape x.shape[:-1].
    """
    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B),
             ("router_weight", router_weight), ("router_bias", router_bias)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"mogu_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"mogu_linear: {name} must be floating point, got {_describe(t)}")
        if t.device != x.device:
            raise ValueError(
                f"mogu_linear: {name} is on {t.device} but x is on {x.device} ({name}: {_describe(t)})")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"mogu_linear: x must be (..., K) with K > 0, got {_describe(x)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"mogu_linear: weight must be (N, K={K}), got {_describe(weight)}")
    N = weight.shape[0]
    if lora_A.dim() != 3 or lora_A.shape[2] != K or lora_A.shape[0] == 0 or lora_A.shape[1] == 0:
        raise ValueError(f"mogu_linear: lora_A must be (E, r, K={K}) with E, r > 0, got {_describe(lora_A)}")
    E, r = lora_A.shape[0], lora_A.shape[1]
    if tuple(lora_B.shape) != (E, N, r):
        raise ValueError(f"mogu_linear: lora_B must be (E={E}, N={N}, r={r}), got {_describe(lora_B)}")
    if tuple(router_weight.shape) != (E, K):
        raise ValueError(f"mogu_linear: router_weight must be (E={E}, K={K}), got {_describe(router_weight)}")
    if tuple(router_bias.shape) != (E,):
        raise ValueError(f"mogu_linear: router_bias must be (E={E},), got {_describe(router_bias)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"mogu_linear: bias must be (N={N},) or None, got {_describe(bias)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)) + (
            (("bias", bias),) if bias is not None else ()):
        if t.dtype != x.dtype:
            raise ValueError(f"mogu_linear: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                             f"({name}: {_describe(t)}); cast it to {x.dtype}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ValueError(f"mogu_linear: scaling must be a Python float, got {type(scaling).__name__}")
    if base_rows is not None:
        if not isinstance(base_rows, torch.Tensor) or base_rows.dtype != torch.bool:
            raise ValueError("mogu_linear: base_rows must be a bool tensor shaped like x.shape[:-1]")
        if tuple(base_rows.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mogu_linear: base_rows must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                             f"got {tuple(base_rows.shape)}")
        if base_rows.device != x.device:
            raise ValueError(f"mogu_linear: base_rows is on {base_rows.device} but x is on {x.device}")
