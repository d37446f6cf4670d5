"""vLLM model classes with MoGU on the attention output projection (imports vLLM).

``MoGURowParallelLinear`` replaces ``self_attn.o_proj`` (a ``RowParallelLinear``) of the
decoder layers named in the config's ``"mogu"`` section (mogu/vllm_plugin/common.py); the
other layers stay vLLM's own. It keeps the base weight and bias under their usual names
(so vLLM's loader fills them as before) and adds ``lora_A`` (E, r, K/tp), ``lora_B``
(E, N, r), ``router_weight`` (E, K/tp, fp32) and ``router_bias`` (E, fp32), loaded from
the folded own-format tensors that arrive with the base weights. The dial d
(``MoGUConfig.router_offset``) is added to ``router_bias`` as [-d, +d] when it loads.

Two forward paths compute docs/design.md section 2 (E = 2 experts, s = lora_alpha / r):

* **fused** (tensor parallel size 1, unquantized base weight): one call of the fused op
  ``mogu_kernels.mogu_linear`` (Triton on CUDA, the C++ op on CPU), a torch.library op
  with a fake implementation, so vLLM's torch.compile / CUDA graphs trace through it. On
  CPU the layer opts out of vLLM's oneDNN weight prepacking (``_cpu_skip_gemm_dispatch``)
  so the op reads the plain weight.
* **split** (tensor parallel size > 1, or a quantized base): rank t holds the K slice
  x_t, W_t, A_t, v_t. The router logits v . x and the LoRA shrink A_e x are sums over
  ranks, so each rank computes its partial [v_t x_t | A_t x_t] (E + E*r numbers per token,
  fp32) and one ``tensor_model_parallel_all_reduce`` completes them before the sigmoid
  and the expand. Because the gates are then identical on every rank,
  g_sum * (sum_t W_t x_t + b) = sum_t g_sum * W_t x_t (+ g_sum * b on rank 0), so each rank
  scales its base partial (vLLM's own GEMM, any quant method) by g_sum, rank 0 alone adds
  g_sum * b and the expert term s * sum_e g_e B_e (A_e x) (added exactly once), and the
  usual row-parallel all-reduce of the N outputs finishes the layer. The mixing step is
  ``mogu_kernels.reference.mix_experts`` (the op's reference math): the fused op cannot
  take logits and shrinks reduced across ranks, so this path does not call it.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import Parameter

from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from mogu_kernels import mogu_linear
from mogu_kernels.reference import mix_experts

from .common import read_section

# MOGU_VLLM_PATH=split forces the split path at tensor parallel size 1 (tests, debugging).
PATH_ENV = "MOGU_VLLM_PATH"


class MoGURowParallelLinear(RowParallelLinear):
    """A ``RowParallelLinear`` with the two MoGU experts and their folded routers."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, r: int, lora_alpha: float,
                 num_experts: int = 2, router_offset: float = 0.0, quant_config=None, prefix: str = "",
                 params_dtype=None):
        super().__init__(input_size, output_size, bias=bias, input_is_parallel=True, reduce_results=True,
                         quant_config=quant_config, prefix=prefix, params_dtype=params_dtype)
        E, K_local, N = int(num_experts), self.input_size_per_partition, self.output_size
        self.num_experts, self.r = E, int(r)
        self.scaling = float(lora_alpha) / int(r)
        self.router_offset = float(router_offset)
        dtype = self.params_dtype or torch.get_default_dtype()
        shapes = {"lora_A": ((E, self.r, K_local), dtype, 2), "lora_B": ((E, N, self.r), dtype, None),
                  "router_weight": ((E, K_local), torch.float32, 1), "router_bias": ((E,), torch.float32, None)}
        for name, (shape, pdtype, k_dim) in shapes.items():
            param = Parameter(torch.empty(shape, dtype=pdtype), requires_grad=False)
            self.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": self._mogu_loader(name, k_dim)})
        # The engine-wide MoGU switch (``set_base_mode``): a tensor, not a Python flag, so a
        # captured CUDA graph / compiled model reads it at run time. True = every row runs as
        # the plain base layer (the op's base_rows), for the second phase of protocol "exact".
        self.register_buffer("base_mode", torch.zeros((), dtype=torch.bool), persistent=False)
        self.fused = (self.tp_size == 1 and isinstance(self.quant_method, UnquantizedLinearMethod)
                      and os.environ.get(PATH_ENV, "auto") != "split")
        if self.fused and current_platform.is_cpu():
            self._cpu_skip_gemm_dispatch = True     # keep the plain (N, K) weight for the fused op

    def _mogu_loader(self, name: str, k_dim):
        """The weight loader of one MoGU tensor: check the full shape, take this rank's K slice."""

        def load(param: Parameter, loaded: torch.Tensor) -> None:
            full = list(param.shape)
            if k_dim is not None:
                full[k_dim] = self.input_size
            if list(loaded.shape) != full:
                raise ValueError(f"mogu (vLLM): {self.prefix}.{name} has shape {tuple(loaded.shape)} in the "
                                 f"checkpoint, expected {tuple(full)}")
            if k_dim is not None and self.tp_size > 1:
                width = param.shape[k_dim]
                loaded = loaded.narrow(k_dim, self.tp_rank * width, width)
            loaded = loaded.to(param.dtype)
            if name == "router_bias" and self.router_offset:
                loaded = loaded + torch.tensor([-self.router_offset, self.router_offset], dtype=loaded.dtype)
            param.data.copy_(loaded)

        return load

    def forward(self, input_):
        if self.fused:
            y, _ = mogu_linear(input_, self.weight, self.bias, self.lora_A, self.lora_B, self.router_weight,
                               self.router_bias, self.scaling, base_rows=self.base_mode.expand(input_.shape[:-1]))
        else:
            y = self._forward_split(input_)
        return (y, None) if self.return_bias else y

    def _forward_split(self, x: torch.Tensor) -> torch.Tensor:
        E, r = self.num_experts, self.r
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = nn.functional.linear(x.to(acc), self.router_weight.to(acc))             # (T, E) partial
        shrink = nn.functional.linear(x, self.lora_A.reshape(E * r, -1)).to(acc)         # (T, E*r) partial
        if self.tp_size > 1:
            packed = tensor_model_parallel_all_reduce(torch.cat([logits, shrink], dim=-1))
            logits, shrink = packed[..., :E], packed[..., E:]
        gates = torch.sigmoid(logits + self.router_bias.to(acc))
        bias = self.bias if self.tp_rank == 0 else None
        base = self.quant_method.apply(self, x, bias)                                     # (T, N) partial
        base_rows = self.base_mode.expand(x.shape[:-1])
        if self.tp_rank == 0:
            y = mix_experts(base, shrink, gates, self.lora_B, self.scaling, base_rows)
        else:
            gate_sum = torch.where(base_rows.unsqueeze(-1), 1.0, gates.sum(-1, keepdim=True))
            y = (gate_sum * base.to(acc)).to(base.dtype)
        if self.tp_size > 1:
            y = tensor_model_parallel_all_reduce(y)
        return y

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", mogu_experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}, "
                f"path={'fused' if self.fused else 'split'}"
                + (f", router_offset={self.router_offset:g}" if self.router_offset else ""))


def set_base_mode(model: nn.Module, base: bool) -> int:
    """Switch every MoGU layer of ``model`` to the plain base layer (True) or back to MoGU
    (False); returns how many layers were switched. Runs inside each vLLM worker through
    ``llm.collective_rpc("mogu_set_base_mode", args=(True,))`` (mogu/vllm_plugin/worker.py)."""
    layers = [m for m in model.modules() if isinstance(m, MoGURowParallelLinear)]
    for layer in layers:
        layer.base_mode.fill_(bool(base))
    return len(layers)


def _has_missing_ancestor(model: nn.Module, name: str) -> bool:
    """True when a prefix of ``name`` is a pipeline-parallel placeholder (layer not on this rank)."""
    parts = name.split(".")
    module = model
    for part in parts:
        if isinstance(module, PPMissingLayer):
            return True
        module = getattr(module, part, None)
        if module is None:
            return False
    return isinstance(module, PPMissingLayer)


def install_mogu(model: nn.Module, vllm_config) -> int:
    """Replace the config's MoGU modules of ``model`` by ``MoGURowParallelLinear``; returns
    how many were replaced on this rank. ValueError for a module that is not a
    ``RowParallelLinear`` or does not exist (and is not on another pipeline stage)."""
    section = read_section(vllm_config.model_config.hf_config)
    config = section["config"]
    replaced = 0
    for name in section["modules"]:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            if _has_missing_ancestor(model, name):
                continue
            raise ValueError(f"mogu (vLLM): {type(model).__name__} has no module {name!r} (named in config.json's "
                             f"'mogu' section)") from None
        if not isinstance(old, RowParallelLinear):
            raise ValueError(f"mogu (vLLM): {name} is a {type(old).__name__}, expected a RowParallelLinear")
        new = MoGURowParallelLinear(old.input_size, old.output_size, bias=old.bias is not None, r=config.r,
                                    lora_alpha=config.lora_alpha, num_experts=section["num_experts"],
                                    router_offset=config.router_offset, quant_config=old.quant_config,
                                    prefix=old.prefix, params_dtype=old.params_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    return replaced


class _MoGUMixin:
    """Builds the base class, then wraps the MoGU target projections."""

    def _install_mogu(self, vllm_config) -> None:
        self.mogu_modules = install_mogu(self, vllm_config)


class MoGULlamaForCausalLM(_MoGUMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install_mogu(vllm_config)


class MoGUMistralForCausalLM(_MoGUMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install_mogu(vllm_config)


class MoGUQwen2ForCausalLM(_MoGUMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install_mogu(vllm_config)
