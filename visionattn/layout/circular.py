"""CLEAR's circular-window block masks for token grids with global (text) tokens.

Shape legend: ``Y``, ``X`` grid axes (any rank works: the distance sums over axes); ``N`` layout tokens.
"""

import torch

from ..kernels._constants import DEFAULT_BLOCK_SIZE
from ._utils import _block_geometry, _check_block_size, _classify_blocks
from .block_mask import BlockMask
from .grid import TokenGrid, TokenLayout
from .neighborhood import _as_layout
from .predicates import CircularWindow

__all__ = ["circular_window_block_mask"]


def circular_window_block_mask(
    layout: TokenLayout | TokenGrid, radius: float, *, block_size: int | None = None
) -> BlockMask:
    """Block mask of CLEAR's circular window: an image query attends image keys with ``dy^2 + dx^2 < r^2``.

    Global (text) tokens attend everything and are attended by every query (Liu et al., "CLEAR: Conv-Like
    Linearization Revs Pre-Trained Diffusion Transformers Up", arXiv 2412.16112, Sec. 3.2). A block pair is kept iff
    the minimum squared distance between its two tiles is below ``r^2`` and is fully allowed iff the maximum is;
    both are sums of per-axis terms, so no token pair is evaluated.

    Args:
        layout: token layout the mask refers to (a bare ``TokenGrid`` means raster order).
        radius: window radius ``r`` in grid units, ``> 0`` (CLEAR releases 8, 16, 32).
        block_size: tokens per block; must be ``None`` (one tile) in tile order; in raster order ``None`` means 128.

    Returns:
        ``BlockMask`` with batch/heads ``(1, 1)``, ``q_len == kv_len == layout.num_tokens`` and ``token_mask`` the
        exact ``CircularWindow`` predicate.

    Raises:
        TypeError: ``layout`` or ``radius`` has the wrong type.
        ValueError: ``radius`` is not positive, or ``block_size`` does not fit the layout.

    Example:
        >>> layout = TokenLayout(TokenGrid((32, 32), extra_before=64), tile=(8, 8))
        >>> circular_window_block_mask(layout, radius=8).num_q_blocks
        17
    """
    layout = _as_layout(layout)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise TypeError(f"radius must be a number; got {type(radius)=}, {radius=}.")
    if not radius > 0:
        raise ValueError(f"radius must be > 0; got {radius=}.")
    block_size = _check_block_size(layout, block_size, DEFAULT_BLOCK_SIZE)
    radius2 = float(radius) ** 2

    def relation(q_boxes: torch.Tensor, k_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q0, q1 = q_boxes[..., 0], q_boxes[..., 1] - 1
        k0, k1 = k_boxes[..., 0], k_boxes[..., 1] - 1
        gap = torch.maximum(torch.maximum(k0 - q1, q0 - k1), torch.zeros_like(q0 - k1))
        span = torch.maximum(q1 - k0, k1 - q0)
        return (gap**2).sum(-1) < radius2, (span**2).sum(-1) < radius2

    geometry = _block_geometry(layout, block_size)
    keep, partial = _classify_blocks(geometry, geometry, relation)
    n = layout.num_tokens
    return BlockMask.from_block_matrix(
        keep[None, None],
        partial=partial[None, None],
        q_len=n,
        kv_len=n,
        block_q=block_size,
        block_k=block_size,
        token_mask=CircularWindow(layout, float(radius)),
    )
