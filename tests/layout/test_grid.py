import itertools

import pytest
import torch

from visionattn.layout import TokenGrid, TokenLayout

GRIDS = [
    ((10,), (4,), 0, 0),
    ((7, 9), (4, 4), 3, 0),
    ((5, 6, 7), (2, 4, 4), 0, 5),
    ((8, 8), (8, 8), 1, 2),
    ((3, 5), None, 2, 1),
]


@pytest.mark.parametrize("shape,tile,before,after", GRIDS, ids=lambda v: str(v))
def test_token_layout_round_trip_is_exact(shape, tile, before, after):
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    layout = TokenLayout(grid, tile=tile)
    x = torch.randn(2, 3, grid.num_tokens, 5, dtype=torch.float64)
    y = layout.to_layout(x)
    assert y.shape[-2] == layout.num_tokens
    assert torch.equal(layout.from_layout(y), x)
    # padding slots are zero and flagged invalid
    assert torch.all(y[..., ~layout.valid(), :] == 0)
    assert int(layout.valid().sum()) == grid.num_tokens


@pytest.mark.parametrize("shape,tile,before,after", GRIDS[:4], ids=lambda v: str(v))
def test_token_layout_tiles_are_boxes(shape, tile, before, after):
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    layout = TokenLayout(grid, tile=tile)
    bs = layout.block_size
    assert layout.grid_offset % bs == 0 and layout.num_tokens % bs == 0
    coords = layout.slot_coords_cpu
    for start in range(0, layout.num_grid_slots, bs):
        box = coords[start : start + bs]
        lo = box.min(0).values
        # each block covers exactly one tile-shaped box, row-major inside
        expected = torch.tensor(list(itertools.product(*[range(t) for t in tile]))) + lo
        assert torch.equal(box, expected)


@pytest.mark.parametrize(
    "shape,before,after,tile",
    [
        ((3, 4), 2, 1, (2, 2)),
        ((7, 9), 3, 2, (4, 4)),
        ((5, 6, 7), 0, 5, (2, 4, 4)),
        ((20,), 2, 0, None),
        ((5, 6, 7), 1, 1, None),
    ],
)
def test_token_coords_classifies_segments(shape, before, after, tile):
    # token_coords is arithmetic; source_index and grid.coords are the independent lookup tables it must match
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    layout = TokenLayout(grid, tile=tile)
    idx = torch.arange(-2, layout.num_tokens + 3)
    kind, coords, valid = layout.token_coords(idx)
    inside = (idx >= 0) & (idx < layout.num_tokens)
    src = torch.full_like(idx, -1)
    src[inside] = layout.source_index()
    assert torch.equal(valid, src >= 0)
    assert int((kind[inside] == 0).sum()) == layout.extra_before_slots
    assert int((kind[inside] == 2).sum()) == layout.extra_after_slots
    raster = grid.coords()
    grid_slots = (kind == 1) & valid
    assert torch.equal(coords[grid_slots], raster[src[grid_slots] - grid.extra_before])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shape=(2, 3, 4, 5)), "shape"),
        (dict(shape=(0, 3)), "shape"),
        (dict(shape=(4,), extra_before=-1), "extra_before"),
        (dict(shape=(4,), extra_after=1.5), "extra_after"),
    ],
)
def test_token_grid_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenGrid(**kwargs)


def test_token_layout_rejects_bad_tile_and_lengths():
    grid = TokenGrid((4, 4))
    with pytest.raises(ValueError, match="tile"):
        TokenLayout(grid, tile=(4,))
    layout = TokenLayout(grid, tile=(2, 2))
    with pytest.raises(ValueError, match="x must have"):
        layout.to_layout(torch.zeros(1, 15, 2))
    with pytest.raises(ValueError, match="x must have"):
        layout.from_layout(torch.zeros(1, 15, 2))
