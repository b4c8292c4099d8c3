"""visionattn."""

from .block_sparse import block_sparse_attention, block_sparse_attention_reference

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
]
