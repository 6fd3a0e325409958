"""Backend registry and selection (in the manner of bitsandbytes' backend dispatch).

Selection order for a call: the ``backend=`` argument, else the ``HISO_BACKEND`` environment variable, else the
first available backend for the tensors' device in :data:`AUTO_ORDER`. Naming a backend that cannot run here is an
error; automatic choice falls back with a one-time warning that says why the preferred backend is missing.
"""

from __future__ import annotations

import os
import warnings

import torch

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

ENV_BACKEND = "HISO_BACKEND"

BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CpuBackend(), TritonBackend(), CudaBackend())}

#: old names that still select a backend, with a one-time DeprecationWarning ("torch": the reference backend's name
#: before it was renamed "reference", like its file and its class ReferenceBackend)
DEPRECATED_NAMES = {"torch": "reference"}

#: automatic preference per device type (the Triton interpreter is never chosen automatically: it is a test tool)
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_warned: set[tuple[str, str]] = set()


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[key]
        if ("deprecated", key) not in _warned:
            _warned.add(("deprecated", key))
            warnings.warn(f"hiso_kernels: backend name {key!r} is deprecated; use {new!r}", DeprecationWarning,
                          stacklevel=5)
        key = new
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[key]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable in this process (for ``device`` if given)."""
    out = []
    for name, backend in BACKENDS.items():
        ok, _ = backend.availability()
        if ok and (device is None or backend.supports(torch.device(device))):
            out.append(name)
    return out


def select_backend(device: torch.device, requested: str | None = None) -> Backend:
    source = "backend="
    if requested is None:
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env.lower() != "auto":
            requested, source = env, f"{ENV_BACKEND}"
    if requested is not None and requested.strip().lower() != "auto":
        backend = get_backend(requested)
        ok, why = backend.availability()
        if not ok:
            raise RuntimeError(f"backend {backend.name!r} ({source}) is not available: {why}")
        if not backend.supports(device):
            raise ValueError(f"backend {backend.name!r} ({source}) cannot run on {device.type} tensors")
        return backend
    order = AUTO_ORDER.get(device.type, ("reference",))
    for i, name in enumerate(order):
        backend = BACKENDS[name]
        ok, why = backend.availability()
        if ok and backend.supports(device):
            if i > 0:
                _warn_fallback(order[0], device, name)
            return backend
    return BACKENDS["reference"]


def _warn_fallback(preferred: str, device: torch.device, chosen: str) -> None:
    key = (preferred, chosen)
    if key in _warned:
        return
    _warned.add(key)
    _, why = BACKENDS[preferred].availability()
    warnings.warn(
        f"hiso_kernels: backend {preferred!r} is unavailable for {device.type} tensors ({why}); using {chosen!r}",
        RuntimeWarning,
        stacklevel=4,
    )


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "DEPRECATED_NAMES",
    "ENV_BACKEND",
    "Backend",
    "available_backends",
    "get_backend",
    "select_backend",
]
