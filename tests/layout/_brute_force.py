"""Independent brute-force token-level definitions of the grid masks, and a checker for block classification."""

import itertools
import math

import torch

from visionattn.layout import BlockMask, TokenGrid, TokenLayout


def natten_axis(length: int, kernel_size: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """``(L, L)`` bool: key ``k`` is in query ``q``'s window, looping over NATTEN's formula (NATTEN's get_na_flex_mask)."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        group = q % dilation
        members = list(range(group, length, dilation))  # the dilation group, re-indexed 0..len-1
        qg, glen = members.index(q), len(members)
        if causal:
            leader = min(qg // stride * stride + stride - 1, glen - 1)
            window = [kg for kg in range(glen) if kg <= qg and leader - kg < kernel_size]
        else:
            leader = min(qg // stride * stride + stride // 2, glen - 1)
            left, right = kernel_size // 2, kernel_size // 2 + kernel_size % 2 - 1
            center = min(max(leader, left), glen - 1 - right)
            window = range(center - left, center + right + 1)
        for kg in window:
            allowed[q, members[kg]] = True
    return allowed


def raster_mask(grid: TokenGrid, grid_allowed: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` raster-order mask: ``grid_allowed`` ``(G, G)`` between grid tokens, global tokens free."""
    allowed = torch.ones(grid.num_tokens, grid.num_tokens, dtype=torch.bool)
    start, stop = grid.extra_before, grid.extra_before + grid.num_grid_tokens
    allowed[start:stop, start:stop] = grid_allowed
    return allowed


def _grid_coords(grid: TokenGrid) -> torch.Tensor:
    return torch.tensor(list(itertools.product(*(range(s) for s in grid.shape))))


def neighborhood_raster_mask(grid, kernel_size, stride, dilation, causal) -> torch.Tensor:
    coords = _grid_coords(grid)
    allowed = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis, args in enumerate(zip(grid.shape, kernel_size, stride, dilation, causal)):
        allowed &= natten_axis(*args)[coords[:, None, axis], coords[None, :, axis]]
    return raster_mask(grid, allowed)


def circular_raster_mask(grid, radius) -> torch.Tensor:
    coords = _grid_coords(grid)
    dist2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    return raster_mask(grid, dist2 < radius**2)


def to_layout_mask(layout: TokenLayout, raster: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The raster mask in ``layout`` order (padding keys never allowed) and the valid-slot vector."""
    src = layout.source_index()
    valid = src >= 0
    safe = src.clamp_min(0)
    mask = raster[safe][:, safe] & valid[None, :]
    return mask, valid


def assert_block_mask_matches(mask: BlockMask, layout: TokenLayout, raster: torch.Tensor) -> None:
    """Blocks are kept iff some real pair is allowed, non-partial blocks are fully allowed, to_dense is exact."""
    exact, valid = to_layout_mask(layout, raster)
    n, bq, bk = layout.num_tokens, mask.block_q, mask.block_k
    assert (mask.q_len, mask.kv_len) == (n, n)
    mq, mk = math.ceil(n / bq), math.ceil(n / bk)
    keep, partial = (m[0, 0] for m in mask.to_block_matrix())
    some = torch.zeros(mq * bq, mk * bk, dtype=torch.bool)
    some[:n, :n] = exact & valid[:, None]
    every = torch.ones(mq * bq, mk * bk, dtype=torch.bool)
    every[:n, :n] = exact | ~valid[:, None]
    expected_keep = some.view(mq, bq, mk, bk).any(3).any(1)
    expected_every = every.view(mq, bq, mk, bk).all(3).all(1)
    assert torch.equal(keep, expected_keep), f"kept blocks differ at {(keep ^ expected_keep).nonzero()[:4].tolist()}"
    assert torch.equal(partial, keep & ~expected_every), "partial flags differ"
    dense = mask.to_dense()[0, 0]
    assert torch.equal(dense[valid], exact[valid])
