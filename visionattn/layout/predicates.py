"""Exact token-level attention predicates on grid coordinates, shared by mask builders, references and kernels.

Each predicate is a frozen dataclass called as ``pred(q_idx, kv_idx) -> bool`` on broadcastable int64 positions
of its ``TokenLayout``. Global (extra) tokens attend to everything and are attended by everything; padding slots
are never attended. The Triton kernels evaluate the same rules in-kernel from the dataclass fields for blocks
flagged partial, so the rule is defined once, here.
"""

from dataclasses import dataclass

import torch

from .grid import TokenLayout

__all__ = ["CircularWindow", "NeighborhoodWindow"]


def _neighborhood_axis(
    q: torch.Tensor,
    k: torch.Tensor,
    length: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    causal: bool,
) -> torch.Tensor:
    """NATTEN/GNA rule along one axis (shared/reference/diffusion.md §5.1).

    With dilation ``d`` the axis splits into ``d`` interleaved groups (``q % d == k % d``) of length
    ``ceil((length - g) / d)``; inside a group, a stride group of queries shares its leader's window, which is
    shifted inward at the borders so it always holds ``kernel_size`` keys (causal: keys ``<= q`` within
    ``kernel_size`` of the leader, the last query of the stride group).
    """
    group = q % dilation
    same_group = group == (k % dilation)
    qg, kg = q // dilation, k // dilation
    group_len = (length - group + dilation - 1) // dilation
    left = kernel_size // 2
    right = kernel_size // 2 + (kernel_size % 2) - 1
    if causal:
        leader = torch.minimum((qg // stride) * stride + stride - 1, group_len - 1)
        inside = (kg <= qg) & (leader - kg < kernel_size)
    else:
        leader = torch.minimum((qg // stride) * stride + stride // 2, group_len - 1)
        center = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
        inside = (kg >= center - left) & (kg <= center + right)
    return same_group & inside


def _split(layout: TokenLayout, q_idx: torch.Tensor, kv_idx: torch.Tensor):
    q_idx, kv_idx = torch.broadcast_tensors(q_idx, kv_idx)
    q_kind, q_coords, _ = layout.token_coords(q_idx)
    k_kind, k_coords, k_valid = layout.token_coords(kv_idx)
    q_global, k_global = q_kind != 1, k_kind != 1
    in_grid = (k_coords < torch.tensor(layout.grid.shape, device=k_coords.device)).all(-1)
    return q_coords, k_coords, q_global, k_global, k_valid & (k_global | in_grid)


@dataclass(frozen=True)
class NeighborhoodWindow:
    """Neighborhood attention (NATTEN/GNA semantics) on ``layout``'s grid, per-axis canonical tuples.

    Args:
        layout: token layout the positions refer to.
        kernel_size: window size per axis (``kernel_size * dilation <= grid size``).
        stride: queries per stride group per axis (``1 <= stride <= kernel_size``).
        dilation: dilation per axis.
        causal: causal flag per axis.
    """

    layout: TokenLayout
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qc, kc, q_global, k_global, k_ok = _split(self.layout, q_idx, kv_idx)
        allowed = torch.ones(qc.shape[:-1], dtype=torch.bool, device=qc.device)
        for axis, length in enumerate(self.layout.grid.shape):
            allowed &= _neighborhood_axis(
                qc[..., axis],
                kc[..., axis],
                length,
                self.kernel_size[axis],
                self.stride[axis],
                self.dilation[axis],
                self.causal[axis],
            )
        return k_ok & (q_global | k_global | allowed)


@dataclass(frozen=True)
class CircularWindow:
    """CLEAR's circular window: image query attends image key iff ``sum_axis (q - k)^2 < radius^2`` (strict).

    Args:
        layout: token layout the positions refer to.
        radius: window radius ``r`` in grid units (CLEAR releases r in {8, 16, 32}).
    """

    layout: TokenLayout
    radius: float

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qc, kc, q_global, k_global, k_ok = _split(self.layout, q_idx, kv_idx)
        dist2 = ((qc - kc) ** 2).sum(-1)
        return k_ok & (q_global | k_global | (dist2 < self.radius**2))
