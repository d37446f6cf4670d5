"""The layer implementations the benchmarks compare, built from one set of random weights.

* ``base``: ``F.linear`` (cuBLAS / MKL / OpenBLAS), the yardstick every ratio refers to;
* ``published``: the published, unfused MoGU layer: two 512-wide router heads
  (Linear(d,512,no bias) -> Linear(512,d) -> Linear(d,1) -> sigmoid), two LoRA branches,
  and the gated mixture, ~12 separate ops;
* ``mogu:<backend>``: ``mogu_kernels.mogu_linear`` with the folded router vectors.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import mogu_kernels


def make_layer_weights(K: int, N: int, r: int, dtype, device, hidden: int = 512, seed: int = 0) -> Dict:
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
    # Fold each head exactly (v = W2 W1 W0, c = W2 b1 + b2), in fp32 as MoGULinear does.
    vs, cs = [], []
    for head in ("alpha_", "beta_"):
        w0, w1, b1, w2, b2 = (t.float() for t in w[head])
        vs.append(((w2 @ w1) @ w0).squeeze(0))
        cs.append((w2 @ b1 + b2).squeeze(0))
    w["router_weight"], w["router_bias"] = torch.stack(vs), torch.stack(cs)
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
