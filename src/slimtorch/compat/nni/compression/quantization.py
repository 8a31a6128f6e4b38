"""``nni.compression.quantization`` (NNI 3): the quantizers of :mod:`slimtorch.compat.nni.quantization`."""

from slimtorch.compat.nni.quantization import BNNQuantizer, DoReFaQuantizer, LsqQuantizer, PtqQuantizer, QATQuantizer

__all__ = ["BNNQuantizer", "DoReFaQuantizer", "LsqQuantizer", "PtqQuantizer", "QATQuantizer"]
