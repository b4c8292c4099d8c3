"""Neighborhood-attention block masks (NATTEN / GNA semantics) for 1D/2D/3D token grids.

Shape legend: ``T``, ``Y``, ``X`` grid axes; ``N`` tokens of a ``TokenLayout``; ``M`` blocks of the layout.
"""

import torch

from ..kernels._constants import DEFAULT_BLOCK_SIZE
from ._utils import (
    _block_geometry,
    _check_block_size,
    _check_per_axis,
    _check_per_axis_bool,
    _classify_blocks,
)
from .block_mask import BlockMask
from .grid import TokenGrid, TokenLayout
from .predicates import NeighborhoodWindow, _neighborhood_bounds

__all__ = ["neighborhood_block_mask"]


def _as_layout(layout) -> TokenLayout:
    """A ``TokenLayout``; a bare ``TokenGrid`` means its raster order."""
    if isinstance(layout, TokenGrid):
        return TokenLayout(layout)
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout or a TokenGrid; got {type(layout)=}.")
    return layout


def _check_neighborhood_args(
    grid: TokenGrid, kernel_size, stride, dilation, causal
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Canonical per-axis ``(kernel_size, stride, dilation, causal)`` satisfying NATTEN's constraints on ``grid``.

    Constraints per axis: ``kernel_size * dilation <= grid.shape`` and ``1 <= stride <= kernel_size``.
    """
    nd = grid.ndim
    kernel_size = _check_per_axis("kernel_size", nd, kernel_size)
    stride = _check_per_axis("stride", nd, stride)
    dilation = _check_per_axis("dilation", nd, dilation)
    causal = _check_per_axis_bool("causal", nd, causal)
    for axis, length in enumerate(grid.shape):
        if kernel_size[axis] * dilation[axis] > length:
            raise ValueError(
                f"kernel_size * dilation must be <= the grid size on every axis; got kernel_size={kernel_size}, "
                f"dilation={dilation} for grid.shape={grid.shape} (axis {axis}). Use a smaller kernel_size or dilation."
            )
        if stride[axis] > kernel_size[axis]:
            raise ValueError(
                f"stride must be <= kernel_size on every axis; got stride={stride}, kernel_size={kernel_size}."
            )
    return kernel_size, stride, dilation, causal


def _axis_prefix_counts(
    length: int, kernel_size: int, stride: int, dilation: int, causal: bool, edges: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed-pair counts of the per-axis relation at box edges, without an ``L x L`` matrix.

    Returns ``(index, S)``: ``index`` ``(L + 1,)`` maps an edge coordinate to its row/column of ``S``, and
    ``S[index[i], index[j]]`` is the number of allowed pairs with ``q < i`` and ``k < j`` for edges ``i, j``.
    Query ``q`` allows the keys ``group + m * dilation`` for ``m`` in ``[lo, hi]`` (``_neighborhood_bounds``), so
    its count below ``j`` is closed-form; memory is ``L x len(edges)`` (a 32K-token 1D axis with 128-token blocks:
    67 MB instead of 8.6 GB).
    """
    q = torch.arange(length)[:, None]
    group, lo, hi = _neighborhood_bounds(q, length, kernel_size, stride, dilation, causal)
    below = torch.div(edges[None, :] - group - 1, dilation, rounding_mode="floor")  # last m with key < edge
    counts = (torch.minimum(hi, below) - lo.clamp(min=0) + 1).clamp(min=0)
    prefix = torch.cat([torch.zeros(1, len(edges), dtype=torch.long), counts.cumsum(0)])[edges]
    index = torch.full((length + 1,), -1, dtype=torch.long)
    index[edges] = torch.arange(len(edges))
    return index, prefix


def neighborhood_block_mask(
    layout: TokenLayout | TokenGrid,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    dilation: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    *,
    block_size: int | None = None,
) -> BlockMask:
    """Block mask of neighborhood attention on ``layout``'s grid (NATTEN/GNA semantics, per axis).

    Along each axis of length ``L`` a query at ``q`` attends keys ``k`` of its dilation group (``q % d == k % d``);
    inside the group, queries of a stride group share the window of their leader, a ``kernel_size`` window shifted
    inward at the borders (causal: the ``kernel_size`` keys ending at the leader, and ``k <= q``). A query attends
    a key iff every axis allows it (Hassani et al., "Neighborhood Attention Transformer", arXiv 2204.07143;
    "Generalized Neighborhood Attention", arXiv 2504.16922). Global tokens attend and are attended by everything.

    In tile order every block is one tile and most kept blocks are fully allowed; the builder works per axis and
    never evaluates token pairs, so real sizes (e.g. HunyuanVideo's 30 x 48 x 80 grid) build in well under a second.

    Args:
        layout: token layout the mask refers to (a bare ``TokenGrid`` means raster order).
        kernel_size: window size, an int or one per axis; ``kernel_size * dilation <= grid.shape``.
        stride: stride-group size, an int or one per axis; ``1 <= stride <= kernel_size``.
        dilation: dilation, an int or one per axis.
        causal: causal flag, a bool or one per axis.
        block_size: tokens per block; must be ``None`` (one tile) in tile order; in raster order ``None`` means 128.

    Returns:
        ``BlockMask`` with batch/heads ``(1, 1)``, ``q_len == kv_len == layout.num_tokens`` and ``token_mask`` the
        exact ``NeighborhoodWindow`` predicate (None when no block is partial); blocks are partial where some pair is
        masked or a key slot is padding.

    Raises:
        TypeError: ``layout`` or a per-axis argument has the wrong type.
        ValueError: an argument violates the constraints above.

    Example:
        >>> layout = TokenLayout(TokenGrid((16, 16)), tile=(4, 4))
        >>> mask = neighborhood_block_mask(layout, kernel_size=5)
        >>> mask.num_q_blocks, round(mask.density(), 3)
        (16, 0.391)
    """
    layout = _as_layout(layout)
    kernel_size, stride, dilation, causal = _check_neighborhood_args(layout.grid, kernel_size, stride, dilation, causal)
    block_size = _check_block_size(layout, block_size, DEFAULT_BLOCK_SIZE)
    geometry = _block_geometry(layout, block_size)
    prefixes = []
    for axis, (length, *args) in enumerate(zip(layout.grid.shape, kernel_size, stride, dilation, causal)):
        edges = torch.unique(torch.cat([geometry.boxes[..., axis, :].flatten(), torch.tensor([0, length])]))
        prefixes.append(_axis_prefix_counts(length, *args, edges))

    def relation(q_boxes: torch.Tensor, k_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        some = every = None
        for axis, (index, prefix) in enumerate(prefixes):
            q0, q1 = q_boxes[..., axis, 0], q_boxes[..., axis, 1]
            k0, k1 = k_boxes[..., axis, 0], k_boxes[..., axis, 1]
            i0, i1, j0, j1 = index[q0], index[q1], index[k0], index[k1]
            count = prefix[i1, j1] - prefix[i0, j1] - prefix[i1, j0] + prefix[i0, j0]
            axis_some, axis_every = count > 0, count == (q1 - q0) * (k1 - k0)
            some = axis_some if some is None else some & axis_some
            every = axis_every if every is None else every & axis_every
        return some, every

    keep, partial = _classify_blocks(geometry, geometry, relation)
    n = layout.num_tokens
    # a "perfectly block-sparse" configuration (GNA: every kept block fully allowed) carries no predicate, so the
    # kernels compile and run their plain full-block walk
    window = NeighborhoodWindow(layout, kernel_size, stride, dilation, causal) if bool(partial.any()) else None
    return BlockMask.from_block_matrix(
        keep[None, None],
        partial=partial[None, None],
        q_len=n,
        kv_len=n,
        block_q=block_size,
        block_k=block_size,
        token_mask=window,
    )
