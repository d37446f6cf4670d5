"""An independent float64 statement of the mogu_linear contract, for every backend's tests."""
from __future__ import annotations

import torch


def spec_mogu_linear(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows=None):
    """float64, one expert at a time, exactly as docs/design.md section 2 writes it."""
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


def make_inputs(M, K, N, r, E=2, bias=True, dtype=torch.float32, three_d=False, seed=0, device="cpu"):
    """Fresh random, non-zero inputs; x is (M, K) or (2, ceil(M/2), K)."""
    g = torch.Generator().manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)
    lead = (2, (M + 1) // 2) if three_d else (M,)
    x = rnd(*lead, K).to(dtype)
    weight = rnd(N, K, scale=K ** -0.5).to(dtype)
    b = rnd(N, scale=0.5).to(dtype) if bias else None
    lora_A = rnd(E, r, K, scale=K ** -0.5).to(dtype)
    lora_B = rnd(E, N, r, scale=r ** -0.5).to(dtype)
    router_weight = rnd(E, K, scale=K ** -0.5)            # fp32, as the module passes it
    router_bias = rnd(E, scale=0.5)
    return x, weight, b, lora_A, lora_B, router_weight, router_bias


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
