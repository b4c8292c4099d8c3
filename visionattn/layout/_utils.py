"""Private helpers of the mask builders: per-axis argument parsing and block geometry.

Grid-predicate builders never evaluate ``N x N`` token pairs. Every kernel block is described as a few boxes of grid
coordinates (one box per block in tile order, at most ``2 * ndim - 1`` boxes for a run of raster positions), plus
flags for global tokens and padding. A builder supplies a box-pair relation that says, for a query box and a key
box, whether *some* pair is allowed and whether *every* pair is; for a product-over-axes predicate (neighborhood)
or a separable sum (circle) both follow from per-axis quantities, so a block pair costs ``O(ndim)``.

``ops/_checks.py`` re-exports the per-axis parsers; they live here because ``layout`` sits above ``ops``.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .grid import TokenGrid, TokenLayout

__all__ = []

#: ``relation(q_boxes, k_boxes) -> (any_allowed, all_allowed)`` on broadcastable ``(..., ndim, 2)`` int64 boxes.
_BoxRelation = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: Upper bound on ``rows x key blocks x boxes x boxes`` evaluated at once (bounds builder memory to ~100 MB).
_CHUNK_ELEMENTS = 1 << 22

#: ``(key, device) -> tensors`` of :func:`_shape_constants`; cleared when it reaches ``_MAX_SHAPE_CONSTANTS`` entries.
_SHAPE_CONSTANTS: dict[tuple, object] = {}
_MAX_SHAPE_CONSTANTS = 256
# Private torch hook: a TorchDispatchMode (FakeTensorMode, FlopCounterMode) is active; without it nothing is cached.
_DISPATCH_STACK_LEN = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _memoized(store, key, device: torch.device, make: Callable[[], object], limit: int | None = None):
    """``store[key]`` (any mapping), made by ``make()`` (tensors on ``device``) on a miss, under the rules of
    :func:`_shape_constants` (built afresh and not stored while ``torch.compile`` traces, under a
    ``TorchDispatchMode``, and on a miss while the current CUDA stream captures a graph; made outside inference
    mode); ``store`` is cleared before it would exceed ``limit`` entries. Callers never write to what it returns."""
    if _DISPATCH_STACK_LEN is None or torch.compiler.is_compiling() or _DISPATCH_STACK_LEN() > 0:
        return make()
    found = store.get(key)
    if found is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return make()
        if limit is not None and len(store) >= limit:
            store.clear()
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                found = store[key] = make()
        else:
            found = store[key] = make()
    return found


def _shape_constants(key: tuple, device: torch.device, make: Callable[[], object]):
    """``make()``, tensors on ``device`` that depend only on the plain values ``key`` (e.g. the row offsets of a CSR
    with a fixed count per row), built once and reused by later eager calls: saves their allocation and the small
    kernels that fill them on every call. Read-only: callers never write to them. Built afresh while
    ``torch.compile`` traces, under a ``TorchDispatchMode`` (fake tensors must not be cached or mixed with real ones)
    and, on a miss, while the current CUDA stream captures a graph (the capture records the kernels that fill them
    without running them). Made outside inference mode, so that autograd may save them for a later backward."""
    return _memoized(_SHAPE_CONSTANTS, (key, device), device, make, _MAX_SHAPE_CONSTANTS)


def _check_int(name: str, value, minimum: int = 1) -> int:
    """An int ``>= minimum`` (bools rejected): ``TypeError`` for other types, ``ValueError`` below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {name}={value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {name}={value!r}.")
    return value


def _check_float(name: str, value, *, positive: bool = False) -> float:
    """A finite real number (``positive``: ``> 0``) as a float: ``TypeError`` for non-numbers (bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {name}={value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite float; got {name}={value!r}.")
    return float(value)


def _check_per_axis(name: str, ndim: int, value, minimum: int = 1) -> tuple[int, ...]:
    """Broadcast an int or a length-``ndim`` sequence to a tuple of ints ``>= minimum``.

    ``_check_per_axis("kernel_size", 2, 7) == (7, 7)``; ``(3, 5)`` stays ``(3, 5)``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints; got {name}={value!r}.")
    if isinstance(value, int):
        values = (value,) * ndim
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = tuple(value)
        if len(values) != ndim:
            raise ValueError(f"{name} must have one entry per grid axis ({ndim}); got {name}={value!r}.")
    else:
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints; got {type(value)=}, {name}={value!r}.")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum} on every axis; got {name}={value!r}.")
    return values


def _check_per_axis_bool(name: str, ndim: int, value) -> tuple[bool, ...]:
    """Broadcast a bool or a length-``ndim`` sequence of bools to a tuple of bools."""
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, Sequence) and len(value) == ndim and all(isinstance(v, bool) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a bool or a tuple of {ndim} bools; got {name}={value!r}.")


def _check_block_size(layout: TokenLayout, block_size, default: int) -> int:
    """Tile order fixes the block to one tile; raster order takes ``block_size`` (``None``: ``default``)."""
    if layout.is_tiled:
        if block_size is not None and block_size != layout.block_size:
            raise ValueError(
                f"block_size must be None or layout.block_size={layout.block_size} for a tile-order layout; "
                f"got block_size={block_size!r}. Change the layout's tile instead."
            )
        return layout.block_size
    if block_size is None:
        return default
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None; got block_size={block_size!r}.")
    return block_size


def _raster_boxes(start: int, end: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split the row-major index range ``[start, end)`` of ``shape`` into at most ``2 * ndim - 1`` boxes."""
    if start >= end:
        return []
    if len(shape) == 1:
        return [((start,), (end,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, end // inner
    full_inner = (tuple(0 for _ in shape[1:]), tuple(shape[1:]))
    if first == last:
        return [((first, *s), (first + 1, *e)) for s, e in _raster_boxes(start % inner, end % inner, shape[1:])]
    boxes = []
    if start % inner:
        boxes += [((first, *s), (first + 1, *e)) for s, e in _raster_boxes(start % inner, inner, shape[1:])]
        first += 1
    if last > first:
        boxes.append(((first, *full_inner[0]), (last, *full_inner[1])))
    if end % inner:
        boxes += [((last, *s), (last + 1, *e)) for s, e in _raster_boxes(0, end % inner, shape[1:])]
    return boxes


@dataclass(frozen=True)
class _BlockGeometry:
    """What each kernel block of a layout holds.

    Attributes:
        boxes: ``(M, K, ndim, 2)`` int64 ``[start, end)`` grid coordinates of the real grid tokens of each block, as
            ``K`` boxes (unused boxes are empty: ``start == end``).
        has_global: ``(M,)`` bool, the block holds a real global (extra) token.
        has_padding: ``(M,)`` bool, the block holds a padding slot inside the sequence.
    """

    boxes: torch.Tensor
    has_global: torch.Tensor
    has_padding: torch.Tensor

    @property
    def has_token(self) -> torch.Tensor:
        nonempty = (self.boxes[..., 1] > self.boxes[..., 0]).all(-1).any(-1)
        return nonempty | self.has_global


def _block_geometry(layout: TokenLayout, block_size: int) -> _BlockGeometry:
    """Block geometry of ``layout`` cut into blocks of ``block_size`` positions (tile order: one tile per block)."""
    grid = layout.grid
    shape = torch.tensor(grid.shape)
    if layout.is_tiled:
        tile = torch.tensor(layout.tile)
        origin = TokenGrid(layout.tiles_per_axis).coords() * tile
        tile_boxes = torch.stack([origin.clamp(max=shape), (origin + tile).clamp(max=shape)], dim=-1)
        tile_pad = ((tile_boxes[..., 1] - tile_boxes[..., 0]) < tile).any(-1)
        segments = []
        for count, slots in (
            (grid.extra_before, layout.extra_before_slots),
            (grid.extra_after, layout.extra_after_slots),
        ):
            n_blocks = slots // block_size
            pad = torch.zeros(n_blocks, dtype=torch.bool)
            if count % block_size:
                pad[-1] = True
            segments.append(pad)
        n_before, n_after = len(segments[0]), len(segments[1])
        empty = torch.zeros(1, grid.ndim, 2, dtype=torch.long)
        boxes = torch.cat([empty.expand(n_before, -1, -1, -1), tile_boxes[:, None], empty.expand(n_after, -1, -1, -1)])
        has_global = torch.cat(
            [torch.ones(n_before, dtype=torch.bool), torch.zeros_like(tile_pad), torch.ones(n_after, dtype=torch.bool)]
        )
        has_padding = torch.cat([segments[0], tile_pad, segments[1]])
        return _BlockGeometry(boxes.contiguous(), has_global, has_padding)
    first, last = grid.extra_before, grid.extra_before + grid.num_grid_tokens
    num_blocks = -(-layout.num_tokens // block_size)
    max_boxes = 2 * grid.ndim - 1
    boxes = torch.zeros(num_blocks, max_boxes, grid.ndim, 2, dtype=torch.long)
    has_global = torch.zeros(num_blocks, dtype=torch.bool)
    for b in range(num_blocks):
        start, end = b * block_size, min((b + 1) * block_size, layout.num_tokens)
        has_global[b] = start < first or end > last
        for i, (lo, hi) in enumerate(_raster_boxes(max(start, first) - first, min(end, last) - first, grid.shape)):
            boxes[b, i, :, 0] = torch.tensor(lo)
            boxes[b, i, :, 1] = torch.tensor(hi)
    return _BlockGeometry(boxes, has_global, torch.zeros(num_blocks, dtype=torch.bool))


def _classify_blocks(
    q_geom: _BlockGeometry, k_geom: _BlockGeometry, relation: _BoxRelation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(keep, partial)`` ``(Mq, Mk)`` block matrices of a grid predicate with global tokens and padding.

    A block pair is kept iff some real query attends some real key: global queries attend every real key, every
    query attends real global keys, grid pairs follow ``relation``. It is partial iff kept and not every (real
    query, key slot) pair is allowed, which includes every key block holding padding.
    """
    mq, kq = q_geom.boxes.shape[:2]
    mk, kk = k_geom.boxes.shape[:2]
    k_boxes = k_geom.boxes[None, :, None, :]
    k_empty = (k_boxes[..., 1] <= k_boxes[..., 0]).any(-1)
    q_token, k_token = q_geom.has_token, k_geom.has_token
    keep = torch.empty(mq, mk, dtype=torch.bool)
    partial = torch.empty(mq, mk, dtype=torch.bool)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, mk * kq * kk))
    for lo in range(0, mq, rows_per_chunk):
        hi = min(mq, lo + rows_per_chunk)
        q_boxes = q_geom.boxes[lo:hi, None, :, None]
        q_empty = (q_boxes[..., 1] <= q_boxes[..., 0]).any(-1)
        some, every = relation(q_boxes, k_boxes)
        empty = q_empty | k_empty
        grid_some = (some & ~empty).flatten(2).any(-1)
        grid_every = (every | empty).flatten(2).all(-1)
        keep[lo:hi] = (
            grid_some
            | (q_geom.has_global[lo:hi, None] & k_token[None, :])
            | (q_token[lo:hi, None] & k_geom.has_global[None, :])
        )
        partial[lo:hi] = keep[lo:hi] & ~(grid_every & ~k_geom.has_padding[None, :])
    return keep, partial
