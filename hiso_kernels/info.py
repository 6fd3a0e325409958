"""``python -m hiso_kernels.info``: version, what was built, which backends run here, and the direction spec."""

from __future__ import annotations

import platform
import sys

import torch

from . import SPEC_VERSION, __version__
from .backends import BACKENDS, ENV_BACKEND, available_backends, select_backend


def report() -> str:
    lines = [
        f"hiso_kernels {__version__}   direction spec v{SPEC_VERSION} (Philox4x32-10; gaussian, rademacher)",
        f"python {platform.python_version()}   torch {torch.__version__}   platform {platform.machine()}",
        "",
        "backends:",
    ]
    for name, backend in BACKENDS.items():
        ok, why = backend.availability()
        lines.append(f"  {name:<7} {'yes' if ok else 'no ':<4} {why}")
    lines.append("")
    lines.append("exact restore (the undo log of a logged run, hiso_kernels.bind):")
    for name, backend in BACKENDS.items():
        if backend.availability()[0]:
            in_kernel, how = backend.log_support()
            lines.append(f"  {name:<9} {'in the kernel' if in_kernel else 'fallback':<13} {how}")
    lines.append("")
    lines.append(f"available: {', '.join(available_backends())}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"automatic choice for {dev} tensors: {select_backend(torch.device(dev)).name}")
    lines.append(f"override: backend= argument, or {ENV_BACKEND}=<name>")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
