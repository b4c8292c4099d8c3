"""Conversion of a ``BlockMask`` to PyTorch FlexAttention's ``BlockMask``, for side-by-side benchmarks.

Shape legend: ``B`` batch, ``H`` heads, ``Mq``/``Mk`` query/key blocks.

Fully allowed blocks become FlexAttention's "full" blocks (no ``mask_mod`` call); partial blocks keep the exact
predicate as a ``mask_mod`` that only indexes tensors captured on the mask's device, so it compiles into
FlexAttention's kernels.
"""

import torch
from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

from .block_mask import BlockMask
from .predicates import _GridPredicate, _position_tables

__all__ = ["to_flex_block_mask"]


def _kv_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's ``(kv_num_blocks (B, H, Mq), kv_indices (B, H, Mq, Mk))`` int32 for a block matrix: kept
    block ids first in ascending order, then the rest (ignored by FlexAttention)."""
    counts = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    return counts, order.to(torch.int32).contiguous()


def to_flex_block_mask(mask: BlockMask) -> FlexBlockMask:
    """The same attention pattern as a ``torch.nn.attention.flex_attention.BlockMask``.

    Args:
        mask: a visionattn ``BlockMask``; its ``token_mask`` (needed when any block is partial) must be a grid
            predicate of ``visionattn.layout.predicates`` (``NeighborhoodWindow``, ``CircularWindow``).

    Returns:
        FlexAttention ``BlockMask`` with ``BLOCK_SIZE=(block_q, block_k)``, ``seq_lengths=(q_len, kv_len)``: full
        blocks for fully allowed ones, masked blocks with a ``mask_mod`` evaluating ``token_mask`` for partial ones.

    Raises:
        NotImplementedError: partial blocks with a ``token_mask`` that is not a grid predicate.

    Example:
        >>> from visionattn.layout import TokenGrid, TokenLayout, neighborhood_block_mask
        >>> mask = neighborhood_block_mask(TokenLayout(TokenGrid((16, 16)), tile=(4, 4)), kernel_size=5)
        >>> to_flex_block_mask(mask).to_dense().shape  # (B, H, Mq, Mk) kept blocks
        torch.Size([1, 1, 16, 16])
    """
    keep, partial = mask.to_block_matrix()
    mask_mod = None
    if bool(partial.any()):
        predicate = mask.token_mask
        if not isinstance(predicate, _GridPredicate):
            raise NotImplementedError(
                "mask.token_mask must be a NeighborhoodWindow or CircularWindow to convert partial blocks; "
                f"got {type(predicate).__name__}."
            )
        tables = _position_tables(predicate.layout, mask.device)

        def mask_mod(b, h, q_idx, kv_idx):
            return predicate.evaluate(tables, q_idx, kv_idx)

    num_partial, partial_indices = _kv_blocks(partial)
    num_full, full_indices = _kv_blocks(keep & ~partial)
    return FlexBlockMask.from_kv_blocks(
        num_partial,
        partial_indices,
        num_full,
        full_indices,
        BLOCK_SIZE=(mask.block_q, mask.block_k),
        mask_mod=mask_mod,
        seq_lengths=(mask.q_len, mask.kv_len),
    )
