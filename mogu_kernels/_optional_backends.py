"""Import the optional backend modules; each registers itself when it imports.

A failed import (e.g. triton not installed on this platform) leaves that backend out;
the reason is kept in ``IMPORT_ERRORS`` for diagnostics.
"""
import importlib

IMPORT_ERRORS = {}

for _module in ("triton_backend", "extension"):
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ImportError as exc:  # missing optional dependency, or module not written yet
        IMPORT_ERRORS[_module] = f"{type(exc).__name__}: {exc}"
