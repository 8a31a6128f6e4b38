"""NNI 3's layout, ``nni.compression.pruning`` / ``.speedup`` / ``.quantization``, under ``slimtorch.compat.nni``."""

from slimtorch.compat.nni.compression import pruning, quantization, speedup

__all__ = ["pruning", "quantization", "speedup"]
