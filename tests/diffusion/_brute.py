"""Brute-force attention patterns in raster order, written from the papers' rules (shared by the method and
model tests): ``(N, N)`` bool masks where text rows and columns are all True, and a float64 masked softmax."""

import torch

from visionattn.layout import TokenGrid
from visionattn.layout.radial import radial_block_mask


def masked_softmax(q, k, v, allowed):
    """``softmax(q kᵀ / sqrt(D))`` over the allowed keys, times ``v``."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _grid_allowed(grid: TokenGrid, pair_rule) -> torch.Tensor:
    n, start = grid.num_tokens, grid.extra_before
    coords = grid.coords().tolist()
    allowed = torch.ones(n, n, dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            allowed[start + i, start + j] = pair_rule(qc, kc)
    return allowed


def _natten_axis(q: int, k: int, length: int, kernel: int, stride: int, dilation: int) -> bool:
    """NATTEN's non-causal rule along one axis, written from shared/reference/diffusion.md §5.1."""
    if q % dilation != k % dilation:
        return False
    group_len = len(range(q % dilation, length, dilation))
    qg, kg = q // dilation, k // dilation
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    leader = min((qg // stride) * stride + stride // 2, group_len - 1)
    center = min(max(leader, left), group_len - 1 - right)
    return center - left <= kg <= center + right


def natten_allowed(grid: TokenGrid, kernel, stride, dilation) -> torch.Tensor:
    """Neighborhood attention with per-axis ``kernel``, ``stride``, ``dilation`` tuples."""
    rule = lambda qc, kc: all(
        _natten_axis(a, b, n, *p) for a, b, n, *p in zip(qc, kc, grid.shape, kernel, stride, dilation)
    )
    return _grid_allowed(grid, rule)


def circle_allowed(grid: TokenGrid, radius: float) -> torch.Tensor:
    """CLEAR's circular window: ``‖q − k‖² < r²``."""
    return _grid_allowed(grid, lambda qc, kc: sum((a - b) ** 2 for a, b in zip(qc, kc)) < radius**2)


def radial_allowed(grid: TokenGrid, block_size: int, decay_factor: float, sink: bool) -> torch.Tensor:
    """Radial Attention's mask (the layout builder lists text after the video; text before the grid is rotated)."""
    frames = grid.shape[0]
    text = grid.extra_before + grid.extra_after
    mask = radial_block_mask(
        frames, grid.num_grid_tokens // frames, block_size, decay_factor, sink=sink, extra_tokens=text
    ).to_dense()[0, 0]
    order = torch.roll(torch.arange(grid.num_tokens), -grid.extra_before)
    allowed = torch.empty_like(mask)
    allowed[order[:, None], order[None, :]] = mask
    return allowed
