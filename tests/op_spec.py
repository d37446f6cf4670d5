"""The one float64 statement of the mogu_linear contract, and the one input factory, for
every backend's tests (reference, triton, cpp, cuda): docs/design.md section 2."""
from __future__ import annotations

import torch

# Relative error (by norm) allowed against float64, per input dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def spec_mogu_linear(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows=None):
    """float64, one expert at a time, exactly as docs/design.md section 2 writes it:
    gates = sigmoid(x v^T + c); y = sum(gates) (x W^T + b) + s sum_e g_e B_e A_e x; base
    rows: y = x W^T + b. Differentiable (float64 autograd gives the reference gradients)."""
    x64 = x.double()
    gates = torch.sigmoid(x64 @ router_weight.double().T + router_bias.double())
    base = x64 @ weight.double().T
    if bias is not None:
        base = base + bias.double()
    y = gates.sum(-1, keepdim=True) * base
    for e in range(lora_A.shape[0]):
        y = y + scaling * gates[..., e, None] * (x64 @ lora_A[e].double().T @ lora_B[e].double().T)
    if base_rows is not None:
        y = torch.where(base_rows.unsqueeze(-1), base, y)
    return y, gates


LAYOUTS = ("2d", "3d", "strided_k", "strided_rows", "transposed")
_ALIASES = {"noncontig": "strided_k", "3d_transposed": "transposed"}


def make_x(M: int, K: int, layout: str, dtype, g: torch.Generator) -> torch.Tensor:
    """M rows of K features, laid out as named: 2d, 3d (2, ceil(M/2), K), strided_k
    (non-unit K stride), strided_rows (row stride > K) or transposed (3-D, not viewable as
    (M, K) without a copy)."""
    layout = _ALIASES.get(layout, layout)
    if layout == "2d":
        return torch.randn(M, K, generator=g).to(dtype)
    if layout == "3d":
        return torch.randn(2, (M + 1) // 2, K, generator=g).to(dtype)
    if layout == "strided_k":
        return torch.randn(M, 2 * K, generator=g).to(dtype)[:, ::2]
    if layout == "strided_rows":
        return torch.randn(M, K + 5, generator=g).to(dtype)[:, 3:K + 3]
    if layout == "transposed":
        return torch.randn((M + 1) // 2, 2, K, generator=g).to(dtype).transpose(0, 1)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def make_inputs(M, K, N, r, E=2, bias=True, dtype=torch.float32, three_d=False, seed=0, device="cpu",
                layout="2d", router_dtype=torch.float32):
    """Fresh random, non-zero (x, weight, bias, lora_A, lora_B, router_weight, router_bias):
    router tensors in ``router_dtype`` (fp32, as the patched module passes them), the rest in
    ``dtype``; scales keep every term O(1). ``three_d=True`` is layout "3d"."""
    g = torch.Generator().manual_seed(seed)
    x = make_x(M, K, "3d" if three_d else layout, dtype, g)
    weight = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    lora_A = (torch.randn(E, r, K, generator=g) * K ** -0.5).to(dtype)
    lora_B = (torch.randn(E, N, r, generator=g) * r ** -0.5).to(dtype)
    router_weight = (torch.randn(E, K, generator=g) * K ** -0.5).to(router_dtype)
    router_bias = (torch.randn(E, generator=g) * 0.5).to(router_dtype)
    out = (x, weight, b, lora_A, lora_B, router_weight, router_bias)
    return tuple(t if t is None else t.to(device) for t in out)


def random_base_rows(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A bool mask over x's rows with both kinds (first row base, last row MoGU)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(x.shape[:-1], generator=g) < 0.4
    rows.view(-1)[0] = True
    rows.view(-1)[-1] = False
    return rows.to(x.device)


def rel_err(a, b) -> float:
    """Relative error by norm, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
