"""Token grids and the token layouts the kernels see.

Shape legend: ``T`` frames, ``Y`` rows, ``X`` columns of the spatial grid; ``N`` tokens in a sequence.

A ``TokenGrid`` is the spatial grid ``(X,)``, ``(Y, X)`` or ``(T, Y, X)`` plus global tokens (text, cls,
registers) that sit before or after it in the sequence, as diffusers' joint-attention DiTs and ViTs with a cls
token lay them out. A ``TokenLayout`` says where each token of a grid lives in the sequence a kernel sees:

* raster order (``tile=None``): ``[extra_before | grid in row-major order | extra_after]``, exactly the input;
* tile order: ``[extra_before, padded | tile 0 | tile 1 | ... | extra_after, padded]``, where every tile is
  ``prod(tile)`` consecutive tokens covering one ``tile``-shaped box of the grid (tiles in row-major order, tokens
  row-major inside a tile). Grid axes that ``tile`` does not divide are padded, and the extra-token segments are
  padded to a multiple of ``prod(tile)``, so every kernel block of ``prod(tile)`` tokens is one tile or one chunk
  of global tokens. Padding slots are invalid: they are never attended to and their outputs are dropped.

Local patterns (neighborhood windows, circles) become dense-or-empty blocks in tile order, which is what makes
2D/3D sparsity fast.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["TokenGrid", "TokenLayout"]


@dataclass(frozen=True)
class TokenGrid:
    """A 1D/2D/3D token grid plus global tokens before and after it.

    Args:
        shape: grid size per axis, ``(X,)``, ``(Y, X)`` or ``(T, Y, X)``.
        extra_before: number of global tokens (e.g. FLUX's text tokens, a cls token) before the grid.
        extra_after: number of global tokens after the grid (e.g. HunyuanVideo's text tokens).

    Example:
        >>> TokenGrid((4, 6), extra_before=1).num_tokens
        25
    """

    shape: tuple[int, ...]
    extra_before: int = 0
    extra_after: int = 0

    def __post_init__(self):
        shape = tuple(self.shape) if not isinstance(self.shape, int) else (self.shape,)
        if not 1 <= len(shape) <= 3 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise ValueError(
                f"shape must be a tuple of 1 to 3 ints (X,), (Y, X) or (T, Y, X); got shape={self.shape!r}."
            )
        if any(s < 1 for s in shape):
            raise ValueError(f"shape must be positive on every axis; got shape={self.shape!r}.")
        for name in ("extra_before", "extra_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {name}={value!r}.")
        object.__setattr__(self, "shape", shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_grid_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def num_tokens(self) -> int:
        return self.extra_before + self.num_grid_tokens + self.extra_after

    def coords(self, device=None) -> torch.Tensor:
        """Raster-order grid coordinates, ``(num_grid_tokens, ndim)`` int64."""
        axes = [torch.arange(s, device=device) for s in self.shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.ndim)


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of ``grid`` sits in the sequence a kernel sees (see the module docstring).

    Args:
        grid: the token grid.
        tile: tile shape per grid axis for tile order, or ``None`` for raster order.

    Example:
        >>> layout = TokenLayout(TokenGrid((7, 9)), tile=(4, 4))
        >>> layout.num_tokens, layout.block_size   # 2 x 3 tiles of 16 slots
        (96, 16)
    """

    grid: TokenGrid
    tile: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.tile is not None:
            tile = tuple(self.tile)
            if len(tile) != self.grid.ndim or any(not isinstance(t, int) or t < 1 for t in tile):
                raise ValueError(
                    f"tile must have one positive int per grid axis ({self.grid.ndim}); got tile={self.tile!r}."
                )
            object.__setattr__(self, "tile", tile)

    @property
    def is_tiled(self) -> bool:
        return self.tile is not None

    @property
    def block_size(self) -> int | None:
        """Tokens per tile (the kernel block size that makes each block one tile), ``None`` in raster order."""
        return math.prod(self.tile) if self.tile is not None else None

    @property
    def tiles_per_axis(self) -> tuple[int, ...]:
        if self.tile is None:
            return (1,) * self.grid.ndim
        return tuple(-(-s // t) for s, t in zip(self.grid.shape, self.tile))

    @property
    def padded_shape(self) -> tuple[int, ...]:
        if self.tile is None:
            return self.grid.shape
        return tuple(n * t for n, t in zip(self.tiles_per_axis, self.tile))

    def _pad_extra(self, n: int) -> int:
        if self.tile is None:
            return n
        return -(-n // self.block_size) * self.block_size

    @property
    def extra_before_slots(self) -> int:
        return self._pad_extra(self.grid.extra_before)

    @property
    def extra_after_slots(self) -> int:
        return self._pad_extra(self.grid.extra_after)

    @property
    def grid_offset(self) -> int:
        """Sequence position of the first grid slot."""
        return self.extra_before_slots

    @property
    def num_grid_slots(self) -> int:
        return math.prod(self.padded_shape)

    @property
    def num_tokens(self) -> int:
        """Sequence length in this layout, padding slots included."""
        return self.extra_before_slots + self.num_grid_slots + self.extra_after_slots

    @cached_property
    def _source_index_cpu(self) -> torch.Tensor:
        g = self.grid
        before = torch.full((self.extra_before_slots,), -1, dtype=torch.long)
        before[: g.extra_before] = torch.arange(g.extra_before)
        after = torch.full((self.extra_after_slots,), -1, dtype=torch.long)
        after[: g.extra_after] = torch.arange(g.extra_after) + g.extra_before + g.num_grid_tokens
        coords = self.slot_coords_cpu
        inside = (coords < torch.tensor(g.shape)).all(-1)
        strides = torch.tensor([math.prod(g.shape[i + 1 :]) for i in range(g.ndim)])
        raster = (coords * strides).sum(-1) + g.extra_before
        middle = torch.where(inside, raster, torch.full_like(raster, -1))
        return torch.cat([before, middle, after])

    @cached_property
    def slot_coords_cpu(self) -> torch.Tensor:
        """Grid coordinate of every grid slot in layout order, ``(num_grid_slots, ndim)`` (may exceed the grid: padding)."""
        if self.tile is None:
            return self.grid.coords()
        nd = self.grid.ndim
        tiles = TokenGrid(self.tiles_per_axis).coords()  # (num_tiles, nd)
        inner = TokenGrid(self.tile).coords()  # (tile_size, nd)
        return (tiles[:, None, :] * torch.tensor(self.tile) + inner[None, :, :]).reshape(-1, nd)

    def source_index(self, device=None) -> torch.Tensor:
        """For each layout slot, the raster sequence index it holds, or ``-1`` for padding; ``(num_tokens,)``."""
        return self._source_index_cpu.to(device)

    def valid(self, device=None) -> torch.Tensor:
        """Bool ``(num_tokens,)``: True where a layout slot holds a real token."""
        return self.source_index(device) >= 0

    def to_layout(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Permute raster-order ``x`` (``grid.num_tokens`` along ``dim``) into this layout, zero-filling padding."""
        if x.shape[dim] != self.grid.num_tokens:
            raise ValueError(
                f"x must have grid.num_tokens={self.grid.num_tokens} tokens along dim={dim}; got x.shape={tuple(x.shape)}."
            )
        if self.tile is None:
            return x
        index = self.source_index(x.device)
        out = x.index_select(dim, index.clamp_min(0))
        shape = [1] * x.ndim
        shape[dim] = -1
        return out * (index >= 0).view(shape).to(x.dtype)

    def from_layout(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of ``to_layout``: back to raster order, padding slots dropped."""
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"x must have layout.num_tokens={self.num_tokens} tokens along dim={dim}; got x.shape={tuple(x.shape)}."
            )
        if self.tile is None:
            return x
        index = self.source_index(x.device)
        slots = torch.nonzero(index >= 0).squeeze(-1)
        order = torch.argsort(index[slots])
        return x.index_select(dim, slots[order])

    def token_coords(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classify layout positions ``idx`` (any shape, int64) by integer arithmetic on the layout's sizes (no
        lookup tables, so ``torch.compile`` traces it; tested against ``source_index``).

        Returns ``(kind, coords, valid)``: ``kind`` is 0 for an extra-before slot, 1 for a grid slot, 2 for an
        extra-after slot; ``coords`` is ``idx.shape + (ndim,)`` grid coordinates (meaningless unless kind == 1);
        ``valid`` is False for padding slots and positions past the end.
        """
        grid, tile, tiles = self.grid, self.tile or self.grid.shape, self.tiles_per_axis
        inside = (idx >= 0) & (idx < self.num_tokens)
        safe = idx.clamp(0, self.num_tokens - 1)
        rel = safe - self.grid_offset
        in_slots = (rel >= 0) & (rel < self.num_grid_slots)
        rel = rel.clamp(0, self.num_grid_slots - 1)
        tile_id, inner = rel // math.prod(tile), rel % math.prod(tile)
        coords = torch.stack(
            [
                (tile_id // math.prod(tiles[a + 1 :])) % tiles[a] * tile[a]
                + (inner // math.prod(tile[a + 1 :])) % tile[a]
                for a in range(grid.ndim)
            ],
            dim=-1,
        )
        in_grid = (coords < torch.tensor(grid.shape, device=idx.device)).all(-1)
        after = safe - self.grid_offset - self.num_grid_slots
        extra_ok = torch.where(safe < self.grid_offset, safe < grid.extra_before, after < grid.extra_after)
        valid = inside & torch.where(in_slots, in_grid, extra_ok)
        kind = torch.where(safe < self.grid_offset, 0, torch.where(in_slots, 1, 2))
        return kind, coords, valid
