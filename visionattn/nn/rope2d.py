"""2D rotary position embedding tables with interleaved pairs (RMT / MALA / RALA style).

The head dim ``D`` is split in two halves: pairs ``(2i, 2i+1)`` of the first half rotate by ``y·θ_i`` (the row
index), pairs of the second half by ``x·θ_i`` (the column index), with ``θ_i = base^(-i / (D/4 - 1))`` for
``i = 0 … D/4 - 1`` (``torch.linspace(0, 1, D/4)`` exponents, as in qhfan/MALA ``RoPE``). Rotation of one pair:

    (x_{2i}, x_{2i+1}) -> (x_{2i}·cos φ - x_{2i+1}·sin φ,  x_{2i+1}·cos φ + x_{2i}·sin φ)

which is ``x·cos + rotate_pairs(x)·sin`` with ``rotate_pairs(x)_{2i} = -x_{2i+1}``, ``rotate_pairs(x)_{2i+1} = x_{2i}``
(the reference's ``theta_shift``). Tables are recomputed from the grid size on every call, so any resolution works.
"""

import torch
from torch import nn

from ..layout import TokenGrid
from ..layout._utils import _shape_constants

__all__ = ["RoPE2d", "apply_rope2d", "rope2d_tables"]


def _check_head_dim(head_dim) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 4 or head_dim % 4:
        raise ValueError(f"head_dim must be a positive multiple of 4 (two axes x two per pair); got {head_dim=}.")
    return head_dim


def _check_grid_2d(grid) -> tuple[int, int]:
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a visionattn.layout.TokenGrid; got {type(grid)=}.")
    if grid.ndim != 2 or grid.extra_before or grid.extra_after:
        raise ValueError(f"grid must be a 2D grid (Y, X) without extra tokens; got {grid=}.")
    return grid.shape


def rope2d_tables(
    grid: TokenGrid,
    head_dim: int,
    *,
    base: float = 10000.0,
    device=None,
    dtype: torch.dtype = torch.float32,
    pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables of a 2D grid in raster order, each ``(Y·X, head_dim)``, or with ``pairs`` each
    ``(Y·X, head_dim / 2)``: one angle per interleaved pair (the two channels of a pair share it), the form
    ``visionattn.ops.linear_attention``'s kernels read at half the bytes.

    Args:
        grid: 2D ``TokenGrid((Y, X))`` without extra tokens.
        head_dim: per-head channels ``D`` (a multiple of 4).
        base: frequency base (10000 in the reference).
        device: device of the tables.
        dtype: dtype the tables are computed and returned in.
        pairs: return one column per channel pair instead of one per channel.
    """
    rows, cols = _check_grid_2d(grid)
    head_dim = _check_head_dim(head_dim)
    theta = 1.0 / base ** torch.linspace(0, 1, head_dim // 4, device=device, dtype=dtype)
    if not pairs:
        theta = theta.repeat_interleave(2)  # the pair's angle on both of its channels
    angle_y = torch.arange(rows, device=device, dtype=dtype)[:, None] * theta  # (Y, D/2), or (Y, D/4) with pairs
    angle_x = torch.arange(cols, device=device, dtype=dtype)[:, None] * theta
    angle = torch.cat(
        (angle_y[:, None, :].expand(rows, cols, -1), angle_x[None, :, :].expand(rows, cols, -1)), dim=-1
    ).reshape(rows * cols, -1)
    return angle.cos(), angle.sin()


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(..., N, D)`` by tables ``(N, D)``: ``x·cos + rotate_pairs(x)·sin``."""
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class RoPE2d(nn.Module):
    """Parameter-free 2D RoPE table generator for one head dim; tables depend only on the grid size."""

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        pairs: bool = False,
    ):
        """
        Args:
            head_dim: per-head channels ``D`` (a multiple of 4).
            base: frequency base.
            pairs: produce ``(Y·X, head_dim / 2)`` tables, one angle per channel pair (``rope2d_tables``), for
                ``visionattn.ops.linear_attention``; ``apply_rope2d`` takes the full ``(Y·X, head_dim)`` form.
        """
        super().__init__()
        self.head_dim = _check_head_dim(head_dim)
        self.base = base
        self.pairs = pairs

    def forward(self, grid: TokenGrid, like: torch.Tensor | None = None):
        """``(cos, sin)``, each ``(Y·X, head_dim)`` (``(Y·X, head_dim / 2)`` with ``pairs``), for the 2D ``grid``.

        Tables are on ``like``'s device (default: CPU), in float64 when ``like`` is float64 and in float32 otherwise
        (low-precision activations are rotated with fp32 tables, as the reference does under autocast). Eager calls
        reuse the tables of an earlier call with the same grid and settings (read-only; ten small kernels fewer per
        stage and forward); ``torch.compile`` builds them in its graph.
        """
        device = like.device if like is not None else torch.device("cpu")
        dtype = torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32
        key = ("rope2d", _check_grid_2d(grid), self.head_dim, self.base, dtype, self.pairs)
        make = lambda: rope2d_tables(grid, self.head_dim, base=self.base, device=device, dtype=dtype, pairs=self.pairs)
        return _shape_constants(key, device, make)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, pairs={self.pairs}"
