"""Sparse weights: masked weights stored as their kept values (:mod:`slimtorch.sparse.storage`) and run on
sparse CPU kernels where that is faster (:mod:`slimtorch.sparse.kernels`)."""

from slimtorch.sparse.kernels import BREAK_EVEN_SPARSITY, SparseLinear, sparsify_linear_, weight_sparsity
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
    "BREAK_EVEN_SPARSITY",
    "LAYOUTS",
    "SPARSE_PARTS",
    "SparseFormatError",
    "SparseLinear",
    "check_sparse_entry",
    "decode_sparse",
    "encode_sparse",
    "sparse_nbytes",
    "sparsify_linear_",
    "split_state",
    "weight_sparsity",
]
