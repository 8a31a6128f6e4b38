"""Masked weights stored sparse: only the kept values, plus where they are (a bitmask or CSR indices).

A masked weight is as large as a dense one; saved dense (with its bool mask beside it) it takes 5 bytes an
entry in float32. Stored sparse it takes the kept values plus their positions, and the positions *are* the
mask, so nothing else is saved. Two layouts, chosen per tensor:

- ``bitmask``: the mask packed 8 entries a byte (``numpy.packbits``) and the kept values in order. An entry
  costs 1/8 byte plus its value when kept: it pays from any sparsity on, and suits N:M patterns (2:4 keeps
  half the values and adds 1 bit an entry).
- ``csr``: the weight as a matrix (rows = dim 0, columns = the rest, as ``torch.sparse_csr_tensor``): row
  offsets (int64) and one int32 column index per kept value. Smaller than the bitmask beyond about 97%
  sparsity (4 bytes a kept entry against 1/8 byte every entry).
- ``auto``: whichever of the two is smaller for each tensor.

The kept positions are the mask's, not the non-zeros: a kept weight that happens to be 0 stays kept, so a
model read back carries exactly the masks it was saved with::

    >>> import torch
    >>> weight = torch.tensor([[0.5, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    >>> mask = weight != 0
    >>> tensors, entry = encode_sparse(weight, mask, "bitmask")
    >>> sorted(tensors), tensors["values"].tolist(), entry
    (['bitmask', 'values'], [0.5, -1.0, 2.0], {'layout': 'bitmask', 'shape': [2, 4]})
    >>> back, back_mask = decode_sparse(tensors, entry)
    >>> torch.equal(back, weight), torch.equal(back_mask, mask)
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from slimtorch.errors import ConfigError

__all__ = [
    "LAYOUTS",
    "SPARSE_PARTS",
    "SparseFormatError",
    "check_sparse_entry",
    "decode_sparse",
    "encode_sparse",
    "sparse_nbytes",
    "split_state",
]

#: Layouts a masked weight may be stored in (``auto``: the smaller of the other two, per tensor).
LAYOUTS = ("bitmask", "csr", "auto")
#: The tensors each stored layout holds.
SPARSE_PARTS = {"bitmask": ("values", "bitmask"), "csr": ("values", "crow_indices", "col_indices")}
#: Dimensions and entries a stored sparse tensor may declare (a corrupt header must not allocate terabytes).
_MAX_DIMS, _MAX_NUMEL = 8, 1 << 40


class SparseFormatError(ValueError):
    """What is wrong with a stored sparse tensor (a reader names the file and the fix)."""


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) a weight is stored as in CSR: dim 0 against the rest (a vector is one row)."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1


def sparse_nbytes(mask: torch.Tensor, itemsize: int, layout: str) -> int:
    """Bytes of the data of a weight stored in ``layout`` (``bitmask`` or ``csr``), headers not counted."""
    kept, numel = int(mask.count_nonzero()), mask.numel()
    if layout == "bitmask":
        return kept * itemsize + (numel + 7) // 8
    rows, _ = _matrix_shape(tuple(mask.shape))
    return kept * (itemsize + 4) + (rows + 1) * 8


def _choose(mask: torch.Tensor, itemsize: int, layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"sparse layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    return min(("bitmask", "csr"), key=lambda kind: sparse_nbytes(mask, itemsize, kind))


def encode_sparse(weight: torch.Tensor, mask: torch.Tensor, layout: str = "auto") -> tuple[dict[str, torch.Tensor],
                                                                                             dict[str, Any]]:
    """The tensors that store ``weight`` at the positions ``mask`` keeps, and the entry describing them
    (``layout``, ``shape``) that :func:`decode_sparse` needs. Pure."""
    if tuple(mask.shape) != tuple(weight.shape):
        raise ConfigError(f"a mask of shape {tuple(mask.shape)} cannot store a weight of shape {tuple(weight.shape)}")
    weight, mask = weight.detach().cpu(), mask.detach().cpu().bool()
    layout = _choose(mask, weight.element_size(), layout)
    entry = {"layout": layout, "shape": list(weight.shape)}
    if layout == "bitmask":
        bits = np.packbits(mask.reshape(-1).numpy())  # (ceil(numel / 8),) uint8, first entry in the high bit
        return {"values": weight[mask].contiguous(), "bitmask": torch.from_numpy(bits)}, entry
    matrix = mask.reshape(_matrix_shape(tuple(mask.shape)))  # (rows, columns)
    where = matrix.nonzero()  # (kept, 2) row-major: the order CSR lists its entries in
    crow = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(where[:, 0], minlength=matrix.shape[0]).cumsum(0)
    values = weight.reshape(matrix.shape)[matrix]  # row-major too
    return {"values": values.contiguous(), "crow_indices": crow, "col_indices": where[:, 1].to(torch.int32)}, entry


def check_sparse_entry(name: str, entry: Any, parts: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Check a stored sparse tensor from headers alone: its entry (layout, shape) and its parts' shapes and
    dtypes (``parts``: name -> (shape, safetensors dtype)). Raises :class:`SparseFormatError`."""
    if not isinstance(entry, Mapping) or entry.get("layout") not in SPARSE_PARTS:
        raise SparseFormatError(f"sparse tensor {name!r} needs a layout among {list(SPARSE_PARTS)}, got {entry!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(type(s) is int and s >= 0 for s in shape) \
            or math.prod(shape) > _MAX_NUMEL:
        raise SparseFormatError(f"sparse tensor {name!r} has no valid shape (a list of at most {_MAX_DIMS} sizes "
                                f">= 0), got {shape!r}")
    expected = set(SPARSE_PARTS[entry["layout"]])
    if set(parts) != expected:
        raise SparseFormatError(f"sparse tensor {name!r} ({entry['layout']}) must have the parts {sorted(expected)}, "
                                f"has {sorted(parts)}")
    rows, _ = _matrix_shape(tuple(shape))
    wanted = {"bitmask": ((math.ceil(math.prod(shape) / 8),), "U8"), "crow_indices": ((rows + 1,), "I64"),
              "col_indices": (None, "I32")}
    for part, (part_shape, dtype) in parts.items():
        want_shape, want_dtype = wanted.get(part, (None, None))
        if len(part_shape) != 1 or (want_shape is not None and part_shape != want_shape) \
                or (want_dtype is not None and dtype != want_dtype):
            raise SparseFormatError(f"sparse tensor {name!r}: {part!r} is {dtype} {list(part_shape)}, expected a "
                                    f"vector{f' of {want_shape[0]}' if want_shape else ''} of {want_dtype or 'values'}")


def _csr_mask(parts: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    crow, col, count = parts["crow_indices"], parts["col_indices"].to(torch.int64), len(parts["values"])
    steps = crow.diff()
    if int(crow[0]) != 0 or int(crow[-1]) != count or len(col) != count or bool((steps < 0).any()):
        raise SparseFormatError(f"its row offsets do not run from 0 to its {count} values")
    if count and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise SparseFormatError(f"its column indices leave 0..{cols - 1}")
    row = torch.repeat_interleave(torch.arange(rows), steps)  # (count,) the row of each kept value
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    flat = row * cols + col
    mask[flat] = True
    if int(mask.sum()) != count:
        raise SparseFormatError("a position is listed twice")
    return mask


def decode_sparse(parts: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense weight (zeros where not kept) and the bool mask stored by :func:`encode_sparse`. Values that
    do not fit their positions are a :class:`SparseFormatError` (check the entry first with
    :func:`check_sparse_entry`)."""
    shape = tuple(entry["shape"])
    numel, values = math.prod(shape), parts["values"]
    if entry["layout"] == "bitmask":
        bits = np.unpackbits(parts["bitmask"].numpy(), count=numel)  # (numel,) 0/1
        if bits.size != numel or (numel + 7) // 8 != len(parts["bitmask"]):
            raise SparseFormatError(f"its bitmask holds {bits.size} entries, not {numel}")
        mask = torch.from_numpy(bits.astype(np.bool_))
    else:
        rows, cols = _matrix_shape(shape)
        mask = _csr_mask(parts, rows, cols)
    kept = int(mask.sum())
    if kept != len(values):
        raise SparseFormatError(f"it keeps {kept} positions but stores {len(values)} values")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape), mask.reshape(shape)


def split_state(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], layout: str | None,
                *, mask_suffix: str = "_mask") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                        dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]]:
    """A masked model's state dict as it is stored: the dense entries (without the mask buffers, which the
    masks replace), the masks stored as bool tensors, and the weights stored sparse (their parts and entry).
    ``layout=None`` stores every weight dense beside its mask. Pure."""
    buffers = {name + mask_suffix for name in masks}
    sparse: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    if layout is not None:
        sparse = {name: encode_sparse(state[name], mask, layout) for name, mask in masks.items()
                  if name in state and tuple(state[name].shape) == tuple(mask.shape)}
    dense = {k: v for k, v in state.items() if k not in buffers and k not in sparse}
    bools = {k: v.to(torch.bool) for k, v in masks.items() if k not in sparse}
    return dense, bools, sparse
