"""``MoGULinear``: one projection with the unwill/glad LoRA experts and their routers.

State layout (maps 1:1 onto the published release, see mogu/checkpoint.py):

    weight, bias          the wrapped layer's own Parameters (shared, never copied), so
                          the model's state-dict keys for them do not change
    lora_A  (2, r, K)     [unwill, glad] LoRA A matrices (peft ``lora_A.weight`` per expert)
    lora_B  (2, N, r)     [unwill, glad] LoRA B matrices (peft ``lora_B.weight``)
    alpha_, beta_         RouterHead: linear_0 (h x K) -> linear_1 (K x h, bias) ->
                          linear_2 (1 x K, bias); alpha_ gates unwill, beta_ gates glad
    router_weight (2, K), router_bias (2,)
                          only in the folded-only (deployment) state, where the heads
                          are dropped; otherwise the folded vectors are a cache

Modes: "mogu" (gated mixture), "base" (the wrapped layer's own forward, bitwise the
unpatched computation), "unwill"/"glad" (W x + b + s B_e A_e x, that expert alone).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mogu_kernels import mogu_linear, router_gates
from mogu_kernels.reference import fold_router_head, mix_experts

from .config import EXPERTS, MoGUConfig

MODES = ("mogu", "base") + EXPERTS


_WRAPPABLE = {nn.Linear}


def wrappable_classes() -> set:
    """The linear classes ``MoGULinear`` may wrap: ``nn.Linear``, Falcon's ``FalconLinear``
    (same maths, bias added after the matmul) and any added by :func:`register_wrappable`."""
    try:
        from transformers.models.falcon.modeling_falcon import FalconLinear
        _WRAPPABLE.add(FalconLinear)
    except ImportError:
        pass
    return set(_WRAPPABLE)


def register_wrappable(cls: type) -> type:
    """Allow ``MoGULinear`` to wrap ``cls``, a linear class whose forward computes exactly
    ``x @ weight.T + bias`` from its ``weight`` (N, K) and ``bias`` (N,) or None."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_wrappable: expected an nn.Module subclass, got {cls!r}")
    _WRAPPABLE.add(cls)
    return cls


class RouterHead(nn.Module):
    """The published router head: Linear(d, h, no bias) -> Linear(h, d) -> Linear(d, 1).

    There is no activation in between, so the head is the affine map
    logit = v . x + c with v = W2 W1 W0 (1 x d) and c = W2 b1 + b2, which ``folded``
    returns. ``forward`` evaluates the unfolded chain (the published computation).
    """

    def __init__(self, in_features: int, hidden: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.linear_0 = nn.Linear(in_features, hidden, bias=False, **kw)
        self.linear_1 = nn.Linear(hidden, in_features, bias=True, **kw)
        self.linear_2 = nn.Linear(in_features, 1, bias=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., 1) router logit, unfolded."""
        return self.linear_2(self.linear_1(self.linear_0(x)))

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(v (d,), c ()) in fp32 with logit = v . x + c; differentiable in the head's weights
        (``mogu_kernels.reference.fold_router_head``, the one statement of the fold)."""
        return fold_router_head((self.linear_0.weight, self.linear_1.weight, self.linear_1.bias,
                                 self.linear_2.weight, self.linear_2.bias))


class MoGULinear(nn.Module):
    """A linear layer (``nn.Linear`` or a subclass such as ``FalconLinear``) with MoGU.

    Input x (..., K) in the layer's dtype; output (..., N) in the same dtype. See the
    module docstring for the state and the modes. Attributes set from outside:

    mode: one of MODES.
    router_offset: the usability/safety dial d (float): the router logits become
        [unwill - d, glad + d] before the sigmoid (``MoGUConfig.router_offset``).
    base_rows: None or a bool tensor shaped x.shape[:-1]; True rows run as plain base
        inside the same fused call (for callers that batch MoGU and base rows together).
    gate_sink: None or a callable(gates (..., 2)) receiving every forward's gates
        (used by ``mogu.capture_gates``).
    """

    def __init__(self, base_layer: nn.Module, config: MoGUConfig):
        super().__init__()
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"MoGU can only wrap linear layers with a 2-D weight, got {type(base_layer).__name__}")
        if type(base_layer) not in wrappable_classes():
            raise ValueError(
                f"MoGU cannot wrap a {type(base_layer).__module__}.{type(base_layer).__qualname__}: its base path runs "
                f"the wrapped class's forward with the MoGU layer's weight and bias, which is only known to be right "
                f"for {sorted(c.__qualname__ for c in wrappable_classes())}. A class whose forward reads other state "
                f"(quantized or peft linears) would silently compute something else. If its forward is exactly "
                f"x @ weight.T + bias, allow it with mogu.layer.register_wrappable({type(base_layer).__qualname__}).")
        # Share, never copy, the base parameters; keep the original module (unregistered,
        # so it adds no state-dict keys) for unpatching and for the bitwise base path.
        self.weight = base_layer.weight
        self.bias = getattr(base_layer, "bias", None)
        object.__setattr__(self, "original_module", base_layer)
        # The wrapped class's own forward, run with self's weight/bias: bitwise the
        # unpatched computation even for classes that are not plain F.linear (Falcon).
        self._base_forward: Callable = type(base_layer).forward
        self.out_features, self.in_features = weight.shape
        self.mode = "mogu"
        self.router_offset = float(config.router_offset)   # the dial: -d unwill, +d glad logits
        self._call_cache: Dict[str, tuple] = {}     # see _frozen_cache
        self.base_rows: Optional[torch.Tensor] = None
        self.gate_sink: Optional[Callable[[torch.Tensor], None]] = None
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_experts(config.r, config.lora_alpha)
        self.reset_routers(config.router_hidden)
        self.train(base_layer.training)          # a patched eval model stays in eval mode

    # ----------------------------------------------------------------- state
    def reset_experts(self, r: int, lora_alpha: float) -> None:
        """(Re)create both experts at rank r: A kaiming-uniform, B zero (peft's init)."""
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.r, self.lora_alpha = int(r), float(lora_alpha)
        self.scaling = self.lora_alpha / self.r
        lora_A = torch.empty(len(EXPERTS), self.r, self.in_features, **kw)
        for e in range(len(EXPERTS)):
            nn.init.kaiming_uniform_(lora_A[e], a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(torch.zeros(len(EXPERTS), self.out_features, self.r, **kw))

    def reset_routers(self, hidden: int) -> None:
        """(Re)create the two unfolded router heads (drops a folded-only router)."""
        for name in ("router_weight", "router_bias"):
            if name in self._buffers:
                del self._buffers[name]
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.router_hidden = int(hidden)
        self.alpha_ = RouterHead(self.in_features, self.router_hidden, **kw)
        self.beta_ = RouterHead(self.in_features, self.router_hidden, **kw)
        self.alpha_.train(self.training)
        self.beta_.train(self.training)
        self._call_cache = {}          # heads replaced: drop the fold (see _frozen_cache)

    @property
    def is_folded(self) -> bool:
        """True when only the folded router vectors are held (deployment state)."""
        return self.alpha_ is None

    def set_folded_router(self, router_weight: torch.Tensor, router_bias: torch.Tensor) -> None:
        """Drop the heads and keep only (router_weight (2, K), router_bias (2,)) in fp32."""
        E = len(EXPERTS)
        if tuple(router_weight.shape) != (E, self.in_features) or tuple(router_bias.shape) != (E,):
            raise ValueError(f"folded router must be ({len(EXPERTS)}, {self.in_features}) and ({len(EXPERTS)},), "
                             f"got {tuple(router_weight.shape)} and {tuple(router_bias.shape)}")
        self.alpha_ = None
        self.beta_ = None
        self._call_cache = {}          # heads replaced: drop the fold (see _frozen_cache)
        self.register_buffer("router_weight", router_weight.detach().to(self.weight.device, torch.float32).clone())
        self.register_buffer("router_bias", router_bias.detach().to(self.weight.device, torch.float32).clone())

    def fold(self) -> None:
        """Replace the router heads by their exact folded vectors (frees ~2 h K params)."""
        if not self.is_folded:
            with torch.no_grad():
                w, b = self.router_vectors()
            self.set_folded_router(w, b)

    def router_vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(router_weight (2, K), router_bias (2,)) fp32, rows [unwill (alpha_), glad (beta_)].

        Folded-only: the stored buffers. Otherwise folded from the heads: recomputed with
        autograd when the heads may receive gradients, else cached and refreshed whenever
        a head parameter is replaced or modified in place (tracked by tensor versions).
        """
        if self.is_folded:
            return self.router_weight, self.router_bias
        params = [p for head in (self.alpha_, self.beta_) for p in head.parameters()]
        return self._frozen_cache("fold", params, None, self._fold_heads)

    def _frozen_cache(self, slot: str, tensors, extra, make):
        """``make()``, cached in ``slot`` while ``tensors`` are unchanged (the same tensor
        objects, held by the cache so their identity cannot be reused, at the same version,
        storage, dtype and device, i.e. not replaced, moved or modified in place) and ``extra``
        is equal; recomputed, uncached,
        whenever autograd may need it (grad enabled and a tensor requires grad). Keeps
        per-call tensor work out of inference (decode calls every layer once per token)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return make()
        # .data replacement (module.to) keeps the object and its version: storage, dtype, device tell
        versions = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        cached = self._call_cache.get(slot)
        if (cached is None or len(cached[0]) != len(tensors) or any(a is not b for a, b in zip(cached[0], tensors))
                or cached[1] != versions or cached[2] != extra):
            # Made outside inference mode so that the result is a normal tensor: the C++ op keeps
            # per-tensor packed copies only of tensors with a version counter (not inference tensors).
            with torch.inference_mode(False), torch.no_grad():
                cached = (tuple(tensors), versions, extra, make())
            self._call_cache[slot] = cached
        return cached[3]

    def _experts_in(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) cast to ``dtype`` (the model dtype when the experts are kept in fp32)."""
        return self._frozen_cache("experts", (self.lora_A, self.lora_B), dtype,
                                  lambda: (self.lora_A.to(dtype), self.lora_B.to(dtype)))

    def _shifted_bias(self, router_bias: torch.Tensor) -> torch.Tensor:
        """(2,) fp32 router bias with the dial applied: [c_u - d, c_g + d]."""
        return self._frozen_cache("bias", (router_bias,), self.router_offset,
                                  lambda: router_bias + torch.tensor([-self.router_offset, self.router_offset],
                                                                     dtype=torch.float32, device=router_bias.device))

    def _fold_heads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        (v_u, c_u), (v_g, c_g) = self.alpha_.folded(), self.beta_.folded()
        return torch.stack([v_u, v_g]), torch.stack([c_u, c_g])

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode == "base":
            return self._base_forward(self, x)
        lora_A, lora_B = self.lora_A, self.lora_B
        if lora_A.dtype != x.dtype:      # e.g. experts kept in fp32 under a bf16 model
            lora_A, lora_B = self._experts_in(x.dtype)
        if mode != "mogu":
            e = EXPERTS.index(mode)
            delta = F.linear(F.linear(self.lora_dropout(x), lora_A[e]), lora_B[e])
            return self._base_forward(self, x) + self.scaling * delta
        router_weight, router_bias = self.router_vectors()
        if self.router_offset:
            router_bias = self._shifted_bias(router_bias)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            y, gates = self._forward_with_dropout(x, lora_A, lora_B, router_weight, router_bias)
        else:
            y, gates = mogu_linear(x, self.weight, self.bias, lora_A, lora_B, router_weight, router_bias,
                                   self.scaling, base_rows=self.base_rows)
        if self.gate_sink is not None:
            self.gate_sink(gates)
        return y

    def _forward_with_dropout(self, x, lora_A, lora_B, router_weight, router_bias):
        """Training with LoRA dropout: the experts see dropout(x), the base and routers x.

        Dropout breaks the "one shared x" premise of the fused op, so this path is unfused:
        it computes the three inputs of the mixture itself (gates and base output from x,
        the stacked shrink from dropout(x)) and mixes them with the reference's
        ``mix_experts`` (same math and dtypes as the reference backend). Set
        lora_dropout=0 to train through the op. Returns (y (..., N), gates (..., 2)) in x's dtype.
        """
        gates = router_gates(x, router_weight, router_bias)                  # (..., 2) fp32
        E, r = lora_A.shape[0], lora_A.shape[1]
        shrink = F.linear(self.lora_dropout(x), lora_A.reshape(E * r, -1))   # (..., 2r) x's dtype
        y = mix_experts(self._base_forward(self, x), shrink, gates, lora_B, self.scaling, self.base_rows)
        return y, gates.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, router={'folded' if self.is_folded else self.router_hidden}, "
                f"mode={self.mode!r}" + (f", router_offset={self.router_offset:g}" if self.router_offset else ""))
