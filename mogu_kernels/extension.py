"""The C++/CUDA extension ``mogu_kernels._C``: backends ``cpp`` (CPU) and ``cuda``.

Importing this module tries to load ``mogu_kernels._C`` (built from ``csrc/`` by
``pip install -e .``), which registers the torch library ``mogu_C``:

* ``torch.ops.mogu_C.mogu_linear(x, weight, bias, lora_A, lora_B, router_weight,
  router_bias, scaling, base_rows) -> (y, gates, saved)``, CPU and CUDA kernels;
  ``bias`` and ``base_rows`` are optional (None). ``saved`` (..., E*r + E) in fp32 (fp64
  for fp64 x) holds [x A_0^T, ..., x A_{E-1}^T | gates], the per-token state backward needs;
  it is not differentiable;
* ``torch.ops.mogu_C.mogu_linear_backward(...)``: gradients for x, lora_A, lora_B,
  router_weight and router_bias (weight and bias are frozen).

The module also has ``_C.mogu_linear``, a fast entry to the same op (see
``Backend.fast`` of the cpp and cuda backends). The contract, shapes and dtypes are stated in
``csrc/mogu_ops.h``. Autograd is registered
in C++ (``csrc/mogu_autograd.cpp``: an inference call never enters Python); this module adds
the fake kernels of both ops (``torch.library.register_fake``), so the op also works on
meta/fake tensors and under ``torch.compile``.

Both backends are ALWAYS registered. When the shared library cannot be loaded (not built,
no compiler at install time, ABI mismatch), ``unavailable_reason()`` returns why, so
``mogu_linear(backend=None)`` warns once and falls back to the next backend, and an
explicit ``backend="cpp"`` raises a RuntimeError carrying the reason. ``cuda`` is
additionally unavailable when the extension was built without its CUDA sources.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import Backend, register_backend
from .validation import accumulation_dtype, check_mogu_linear_args


try:
    from . import _C  # noqa: F401  (loading it registers the mogu_C ops)
    LOAD_ERROR: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"extension mogu_kernels._C not built: {type(exc).__name__}: {exc}"

_FAST = None      # set below when the extension has its fast entry


if _C is not None:
    _FORWARD = torch.ops.mogu_C.mogu_linear.default
    # The same op without torch.ops' argument handling (csrc/mogu_library.cpp); None for a
    # shared library built before it existed. NotImplemented from it: use _FORWARD.
    _FAST = getattr(_C, "mogu_linear", None)

    @torch.library.register_fake("mogu_C::mogu_linear")
    def _mogu_linear_fake(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows):
        # The C++ kernels check their arguments; this one must too: a call with one tensor
        # on the meta device dispatches here, and mogu_linear relies on the op to raise.
        check_mogu_linear_args(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
        lead = x.shape[:-1]
        E, r, _ = lora_A.shape
        return (x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, E)),
                x.new_empty((*lead, E * r + E), dtype=accumulation_dtype(x.dtype)))

    @torch.library.register_fake("mogu_C::mogu_linear_backward")
    def _mogu_linear_backward_fake(grad_y, grad_gates, x, weight, bias, lora_A, lora_B, router_weight,
                                   base_rows, saved, scaling, router_bias_dtype):
        return (x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape),
                router_weight.new_empty(router_weight.shape),
                router_weight.new_empty((router_weight.shape[0],), dtype=router_bias_dtype))


def extension_mogu_linear(
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
    """``mogu_linear`` through ``torch.ops.mogu_C.mogu_linear`` (the CPU or CUDA kernel by x's
    device); arguments and result as in :func:`mogu_kernels.mogu_linear`. The op checks its
    arguments itself (``checks_args=True``: mogu_linear words its errors only when it raised).

    Eager calls with plain tensors do not get here: ``mogu_linear`` calls the backend's
    ``fast`` entry (``_C.mogu_linear``, the same dispatcher call without torch.ops' boxed
    argument handling) first; this is the path under torch.compile, with tensor subclasses,
    a __torch_function__ mode or a non-float scaling."""
    if _C is None:
        raise RuntimeError(LOAD_ERROR)
    y, gates, _ = _FORWARD(x, weight, bias, lora_A, lora_B, router_weight, router_bias, float(scaling), base_rows)
    return y, gates


def cpp_unavailable_reason() -> Optional[str]:
    """None when the CPU kernels can run, else why not."""
    return LOAD_ERROR


def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA kernels can run, else why not."""
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    if not _C.WITH_CUDA:
        return ("extension mogu_kernels._C was built without its CUDA sources "
                "(MOGU_BUILD_CUDA=auto needs nvcc and a CUDA build of torch at install time)")
    return None


_CPU = torch.device("cpu")

register_backend(Backend(name="cpp", fn=extension_mogu_linear,
                         # device == _CPU first: it is a tenth of the cost of device.type, and this
                         # runs on every call (dispatch re-validates the cached choice).
                         supports_device=lambda device: device == _CPU or device.type == "cpu",
                         unavailable_reason=cpp_unavailable_reason, checks_args=True, fast=_FAST))
register_backend(Backend(name="cuda", fn=extension_mogu_linear,
                         supports_device=lambda device: device.type == "cuda",
                         unavailable_reason=cuda_unavailable_reason, checks_args=True, fast=_FAST))

__all__ = ["extension_mogu_linear", "cpp_unavailable_reason", "cuda_unavailable_reason", "LOAD_ERROR"]
