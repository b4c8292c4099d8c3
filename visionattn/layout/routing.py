"""Data-dependent block masks: BiFormer's top-k region routing and SLA's top-k ratio of pooled block scores.

Shape legend: ``B`` batch, ``H`` heads, ``N`` tokens (``Nq``/``Nk`` queries/keys), ``C`` channels (``D`` per head),
``R`` regions (tiles of a tile-order ``TokenLayout``), ``Mq``/``Mk`` query/key blocks.

Both builders are non-differentiable (the scores are computed from detached inputs) and purely block-level: a kept
block is fully allowed, except for padding keys of a tile-order layout.
"""

import torch

from ._utils import _block_geometry
from .block_mask import BlockMask
from .grid import TokenLayout
from .predicates import NeighborhoodWindow

__all__ = ["topk_ratio_block_mask", "topk_routing_block_mask"]


def _block_mean(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` ``(..., N, D)`` over each run of ``block`` rows, counting only ``valid`` rows (default: the
    rows that exist, so a short last block is averaged over its own rows); ``(..., ceil(N / block), D)`` float32
    (float64 for float64 input)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[-2]
    blocks = -(-n // block)
    x = x.detach()
    if valid is None:
        # sums in the compute dtype straight from x's storage (no upcast copy): the whole blocks as one view, then
        # the short last block
        whole = n // block
        sums = x[..., : whole * block, :].unflatten(-2, (whole, block)).sum(-2, dtype=compute) / block
        if whole == blocks:
            return sums
        tail = x[..., whole * block :, :].sum(-2, keepdim=True, dtype=compute) / (n - whole * block)
        return torch.cat([sums, tail], dim=-2)
    weight = valid.to(compute)
    padded = torch.zeros(*x.shape[:-2], blocks * block, x.shape[-1], dtype=compute, device=x.device)
    padded[..., :n, :] = x.to(compute) * weight[:, None]
    counts = torch.zeros(blocks * block, dtype=compute, device=x.device)
    counts[:n] = weight
    sums = padded.unflatten(-2, (blocks, block)).sum(-2)
    return sums / counts.view(blocks, block).sum(-1).clamp_min(1)[:, None]


def _valid_keys(layout: TokenLayout) -> NeighborhoodWindow:
    """Predicate allowing exactly the real keys: a neighborhood whose window is the whole grid.

    Reusing ``NeighborhoodWindow`` keeps routing masks within the predicates the kernels evaluate in-kernel.
    """
    nd = layout.grid.ndim
    return NeighborhoodWindow(layout, layout.grid.shape, (1,) * nd, (1,) * nd, (False,) * nd)


def topk_routing_block_mask(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, topk: int) -> BlockMask:
    r"""BiFormer's bi-level routing: each query region attends its ``topk`` most related key regions.

    .. math:: A^r = Q^r (K^r)^\top, \qquad I^r = \operatorname{topkIndex}(A^r)

    with :math:`Q^r, K^r \in \mathbb{R}^{R \times C}` the region means of the queries and keys (Zhu et al.,
    "BiFormer: Vision Transformer with Bi-Level Routing Attention", arXiv 2303.08810, Eqs. 2-4). Regions are the
    tiles of ``layout`` (one block each); means count only real tokens, so a padded border tile is the mean of its
    real tokens. Global tokens attend, and are attended by, every region. The routing is not differentiable.

    Args:
        q: queries in ``layout`` order, ``(B, N, C)`` for one routing shared by all heads (BiFormer) or
            ``(B, H, N, D)`` for one routing per head; ``N == layout.num_tokens``.
        k: keys, same shape as ``q``.
        layout: tile-order layout whose tiles are the regions (e.g. ``tile=(H // S, W // S)`` for BiFormer's
            ``S x S`` regions).
        topk: key regions per query region, ``>= 1``; ``-1`` (or any value ``>= R``) keeps all regions.

    Returns:
        ``BlockMask`` with batch/heads ``(B, 1)`` or ``(B, H)``, block size ``layout.block_size``; blocks are
        partial only where a key tile holds padding.

    Raises:
        TypeError: ``q``/``k`` are not float tensors or ``layout`` is not a ``TokenLayout``.
        ValueError: shapes disagree, ``layout`` is not tile order, or ``topk`` is invalid.

    Example:
        >>> layout = TokenLayout(TokenGrid((8, 8)), tile=(4, 4))
        >>> q = k = torch.randn(2, 64, 32)
        >>> topk_routing_block_mask(q, k, layout, topk=2).row_counts.unique().tolist()
        [2]
    """
    if not isinstance(layout, TokenLayout) or not layout.is_tiled:
        raise ValueError(f"layout must be a tile-order TokenLayout (its tiles are the regions); got {layout!r}.")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor; got {type(t)=}.")
    if q.ndim not in (3, 4) or q.shape != k.shape or q.shape[-2] != layout.num_tokens:
        raise ValueError(
            f"q and k must both be (B, N, C) or (B, H, N, D) with N = layout.num_tokens={layout.num_tokens}; "
            f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}."
        )
    if isinstance(topk, bool) or not isinstance(topk, int) or (topk < 1 and topk != -1):
        raise ValueError(f"topk must be an int >= 1, or -1 for all regions; got {topk=}.")
    block = layout.block_size
    geometry = _block_geometry(layout, block)
    first = layout.grid_offset // block
    regions = layout.num_grid_slots // block
    valid = layout.valid(q.device)
    q_r = _block_mean(q, block, valid)[..., first : first + regions, :]
    k_r = _block_mean(k, block, valid)[..., first : first + regions, :]
    scores = q_r @ k_r.transpose(-1, -2)  # (B, [H,] R, R)
    if q.ndim == 3:
        scores = scores[:, None]
    blocks = layout.num_tokens // block
    keep = torch.ones(*scores.shape[:2], blocks, blocks, dtype=torch.bool, device=q.device)
    if 0 < topk < regions:
        routed = torch.zeros_like(scores, dtype=torch.bool)
        routed.scatter_(-1, scores.topk(topk, dim=-1).indices, True)
        keep[..., first : first + regions, first : first + regions] = routed
    partial = geometry.has_padding.to(q.device).expand_as(keep)
    return BlockMask.from_block_matrix(
        keep,
        partial=partial,
        q_len=layout.num_tokens,
        kv_len=layout.num_tokens,
        block_q=block,
        block_k=block,
        token_mask=_valid_keys(layout),
    )


def _centred_block_means(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q̄, K̄)`` of :func:`topk_ratio_block_mask`: block means of q and of ``K − 1μ_Kᵀ`` (materialised in k's dtype,
    as the reference's ``k - k.mean(dim=-2, keepdim=True)``), ``(B, H, Mq, D)`` and ``(B, H, Mk, D)`` in q's and
    k's dtypes."""
    q, k = q.detach(), k.detach()
    centred = k - k.mean(dim=-2, keepdim=True)
    return _block_mean(q, block_q).to(q.dtype), _block_mean(centred, block_k).to(k.dtype)


def _check_pooled(pooled, q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> None:
    if not (isinstance(pooled, tuple) and len(pooled) == 2 and all(isinstance(t, torch.Tensor) for t in pooled)):
        raise TypeError(f"pooled must be a (Q̄, K̄) pair of tensors or None; got {type(pooled)=}.")
    expected = [(*t.shape[:2], -(-t.shape[2] // block), t.shape[3]) for t, block in ((q, block_q), (k, block_k))]
    got = [tuple(t.shape) for t in pooled]
    if got != expected:
        raise ValueError(f"pooled must hold (B, H, Mq, D) and (B, H, Mk, D) block means {expected}; got {got}.")


def topk_ratio_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_k: int,
    ratio: float,
    *,
    return_scores: bool = False,
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockMask | tuple[BlockMask, torch.Tensor]:
    r"""SLA's critical-block selection: each query block keeps the ``int(ratio * Mk)`` key blocks of highest score.

    .. math:: P = \bar{Q}\, \overline{(K - \mathbf{1}\mu_K^\top)}^\top, \qquad
        M_{ij} = [\, j \in \operatorname{top}_{\lfloor \rho M_k \rfloor}(P_{i,:}) \,]

    with :math:`\bar{\cdot}` the mean over each block of ``block_q``/``block_k`` tokens (a short last block is
    averaged over its own tokens), :math:`\mu_K` the mean key ("smooth-k") and :math:`\rho` = ``ratio``, as the
    released ``get_block_map`` computes it (Zhang et al., "SLA: Beyond Sparsity in Diffusion Transformers via
    Fine-Tunable Sparse-Linear Attention", arXiv 2509.24006, Sec. 4). Pooling accumulates in float32 and the pooled
    blocks are cast back to the input dtype before the score product, as the reference does. Not differentiable.

    Args:
        q: queries ``(B, H, Nq, D)``.
        k: keys ``(B, H, Nk, D)``.
        block_q: tokens per query block.
        block_k: tokens per key block.
        ratio: fraction of key blocks kept per query block, in ``[0, 1]``; the count is
            ``min(Mk, int(ratio * Mk))`` (the reference's rounding, which may be 0).

    Other Parameters:
        return_scores: also return the pooled scores ``P``.
        pooled: ``(Q̄, K̄)`` ``(B, H, Mq, D)``, ``(B, H, Mk, D)`` in q's and k's dtypes when the caller already
            pooled them as described (``sparse_linear_attention`` does, with a fused kernel that reads q and k in
            place); ``None`` pools here in PyTorch.

    Returns:
        ``BlockMask`` with batch/heads ``(B, H)`` and no partial blocks; with ``return_scores`` also ``P``
        ``(B, H, Mq, Mk)`` in q's dtype.

    Raises:
        TypeError: ``q``/``k`` are not float tensors, or ``pooled`` is not a pair of tensors.
        ValueError: shapes disagree (``pooled`` included), a block size is not a positive int, or ``ratio`` is
            outside ``[0, 1]``.

    Example:
        >>> q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
        >>> topk_ratio_block_mask(q, k, 64, 64, ratio=0.5).row_counts.unique().tolist()
        [2]
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor; got {type(t)=}.")
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must be (B, H, N, D) with matching B, H, D; got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}."
        )
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {name}={value!r}.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be a float in [0, 1]; got {ratio=}.")
    if pooled is not None:
        _check_pooled(pooled, q, k, block_q, block_k)
    return _topk_ratio_select(q, k, block_q, block_k, ratio, return_scores=return_scores, pooled=pooled)


def _topk_ratio_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_k: int,
    ratio: float,
    *,
    return_scores: bool = False,
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockMask | tuple[BlockMask, torch.Tensor]:
    """:func:`topk_ratio_block_mask` on arguments its caller has already checked (``sparse_linear_attention``
    validates them once per call, and its ``pooled`` comes from its own kernel)."""
    if pooled is None:
        pooled = _centred_block_means(q, k, block_q, block_k)
    pooled_q, pooled_k = pooled
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    num_k = scores.shape[-1]
    count = min(num_k, int(ratio * num_k))
    cols = scores.topk(count, dim=-1).indices
    mask = BlockMask._from_row_topk(cols, q_len=q.shape[2], kv_len=k.shape[2], block_q=block_q, block_k=block_k)
    return (mask, scores) if return_scores else mask
