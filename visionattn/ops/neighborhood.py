"""Neighborhood attention (NATTEN / GNA semantics) on 1D/2D/3D token grids, run as block-sparse attention.

Shape legend: ``B`` batch, ``H`` heads, ``N = grid.num_tokens`` tokens in raster order (global tokens included),
``D`` query/key head dim, ``Dv`` value head dim, ``Ne`` additional keys; grid axes ``(X,)``, ``(Y, X)`` or
``(T, Y, X)``.

The op permutes tokens into a tile order where every kernel block is one box of the grid, so a neighborhood is a
handful of dense blocks plus a thin rim of partial ones; the block mask is built once per configuration and cached.
"""

from typing import NamedTuple

import torch

from ..layout.block_mask import BlockMask
from ..layout.grid import TokenGrid, TokenLayout
from ..layout.neighborhood import _check_neighborhood_args, neighborhood_block_mask
from ..layout.predicates import NeighborhoodWindow
from ._checks import _check_attention_inputs, _check_per_axis, _check_scale
from .block_sparse import _REGISTRY as _BLOCK_SPARSE_BACKENDS
from .block_sparse import (
    block_sparse_attention,
    block_sparse_attention_gathered,
    triton_gathered_attention_available,
)
from .gather import gather_tokens, inverse_token_index

__all__ = ["default_neighborhood_tile", "neighborhood_attention", "neighborhood_attention_reference"]

#: Default tile per grid rank: 128-token boxes (one DEFAULT_BLOCK_SIZE kernel block), flattest along the
#: fastest axis so rows stay contiguous in memory.
_DEFAULT_TILES = {1: (128,), 2: (8, 16), 3: (2, 8, 8)}


def default_neighborhood_tile(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Tile used when ``tile=None``: 1D ``(128,)``, 2D ``(8, 16)``, 3D ``(2, 8, 8)``, each axis capped at the
    smallest power of two covering the grid axis (so a 5 x 6 x 7 grid gets ``(2, 8, 8)`` and a 20-token line
    ``(32,)``)."""
    return tuple(min(t, 1 << (s - 1).bit_length()) for t, s in zip(_DEFAULT_TILES[len(shape)], shape))


class _Plan(NamedTuple):
    """Device tensors of one configuration: gather maps into the tile order and back, and the block mask.

    ``q_index`` ``(q_len,)`` / ``kv_index`` ``(Nk_layout,)`` int32: raster index of each query / key slot, -1 for a
    padding slot (``gather_tokens`` zero-fills it; the gathered kernel never writes a -1 query row). ``out_slot``
    ``(N,)`` / ``kv_slot`` ``(Nk,)`` int32: their inverses, the slot of each raster query / key
    (``inverse_token_index``), so every permutation's backward is the gather by the other map and exact: padding
    query slots get zero output gradient (hence zero dQ and no share of dK/dV), padding key slots pass none back.
    ``kv_rows``: ``kv_index`` with padding slots reading row 0, for ``block_sparse_attention_gathered`` (the mask
    never admits a padding key).
    """

    q_index: torch.Tensor
    kv_index: torch.Tensor
    out_slot: torch.Tensor
    kv_slot: torch.Tensor
    kv_rows: torch.Tensor
    mask: BlockMask


def _key_layout(grid: TokenGrid, num_extra_kv: int, tile: tuple[int, ...]) -> TokenLayout:
    """The key sequence's layout: the additional keys are trailing global tokens of the key layout only."""
    key_grid = TokenGrid(grid.shape, extra_before=grid.extra_before, extra_after=grid.extra_after + num_extra_kv)
    return TokenLayout(key_grid, tile=tile)


#: Plans by ``(grid shape, extra before, extra after, additional keys, canonical args, tile, device)``: plain values,
#: so ``torch.compile`` can pass the key to ``_plan_tensors`` as constants.
_PLANS: dict[tuple, _Plan] = {}


def _neighborhood_plan(key: tuple) -> _Plan:
    """The ``_Plan`` of one configuration, built once (per call it would cost host-to-device copies and small ops).

    The query sequence stops after ``grid``'s own tokens, so the mask keeps its first ``q_len`` rows.
    """
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    shape, extra_before, extra_after, num_extra_kv, canonical_args, tile, device = key
    layout = _key_layout(TokenGrid(shape, extra_before, extra_after), num_extra_kv, tile)
    mask = neighborhood_block_mask(layout, *canonical_args)
    source = layout.source_index().to(torch.int32)
    q_len = layout.num_tokens if num_extra_kv == 0 else layout.grid_offset + layout.num_grid_slots + extra_after
    if q_len < layout.num_tokens:
        keep, partial = mask.to_block_matrix()
        rows = -(-q_len // mask.block_q)
        mask = BlockMask.from_block_matrix(
            keep[:, :, :rows],
            partial=partial[:, :, :rows],
            q_len=q_len,
            kv_len=layout.num_tokens,
            block_q=mask.block_q,
            block_k=mask.block_k,
            token_mask=mask.token_mask,
        )
    plan = _PLANS[key] = _Plan(
        q_index=source[:q_len].to(device),
        kv_index=source.to(device),
        out_slot=inverse_token_index(source[:q_len], layout.grid.num_tokens - num_extra_kv).to(device),
        kv_slot=inverse_token_index(source, layout.grid.num_tokens).to(device),
        kv_rows=source.clamp_min(0).to(device),
        mask=mask.to(device),
    )
    return plan


@torch.compiler.assume_constant_result
def _plan_tensors(key: tuple) -> tuple:
    """``_neighborhood_plan(key)`` as constants of a ``torch.compile`` graph: the plan is built (or taken from the
    cache) while tracing, as FlexAttention's block masks are built outside the graph."""
    plan = _neighborhood_plan(key)
    mask = plan.mask
    sizes = (mask.q_len, mask.kv_len, mask.block_q, mask.block_k)
    return (*plan[:-1], mask.indptr, mask.indices, mask.partial, *sizes, mask.token_mask is not None)


def _plan(grid: TokenGrid, num_extra_kv: int, canonical_args: tuple, tile: tuple[int, ...], device) -> _Plan:
    """The cached plan in eager mode; under ``torch.compile`` the same tensors as graph constants, with the mask
    rebuilt around them (its predicate is plain configuration)."""
    device = torch.device(device)
    key = (grid.shape, grid.extra_before, grid.extra_after, num_extra_kv, canonical_args, tile, str(device))
    if not torch.compiler.is_compiling():
        return _neighborhood_plan(key)
    *index, indptr, indices, partial, q_len, kv_len, block_q, block_k, has_partial = _plan_tensors(key)
    token_mask = NeighborhoodWindow(_key_layout(grid, num_extra_kv, tile), *canonical_args) if has_partial else None
    # without a predicate the eager plan's builder found no partial block: no data-dependent re-check while tracing
    mask = BlockMask(
        indptr, indices, partial, q_len, kv_len, block_q, block_k, token_mask=token_mask, _no_partial=not has_partial
    )
    return _Plan(*index, mask)


def _check_extra_kv(extra_kv, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``extra_kv`` is ``None`` or ``(k_extra (B, H, Ne, D), v_extra (B, H, Ne, Dv))`` matching q and v."""
    if extra_kv is None:
        return None
    if not (isinstance(extra_kv, (tuple, list)) and len(extra_kv) == 2):
        raise TypeError(f"extra_kv must be None or a (k_extra, v_extra) pair; got {type(extra_kv)=}.")
    k_extra, v_extra = extra_kv
    _check_attention_inputs(q, k_extra, v_extra)
    if v_extra.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"extra_kv values must have v's head dim; got v.shape={tuple(v.shape)}, "
            f"extra_kv[1].shape={tuple(v_extra.shape)}."
        )
    return k_extra, v_extra


def _check_grid_inputs(q: torch.Tensor, k: torch.Tensor, grid) -> None:
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a visionattn.layout.TokenGrid; got {type(grid)=}.")
    if q.shape[2] != grid.num_tokens or k.shape[2] != grid.num_tokens:
        raise ValueError(
            f"q and k must have grid.num_tokens={grid.num_tokens} tokens (dim 2) in raster order; "
            f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}."
        )


def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    dilation: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    *,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dense masked softmax over the ``NeighborhoodWindow`` predicate in raster order (any float dtype).

    Same arguments and result as ``neighborhood_attention``; ``O(N^2)`` memory, meant as the test oracle.
    """
    _check_attention_inputs(q, k, v)
    _check_grid_inputs(q, k, grid)
    extra_kv = _check_extra_kv(extra_kv, q, v)
    canonical = _check_neighborhood_args(grid, kernel_size, stride, dilation, causal)
    scale = _check_scale(scale, q.shape[-1])
    idx = torch.arange(grid.num_tokens, device=q.device)
    allowed = NeighborhoodWindow(TokenLayout(grid), *canonical)(idx[:, None], idx[None, :])
    if extra_kv is not None:
        k = torch.cat([k, extra_kv[0]], dim=2)
        v = torch.cat([v, extra_kv[1]], dim=2)
        allowed = torch.cat([allowed, allowed.new_ones(grid.num_tokens, extra_kv[0].shape[2])], dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    dilation: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    *,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    tile: int | tuple[int, ...] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Neighborhood attention on a 1D/2D/3D token grid, optionally with additional global keys.

    .. math:: O_i = \operatorname{softmax}_{j \in \rho(i) \cup E}\left(s\, q_i \cdot k_j\right) v_j

    where :math:`\rho(i)` is the neighborhood of query :math:`i`: per axis, a ``kernel_size`` window of its dilation
    group, shifted inward at the borders and shared by each stride group (causal: ending at the query), and
    :math:`E` the additional keys ``extra_kv`` (Hassani et al., "Neighborhood Attention Transformer",
    arXiv 2204.07143, Eq. 2; "Generalized Neighborhood Attention", arXiv 2504.16922). Global tokens of ``grid``
    attend to, and are attended by, every token. Even kernels are allowed.

    Args:
        q: queries ``(B, H, N, D)`` in raster order (``[extra_before | grid row-major | extra_after]``).
        k: keys ``(B, H, N, D)``.
        v: values ``(B, H, N, Dv)``.
        grid: the token grid; ``grid.num_tokens == N``.
        kernel_size: window size, an int or one per axis (``(2, 3)`` means 2 rows by 3 columns in 2D);
            ``kernel_size * dilation <= grid.shape`` on every axis.
        stride: queries per stride group, an int or one per axis; ``1 <= stride <= kernel_size``
            (``stride == kernel_size`` gives blocked, Swin-style windows).
        dilation: dilation, an int or one per axis.
        causal: causal flag, a bool or one per axis (e.g. ``(True, False, False)`` for causal in time).
        scale: score scale ``s``; ``None`` means ``D ** -0.5``.
        extra_kv: optional ``(k_extra, v_extra)``, ``(B, H, Ne, D)`` and ``(B, H, Ne, Dv)``: keys every query
            attends besides its neighborhood (NATTEN's ``additional_keys``, e.g. text tokens), merged exactly in
            the same softmax.

    Other Parameters:
        tile: tile shape of the tile order the kernels run in, one int per axis (an int broadcasts);
            ``None`` uses ``default_neighborhood_tile(grid.shape)`` (128-token boxes: 1D ``(128,)``, 2D
            ``(8, 16)``, 3D ``(2, 8, 8)``). Any tile is exact; it only changes speed.
        backend: backend of ``block_sparse_attention`` (``"triton"`` or ``"reference"``); ``None`` picks the first
            that supports the input.

    Returns:
        ``(B, H, N, Dv)`` in q's dtype, raster order.

    Raises:
        TypeError: bad tensor types or dtypes, ``grid`` not a ``TokenGrid``, bad per-axis argument types.
        ValueError: shapes disagree, or an argument violates the constraints above.
        NotImplementedError: the named backend cannot run this input.

    Example:
        >>> grid = TokenGrid((6, 10), extra_before=2)
        >>> q = k = v = torch.randn(1, 2, grid.num_tokens, 16)
        >>> neighborhood_attention(q, k, v, grid, kernel_size=(3, 5), backend="reference").shape
        torch.Size([1, 2, 62, 16])
    """
    _check_attention_inputs(q, k, v)
    _check_grid_inputs(q, k, grid)
    extra_kv = _check_extra_kv(extra_kv, q, v)
    canonical = _check_neighborhood_args(grid, kernel_size, stride, dilation, causal)
    tile = default_neighborhood_tile(grid.shape) if tile is None else _check_per_axis("tile", grid.ndim, tile)
    num_extra = 0 if extra_kv is None else extra_kv[0].shape[2]
    plan = _plan(grid, num_extra, canonical, tile, q.device)
    if extra_kv is not None:
        k = torch.cat([k, extra_kv[0]], dim=2)
        v = torch.cat([v, extra_kv[1]], dim=2)
    from ..kernels.block_sparse import use_tma

    if triton_gathered_attention_available(q, k, v, plan.mask, backend) and not use_tma(q):
        # inference: the kernel reads q, k, v and writes the output in raster order through the row maps (TMA
        # cannot gather rows, and where it serves, copies + TMA measured faster: HunyuanVideo 66.6 + ~5 vs 75.4 ms)
        scale = _check_scale(scale, q.shape[-1])
        return block_sparse_attention_gathered(q, k, v, plan.q_index, plan.kv_rows, plan.mask, scale=scale)
    if backend is not None:  # a named backend that cannot run q, k, v fails naming them, before the permutations
        _BLOCK_SPARSE_BACKENDS.select(backend, {"q": q, "k": k, "v": v, "block_mask": plan.mask})
    trusted = dict(backend=backend, check_index=False)  # the plan's maps, from inverse_token_index
    q_tiles = gather_tokens(q, plan.q_index, plan.out_slot, 2, **trusted)
    k_tiles, v_tiles = (gather_tokens(x, plan.kv_index, plan.kv_slot, 2, **trusted) for x in (k, v))
    out = block_sparse_attention(q_tiles, k_tiles, v_tiles, plan.mask, scale=scale, backend=backend)
    return gather_tokens(out, plan.out_slot, plan.q_index, 2, **trusted)
