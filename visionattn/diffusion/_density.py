"""Exact attention densities: the fraction of (query, key) pairs a method computes with softmax.

Shape legend: ``N`` tokens (text and grid), ``g`` grid tokens, ``Mq``/``Mk`` query/key blocks.

Text tokens stay global in every masked method (they attend to all tokens and all tokens attend to them), so a
pattern's pair count is its grid-pair count plus ``2·g·text + text²``. The grid-pair counts here are exact and never
build the ``N × N`` mask: the neighborhood rule is a product over axes of per-query window sizes (``O(Σ L)``), the circle counts offsets
(``O(Π min(L, 2r + 1))``), and block masks without partial blocks sum their kept block areas (``O(kept blocks)``).
The processors compute them once per cached mask or window.
"""

import math

import torch

from ..layout import BlockMask, TokenGrid
from ..layout.predicates import _neighborhood_bounds

__all__ = []


def with_text(grid: TokenGrid, grid_pairs: float) -> float:
    """Density over the joint sequence of ``grid`` when the grid tokens form ``grid_pairs`` pairs among themselves."""
    n, g = grid.num_tokens, grid.num_grid_tokens
    text = grid.extra_before + grid.extra_after
    return (grid_pairs + 2 * g * text + text * text) / (n * n)


def neighborhood_pairs(
    shape: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> int:
    """Grid pairs of non-causal neighborhood attention (NATTEN/GNA): the product over axes of the per-axis counts."""
    pairs = 1
    for length, kernel, step, dil in zip(shape, kernel_size, stride, dilation):
        _, lo, hi = _neighborhood_bounds(torch.arange(length), length, kernel, step, dil, False)
        pairs *= int((hi - lo + 1).sum())  # each query's window holds hi - lo + 1 keys of its group
    return pairs


def circle_pairs(shape: tuple[int, ...], radius: float) -> int:
    """Grid pairs ``(q, k)`` with ``‖q − k‖² < radius²``: offset ``δ`` occurs ``Π (L_i − |δ_i|)`` times."""
    squares, counts = torch.zeros(()), torch.ones((), dtype=torch.long)
    for length in shape:
        reach = min(length - 1, math.floor(radius))
        offsets = torch.arange(-reach, reach + 1)
        squares = squares[..., None] + offsets.double() ** 2
        counts = counts[..., None] * (length - offsets.abs())
    return int(counts[squares < radius**2].sum())


def block_mask_density(mask: BlockMask) -> torch.Tensor:
    """Exact token-pair density (0-d float64 tensor, on the mask's device) of a mask without partial blocks.

    Each kept block contributes (rows of its query block) x (keys of its key block); the short last blocks count
    their real tokens. Static shapes only: no host sync, so it runs inside ``torch.compile`` graphs.
    """
    if mask.token_mask is not None and bool(mask.partial.any()):
        raise ValueError("mask must have no partial blocks for block_mask_density; got partial blocks.")
    b, h = mask.batch_heads
    return mask.entry_areas().sum().double() / (b * h * mask.q_len * mask.kv_len)
