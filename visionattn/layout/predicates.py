"""Exact token-level attention predicates on grid coordinates, shared by mask builders, references and kernels.

Each predicate is a frozen dataclass called as ``pred(q_idx, kv_idx) -> bool`` on broadcastable int64 positions
of its ``TokenLayout``. Global (extra) tokens attend to everything and are attended by everything; padding slots
are never attended. The Triton kernels evaluate the same rules in-kernel from the dataclass fields for blocks
flagged partial, so the rule is defined once, here.
"""

import functools
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
    """NATTEN/GNA rule along one axis (NATTEN's ``get_na_flex_mask``).

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


@dataclass(frozen=True)
class _PositionTables:
    """Per-position lookups of a layout, ``(N,)`` each, on one device.

    ``is_global``: the slot belongs to an extra-token segment; ``key_ok``: the slot holds a real token;
    ``coords``: one grid coordinate tensor per axis (meaningless for global slots).
    """

    is_global: torch.Tensor
    key_ok: torch.Tensor
    coords: tuple[torch.Tensor, ...]


@functools.lru_cache(maxsize=64)
def _position_tables(layout: TokenLayout, device: torch.device) -> _PositionTables:
    idx = torch.arange(layout.num_tokens)
    kind, coords, valid = layout.token_coords(idx)
    return _PositionTables(
        is_global=(kind != 1).to(device),
        key_ok=valid.to(device),
        coords=tuple(coords[:, axis].contiguous().to(device) for axis in range(layout.grid.ndim)),
    )


class _GridPredicate:
    """Shared evaluation of grid predicates: global tokens attend/are attended by all, padding never attended."""

    layout: TokenLayout

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_idx, kv_idx = torch.broadcast_tensors(q_idx, kv_idx)
        n = self.layout.num_tokens
        tables = _position_tables(self.layout, q_idx.device)
        inside = (kv_idx >= 0) & (kv_idx < n)
        return inside & self.evaluate(tables, q_idx.clamp(0, n - 1), kv_idx.clamp(0, n - 1))

    def evaluate(self, tables: _PositionTables, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The predicate on in-range positions from precomputed ``tables``: indexing and pointwise ops only, so it
        also serves as a FlexAttention ``mask_mod`` body (``layout.flex``)."""
        allowed = self._grid_rule([c[q_idx] for c in tables.coords], [c[kv_idx] for c in tables.coords])
        return tables.key_ok[kv_idx] & (tables.is_global[q_idx] | tables.is_global[kv_idx] | allowed)

    def _grid_rule(self, q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class NeighborhoodWindow(_GridPredicate):
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

    def _grid_rule(self, q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> torch.Tensor:
        allowed = None
        for axis, length in enumerate(self.layout.grid.shape):
            axis_allowed = _neighborhood_axis(
                q_coords[axis],
                k_coords[axis],
                length,
                self.kernel_size[axis],
                self.stride[axis],
                self.dilation[axis],
                self.causal[axis],
            )
            allowed = axis_allowed if allowed is None else allowed & axis_allowed
        return allowed


@dataclass(frozen=True)
class CircularWindow(_GridPredicate):
    """CLEAR's circular window: image query attends image key iff ``sum_axis (q - k)^2 < radius^2`` (strict).

    Args:
        layout: token layout the positions refer to.
        radius: window radius ``r`` in grid units (CLEAR releases r in {8, 16, 32}).
    """

    layout: TokenLayout
    radius: float

    def _grid_rule(self, q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> torch.Tensor:
        dist2 = sum((q - k) ** 2 for q, k in zip(q_coords, k_coords))
        return dist2 < self.radius**2
