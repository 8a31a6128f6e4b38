"""Sparse weights: masked weights stored as their kept values (:mod:`slimtorch.sparse.storage`) and run on
sparse CPU kernels where that is faster (:mod:`slimtorch.sparse.kernels`)."""

from slimtorch.sparse.storage import (
    LAYOUTS,
    SPARSE_PARTS,
    SparseFormatError,
    check_sparse_entry,
    decode_sparse,
    encode_sparse,
    sparse_nbytes,
    split_state,
)

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
