"""``nni.compression.speedup`` (NNI 3): :class:`ModelSpeedup`, as in :mod:`slimtorch.compat.nni.speedup`."""

from slimtorch.compat.nni.speedup import ModelSpeedup

__all__ = ["ModelSpeedup"]
