"""hiso: zeroth-order fine-tuning (ZO-SGD / MeZO, HiSo) and scalar-only federated fine-tuning on hiso_kernels."""

from hiso_kernels import __version__

__all__ = ["__version__"]
