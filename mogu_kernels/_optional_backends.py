"""Import the optional backend modules; each registers itself when it imports.

A failed import (e.g. triton not installed on this platform) leaves that module's
backends out of the registry; the reason is recorded with ``dispatch.record_missing`` so
that ``unavailable_backends()`` reports it and asking for such a backend by name raises
with it.
"""
import importlib

from .dispatch import record_missing

# module -> the backend names it registers
MODULE_BACKENDS = {"triton_backend": ("triton",), "extension": ("cpp", "cuda")}
IMPORT_ERRORS = {}

for _module, _names in MODULE_BACKENDS.items():
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ImportError as exc:  # missing optional dependency
        IMPORT_ERRORS[_module] = f"{type(exc).__name__}: {exc}"
        for _name in _names:
            record_missing(_name, f"mogu_kernels.{_module} failed to import ({IMPORT_ERRORS[_module]})")
