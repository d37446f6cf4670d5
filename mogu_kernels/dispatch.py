"""Backend registry for ``mogu_linear``.

A backend is a function with the signature of ``reference_mogu_linear`` plus a name, the
device types it runs on and an availability probe. Backend modules register themselves
at import (``register_backend``); ``resolve_backend`` picks one per call:

1. an explicit ``backend=`` name, else the ``MOGU_BACKEND`` environment variable: that
   backend or a ``RuntimeError`` saying why it cannot run here (never a silent swap);
2. otherwise the first available backend of ``PREFERENCE[device type]``. Backends
   skipped because they failed to load are reported once with a warning.

``mogu_linear`` resolves a backend on every call, so the answer is cached per (device,
name): a hit costs two dict look-ups and the chosen backend's availability probe, and is
re-checked against the registry each time (a backend replaced, registered or turning
(un)available is seen on the next call; nothing needs clearing).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Fastest first. A name may be missing from the registry (its module failed to import).
PREFERENCE: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "reference"],
    "cpu": ["cpp", "reference"],
}
ENV_VAR = "MOGU_BACKEND"


@dataclass
class Backend:
    name: str
    fn: Callable
    # device type -> bool; e.g. triton runs on CPU only under TRITON_INTERPRET=1.
    supports_device: Callable[[torch.device], bool]
    # () -> None if usable, else a one-line reason (e.g. "extension not built: ...").
    unavailable_reason: Callable[[], Optional[str]] = lambda: None
    # True when ``fn`` checks every argument itself and raises for any contract violation
    # (the C++ op's TORCH_CHECKs): ``mogu_linear`` then runs the Python checks
    # (``validation.check_mogu_linear_args``) only after ``fn`` raised, to give the
    # documented ValueError, instead of on every call.
    checks_args: bool = False
    # Optional eager fast path (with checks_args): a callable taking fn's arguments
    # positionally, base_rows included, that returns ``(y, gates)`` or NotImplemented when it
    # cannot take this call (``fn`` is then called). ``mogu_linear`` uses it outside
    # torch.compile only; it saves a Python frame per call (the C++ extension's
    # ``_C.mogu_linear``).
    fast: Optional[Callable] = None


_REGISTRY: Dict[str, Backend] = {}
_MISSING: Dict[str, str] = {}          # backend name -> why its module failed to import
_WARNED: set = set()
# (device, backend name or None) -> (the backend resolve_backend chose, the preferred backends
# it skipped as (name, registry entry or None)); see _cache_valid.
_CACHE: Dict[Tuple[torch.device, Optional[str]], Tuple[Backend, Tuple[Tuple[str, Optional[Backend]], ...]]] = {}

# MOGU_BACKEND is read on every call (it may change at run time); os.environ.get costs about
# a microsecond (key encoding), a look-up in the dict that os.environ writes through to a
# tenth of that.
_ENVIRON = os.environ
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
except AttributeError:  # not CPython's os._Environ
    _ENV_DATA = None


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _REGISTRY[backend.name] = backend
    _MISSING.pop(backend.name, None)


def registered_backends() -> Dict[str, Backend]:
    return dict(_REGISTRY)


def record_missing(name: str, reason: str) -> None:
    """Note a backend whose module could not be imported (reported by
    :func:`unavailable_backends` and when the backend is asked for by name)."""
    _MISSING[name] = reason


def _local_devices() -> List[torch.device]:
    """The device types this process can run on: the CPU, and CUDA when present."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _all_names() -> List[str]:
    preferred = list(dict.fromkeys(n for order in PREFERENCE.values() for n in order))
    return preferred + [n for n in list(_REGISTRY) + list(_MISSING) if n not in preferred]


def _why_not(name: str, devices: List[torch.device]) -> Optional[str]:
    """None when backend ``name`` runs on one of ``devices``, else the reason it does not."""
    b = _REGISTRY.get(name)
    if b is None:
        return _MISSING.get(name, "not registered")
    reason = b.unavailable_reason()
    if reason is not None:
        return reason
    if not any(b.supports_device(d) for d in devices):
        kinds = ", ".join(d.type for d in devices)
        extra = "" if torch.cuda.is_available() else "; no CUDA device here"
        return f"cannot run on {kinds} tensors{extra}"
    return None


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends that run here, fastest first: on ``device`` if given, else on
    a device this process has (the CPU; CUDA when present)."""
    devices = [torch.device(device)] if device is not None else _local_devices()
    return [n for n in _all_names() if _why_not(n, devices) is None]


def unavailable_backends(device: Optional[torch.device | str] = None) -> Dict[str, str]:
    """Each known backend that does NOT run here (as in :func:`available_backends`), with
    the reason: its module failed to import, the extension is not built, no device."""
    devices = [torch.device(device)] if device is not None else _local_devices()
    out = {}
    for n in _all_names():
        reason = _why_not(n, devices)
        if reason is not None:
            out[n] = reason
    return out


def _explicit(name: str, device: torch.device, source: str) -> Backend:
    b = _REGISTRY.get(name)
    if b is None and name in _MISSING:
        raise RuntimeError(f"mogu_linear: backend {name!r} (from {source}) is unavailable: {_MISSING[name]}")
    if b is None:
        raise ValueError(f"mogu_linear: unknown backend {name!r} (from {source}); "
                         f"registered: {sorted(_REGISTRY)}")
    reason = b.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"mogu_linear: backend {name!r} (from {source}) is unavailable: {reason}")
    if not b.supports_device(device):
        raise RuntimeError(f"mogu_linear: backend {name!r} (from {source}) cannot run on {device.type} tensors")
    return b


def _env_backend() -> Optional[str]:
    """The value of ``MOGU_BACKEND``, None when unset or empty."""
    if _ENV_DATA is not None and os.environ is _ENVIRON:
        raw = _ENV_DATA.get(_ENV_KEY)
        return _ENVIRON.decodevalue(raw) if raw else None
    return os.environ.get(ENV_VAR) or None


def _cache_valid(b: Backend, skipped: Tuple[Tuple[str, Optional[Backend]], ...], device: torch.device) -> bool:
    """Whether a cached choice still stands: ``b`` is still the registered backend of its name,
    available and able to run on ``device`` (device support may change at run time: triton
    runs on CPU only while TRITON_INTERPRET=1), and every preferred backend skipped for it
    is still the same registry entry and still unusable on ``device``."""
    if _REGISTRY.get(b.name) is not b or b.unavailable_reason() is not None or not b.supports_device(device):
        return False
    for name, entry in skipped:
        if _REGISTRY.get(name) is not entry:
            return False
        if entry is not None and entry.supports_device(device) and entry.unavailable_reason() is None:
            return False
    return True


def resolve_backend(device: torch.device | str, backend: Optional[str] = None) -> Backend:
    """The backend that ``mogu_linear(..., backend=backend)`` uses for tensors on ``device``."""
    if type(device) is not torch.device:
        device = torch.device(device)
    explicit = backend is not None
    if not explicit:
        if _ENV_DATA is not None and os.environ is _ENVIRON:      # _env_backend(), inlined
            raw = _ENV_DATA.get(_ENV_KEY)
            backend = _ENVIRON.decodevalue(raw) if raw else None
        else:
            backend = _env_backend()
    hit = _CACHE.get((device, backend))
    if hit is not None:
        b, skipped = hit
        if skipped:
            if _cache_valid(b, skipped, device):
                return b
        elif _REGISTRY.get(b.name) is b and b.unavailable_reason() is None and b.supports_device(device):
            return b                                                        # _cache_valid, inlined
    skipped: List[Tuple[str, Optional[Backend]]] = []
    if backend is not None:
        chosen = _explicit(backend, device, "backend=" if explicit else f"${ENV_VAR}")
    else:
        chosen = None
        for name in PREFERENCE.get(device.type, ["reference"]):
            b = _REGISTRY.get(name)
            if b is None or not b.supports_device(device):
                skipped.append((name, b))
                continue
            reason = b.unavailable_reason()
            if reason is None:
                chosen = b
                break
            skipped.append((name, b))
            if name not in _WARNED:
                _WARNED.add(name)
                warnings.warn(f"mogu_linear: backend {name!r} is unavailable ({reason}); "
                              f"falling back to the next one", RuntimeWarning, stacklevel=3)
        if chosen is None:
            chosen = _REGISTRY["reference"]
    _CACHE[(device, backend)] = (chosen, tuple(skipped))
    return chosen
