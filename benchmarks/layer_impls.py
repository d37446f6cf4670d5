"""The layer implementations the benchmarks compare, built from one set of random weights.

* ``base``: ``F.linear`` (cuBLAS / MKL / OpenBLAS), the yardstick every ratio refers to;
* ``published``: the published, unfused MoGU layer: two 512-wide router heads
  (Linear(d,512,no bias) -> Linear(512,d) -> Linear(d,1) -> sigmoid), two LoRA branches,
  and the gated mixture, ~12 separate ops;
* ``mogu:<backend>``: ``mogu_kernels.mogu_linear`` with the folded router vectors.

The MoGU math itself is stated once, in ``mogu_kernels/reference.py``: the folded router
vectors come from its ``fold_router_head`` (the fold ``RouterHead.folded`` uses), and
the ``mogu:*`` rows run the op. ``published`` is the one deliberate restatement: it is
what is being timed (the published code's op sequence, unfolded heads, two separate LoRA
branches, all in the model dtype), so it must not take the reference's shortcuts;
tests/test_benchmark_smoke.py pins it to the float64 spec so it cannot drift.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import mogu_kernels
from mogu_kernels.reference import fold_router_head


def make_layer_weights(K: int, N: int, r: int, dtype, device, hidden: int = 512, seed: int = 0) -> Dict:
    """Random non-zero weights of one MoGU layer (E = 2 experts), every term O(1).

    Keys: weight (N, K), bias (N,), lora_A (2, r, K), lora_B (2, N, r) and the two
    published heads "alpha_"/"beta_" ([W0 (h, K), W1 (K, h), b1 (K,), W2 (1, K), b2 (1,)]),
    all in ``dtype`` on ``device``; scaling 2.0; router_weight (2, K) and router_bias (2,)
    fp32, the heads folded exactly by ``fold_router_head`` (as ``MoGULinear`` does).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
    w = {
        "weight": rnd(N, K, scale=K ** -0.5), "bias": rnd(N, scale=0.1),
        "lora_A": rnd(2, r, K, scale=K ** -0.5), "lora_B": rnd(2, N, r, scale=r ** -0.5),
        "scaling": 2.0,
    }
    for head in ("alpha_", "beta_"):
        w[head] = [rnd(hidden, K, scale=K ** -0.5), rnd(K, hidden, scale=hidden ** -0.5), rnd(K, scale=0.1),
                   rnd(1, K, scale=K ** -0.5), rnd(1, scale=0.1)]
    folded = [fold_router_head(w[head]) for head in ("alpha_", "beta_")]
    w["router_weight"] = torch.stack([v for v, _ in folded])
    w["router_bias"] = torch.stack([c for _, c in folded])
    return w


def published_layer(w: Dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The published unfused computation (what the official code runs per token)."""
    def head(x, p):
        w0, w1, b1, w2, b2 = p
        return torch.sigmoid(F.linear(F.linear(F.linear(x, w0), w1, b1), w2, b2))

    def forward(x):
        a, b = head(x, w["alpha_"]), head(x, w["beta_"])
        base = F.linear(x, w["weight"], w["bias"])
        du = F.linear(F.linear(x, w["lora_A"][0]), w["lora_B"][0])
        dg = F.linear(F.linear(x, w["lora_A"][1]), w["lora_B"][1])
        return (a + b) * base + w["scaling"] * (a * du + b * dg)
    return forward


def base_layer(w: Dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x, w["weight"], w["bias"])


def mogu_layer(w: Dict, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x):
        return mogu_kernels.mogu_linear(x, w["weight"], w["bias"], w["lora_A"], w["lora_B"], w["router_weight"],
                                        w["router_bias"], w["scaling"], backend=backend)[0]
    return forward


def layer_impls(w: Dict, backends) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    impls = {"base": base_layer(w), "published": published_layer(w)}
    for b in backends:
        impls[f"mogu:{b}"] = mogu_layer(w, b)
    return impls
