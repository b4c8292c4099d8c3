"""Token grids, tile orders, block masks and their builders."""

from .block_mask import BlockMask
from .circular import circular_window_block_mask
from .grid import TokenGrid, TokenLayout
from .neighborhood import neighborhood_block_mask
from .predicates import CircularWindow, NeighborhoodWindow
from .radial import radial_block_mask
from .routing import topk_ratio_block_mask, topk_routing_block_mask

__all__ = [
    "BlockMask",
    "CircularWindow",
    "NeighborhoodWindow",
    "TokenGrid",
    "TokenLayout",
    "circular_window_block_mask",
    "neighborhood_block_mask",
    "radial_block_mask",
    "topk_ratio_block_mask",
    "topk_routing_block_mask",
]
