"""ovit-kernels: fast second-order (Optimal Brain Surgeon) pruning kernels for Vision Transformers.

Public contract (SPEC §4). Every function takes ``backend="auto" | "cuda" | "triton" |
"reference"`` (environment override ``OVIT_BACKEND``); :func:`available_backends` says what
can run here.
"""

from ._backend import BackendStatus, available_backends
from .errors import BackendUnavailableError, NotPositiveDefiniteError, OvitError
from .fisher import FisherInverse, fisher_inverse, fisher_quadratic, woodbury_update_
from .obs import (
    obs_prune_order,
    obs_prune_order_,
    obs_reconstruct,
    obs_reconstruct_factored,
    obs_scores,
    obs_update_independent,
    prune_counts,
)
from .reference import working_set_bytes
from .sparse import SparseLinear, sparsify, spmm
from .sparse_formats import PackedWeight, pack, pack_bitmap, pack_bsr, pack_nm, unpack

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "FisherInverse",
    "NotPositiveDefiniteError",
    "OvitError",
    "PackedWeight",
    "SparseLinear",
    "available_backends",
    "fisher_inverse",
    "fisher_quadratic",
    "obs_prune_order",
    "obs_prune_order_",
    "obs_reconstruct",
    "obs_reconstruct_factored",
    "obs_scores",
    "obs_update_independent",
    "pack",
    "pack_bitmap",
    "pack_bsr",
    "pack_nm",
    "prune_counts",
    "sparsify",
    "spmm",
    "unpack",
    "woodbury_update_",
    "working_set_bytes",
]
