import pytest

from tests.layout._brute_force import assert_block_mask_matches, circular_raster_mask
from visionattn.layout import TokenGrid, TokenLayout, circular_window_block_mask

# (shape, extra_before, extra_after, tile or None, block_size, radius)
CASES = [
    ((7, 9), 5, 0, (4, 4), None, 2.5),
    ((7, 9), 5, 0, None, 16, 3),
    ((16, 16), 16, 0, (4, 4), None, 4),
    ((5, 6, 7), 0, 3, (2, 4, 4), None, 2),
    ((23,), 1, 1, (8,), None, 5),
]


@pytest.mark.parametrize(
    "shape,before,after,tile,block,radius", CASES, ids=[f"grid{c[0]}-tile{c[3]}-r{c[5]}" for c in CASES]
)
def test_circular_window_block_mask_matches_brute_force(shape, before, after, tile, block, radius):
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    layout = TokenLayout(grid, tile=tile)
    mask = circular_window_block_mask(layout, radius, block_size=block)
    assert_block_mask_matches(mask, layout, circular_raster_mask(grid, radius))


def test_circular_window_block_mask_flux_size_is_sparse():
    layout = TokenLayout(TokenGrid((128, 128), extra_before=512), tile=(8, 8))
    mask = circular_window_block_mask(layout, radius=16)
    assert mask.num_q_blocks == 8 + 256
    assert mask.density() < 0.15


def test_circular_window_block_mask_rejects_bad_radius():
    layout = TokenLayout(TokenGrid((8, 8)), tile=(4, 4))
    with pytest.raises(ValueError, match="radius"):
        circular_window_block_mask(layout, 0)
    with pytest.raises(TypeError, match="radius"):
        circular_window_block_mask(layout, "8")
