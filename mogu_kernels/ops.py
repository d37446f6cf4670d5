"""The public op ``mogu_linear``: pick a backend, validate, run it.

The fixed cost of a call matters (a decode step calls it once per patched layer, at shapes
where the kernel itself takes microseconds), so the common path is one cached backend
look-up and one op call (``Backend.fast``, the C++ entry, where the backend has one):
backends whose op checks its own arguments (``Backend.checks_args``: the C++ extension's
``cpp`` and ``cuda``, whose TORCH_CHECKs cover the contract) skip the Python checks, which
then run only when the op raised, to turn a contract violation into the documented
``ValueError`` naming the argument. Other backends are checked first.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import resolve_backend
from .validation import check_mogu_linear_args

_is_compiling = torch.compiler.is_compiling


def mogu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    scaling: float,
    backend: Optional[str] = None,
    *,
    base_rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gated mixture of E LoRA experts over one linear layer (MoGU: E=2, [unwill, glad]).

    Shapes: x (..., K); weight (N, K); bias (N,) or None; lora_A (E, r, K);
    lora_B (E, N, r); router_weight (E, K); router_bias (E,); scaling a float
    (lora_alpha / r). x, weight, bias, lora_A and lora_B share one dtype (fp32, fp16,
    bf16 or fp64); the router tensors may be any float dtype.

    Returns (y, gates)::

        gates = sigmoid(x @ router_weight.T + router_bias)                  (..., E)
        y = gates.sum(-1, keepdim=True) * (x @ weight.T + bias)
            + scaling * sum_e gates[..., e, None] * (x @ lora_A[e].T @ lora_B[e].T)   (..., N)

    both in x's dtype; the gate math runs in fp32 (fp64 for fp64 x). Differentiable in x, lora_A, lora_B,
    router_weight and router_bias (weight and bias are treated as frozen).

    base_rows: optional bool tensor shaped x.shape[:-1]. A True row is computed as the
    plain base layer, y = x @ weight.T + bias (its gates are still returned), so rows that
    must run as base can share one call with MoGU rows (used by the vLLM plugin).

    backend: "reference", "triton", "cpp", "cuda" or None for the fastest available on
    x's device; the MOGU_BACKEND environment variable overrides None. Raises ValueError
    for arguments that break the contract (naming the argument) or an unknown backend,
    RuntimeError for a named backend that cannot run here.
    """
    if not isinstance(x, torch.Tensor):
        check_mogu_linear_args(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
    impl = resolve_backend(x.device, backend)
    if impl.checks_args and scaling.__class__ is float:
        try:
            if impl.fast is not None and not _is_compiling():
                out = impl.fast(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
                if out is not NotImplemented:
                    return out
            return impl.fn(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
        except Exception:
            # A contract violation raises its documented ValueError here; any other failure
            # (nothing wrong with the arguments) is the op's own error.
            check_mogu_linear_args(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
            raise
    check_mogu_linear_args(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
    return impl.fn(x, weight, bias, lora_A, lora_B, router_weight, router_bias, float(scaling), base_rows)
