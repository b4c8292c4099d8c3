"""AgentSD's agent tokens: ToMe bipartite soft matching of the grid tokens onto one destination per window.

Shape legend: ``B`` batch, ``H`` heads, ``N`` tokens, ``g`` grid tokens, ``n`` agents, ``D`` head dim.

Follows ToMe for Stable Diffusion's ``bipartite_soft_matching_random2d`` with ``use_rand=False`` (Bolya & Hoffman,
arXiv 2303.17604), as AgentSD uses it (Han et al., arXiv 2312.08874): the top-left token of every full
``sy × sx`` window is a destination, every other grid token a source; each source is matched to its most
cosine-similar destination, the ``r`` best-matched sources are averaged into their destinations, and the agents
are the unmatched sources followed by the destinations. On a video grid the windows tile every frame.
"""

import torch

from ..layout import TokenGrid

__all__ = ["agent_tokens"]


def _split_indices(grid: TokenGrid, sx: int, sy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster indices (within the grid) of the source and destination tokens."""
    coords = grid.coords()
    ys, xs = coords[:, -2], coords[:, -1]
    rows, cols = grid.shape[-2] // sy * sy, grid.shape[-1] // sx * sx
    dst = (ys % sy == 0) & (xs % sx == 0) & (ys < rows) & (xs < cols)
    return torch.nonzero(~dst).squeeze(-1), torch.nonzero(dst).squeeze(-1)


def agent_tokens(q: torch.Tensor, grid: TokenGrid, agent_ratio: float, sx: int, sy: int, state) -> torch.Tensor:
    """Agents ``(B, H, n, D)`` from the grid queries of ``q`` ``(B, H, N, D)``; all grid queries when no window fits.

    Args:
        q: queries in raster order, text tokens at ``grid.extra_before``/``extra_after``.
        grid: the token grid of ``q``.
        agent_ratio: fraction of the grid tokens merged away (at most the number of sources).
        sx: window width.
        sy: window height.
        state: ``DiffusionState`` whose cache keeps the source/destination split per grid.
    """
    b, h, _, d = q.shape
    start = grid.extra_before
    tokens = q[:, :, start : start + grid.num_grid_tokens].transpose(1, 2).flatten(2)  # (B, g, H*D)
    src_idx, dst_idx = state.cached(
        ("agent_split", grid.shape, sx, sy, q.device),
        lambda: tuple(t.to(q.device) for t in _split_indices(grid, sx, sy)),
    )
    r = min(int(grid.num_grid_tokens * agent_ratio), src_idx.numel())
    if dst_idx.numel() == 0 or r == 0:
        return tokens.unflatten(2, (h, d)).transpose(1, 2)
    metric = tokens / tokens.norm(dim=-1, keepdim=True)
    src, dst = tokens[:, src_idx], tokens[:, dst_idx]
    scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # (B, n_src, n_dst)
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    unmerged, merged = order[:, r:], order[:, :r]
    target = best_dst.gather(1, merged)
    channels = tokens.shape[-1]
    kept_src = src.gather(1, unmerged[..., None].expand(-1, -1, channels))
    moved = src.gather(1, merged[..., None].expand(-1, -1, channels))
    dst = dst.scatter_reduce(1, target[..., None].expand(-1, -1, channels), moved, reduce="mean", include_self=True)
    return torch.cat([kept_src, dst], dim=1).unflatten(2, (h, d)).transpose(1, 2).reshape(b, h, -1, d)
