"""Token grids, tile orders, block masks and their builders."""

from .block_mask import BlockMask
from .grid import TokenGrid, TokenLayout
from .predicates import CircularWindow, NeighborhoodWindow

__all__ = [
    "BlockMask",
    "CircularWindow",
    "NeighborhoodWindow",
    "TokenGrid",
    "TokenLayout",
]
