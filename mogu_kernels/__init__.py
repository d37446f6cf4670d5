"""mogu_kernels: the fused MoGU linear op and its backends.

``mogu_linear`` is the one public op (see its docstring for the contract). Backends
register themselves in :mod:`mogu_kernels.dispatch` when their module imports; a backend
whose dependencies are missing (no triton, extension not built, no device) stays out of
``available_backends()``, and ``unavailable_backends()`` says why. Nothing here knows about transformers.
"""
from .dispatch import Backend, available_backends, register_backend, resolve_backend, unavailable_backends
from .ops import mogu_linear
from .reference import reference_mogu_linear, router_gates

register_backend(Backend(
    name="reference",
    fn=reference_mogu_linear,
    supports_device=lambda device: True,
))

# Optional backends: each module registers itself if it can be imported at all.
from . import _optional_backends  # noqa: E402,F401

__all__ = ["mogu_linear", "available_backends", "unavailable_backends", "register_backend", "resolve_backend",
           "Backend", "reference_mogu_linear", "router_gates"]
