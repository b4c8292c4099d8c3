import pytest
import torch

from tests.layout._brute_force import assert_block_mask_matches, natten_axis, neighborhood_raster_mask
from visionattn.layout import TokenGrid, TokenLayout, neighborhood_block_mask
from visionattn.layout.neighborhood import _check_neighborhood_args

# (shape, extra_before, extra_after, tile or None, block_size, kernel_size, stride, dilation, causal)
CASES = [
    ((37,), 2, 3, (8,), None, 6, 2, 3, True),
    ((37,), 2, 3, None, 8, 6, 2, 3, True),
    ((20,), 0, 0, None, 16, 5, 1, 1, False),
    ((7, 9), 3, 0, (4, 4), None, (3, 4), (1, 2), (2, 1), False),
    ((7, 9), 3, 0, None, 16, (3, 4), (1, 2), (2, 1), False),
    ((7, 9), 0, 4, (2, 4), None, (7, 9), 1, 1, (False, True)),
    ((8, 8), 0, 0, (4, 4), None, 4, 4, 1, False),
    ((5, 6, 7), 2, 3, (2, 4, 4), None, (2, 3, 5), (2, 1, 3), 1, (True, False, False)),
    ((5, 6, 7), 2, 3, None, 13, (2, 3, 5), (2, 1, 3), 1, (True, False, False)),
    ((5, 6, 7), 0, 0, (1, 4, 8), None, 3, 1, (1, 2, 2), False),
]


@pytest.mark.parametrize(
    "shape,before,after,tile,block,kernel,stride,dilation,causal",
    CASES,
    ids=[f"grid{c[0]}-tile{c[3]}-k{c[5]}-s{c[6]}-d{c[7]}-c{c[8]}" for c in CASES],
)
def test_neighborhood_block_mask_matches_brute_force(
    shape, before, after, tile, block, kernel, stride, dilation, causal
):
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    layout = TokenLayout(grid, tile=tile)
    mask = neighborhood_block_mask(layout, kernel, stride, dilation, causal, block_size=block)
    canonical = _check_neighborhood_args(grid, kernel, stride, dilation, causal)
    assert_block_mask_matches(mask, layout, neighborhood_raster_mask(grid, *canonical))


def test_natten_axis_matches_known_special_cases():
    # stride 1, odd kernel: diffusers' LTX-2 window [clamp(q - k//2, 0, L - k), +k)
    length, k = 11, 5
    expected = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        start = min(max(q - k // 2, 0), length - k)
        expected[q, start : start + k] = True
    assert torch.equal(natten_axis(length, k, 1, 1, False), expected)
    # stride == kernel_size on a divisible axis: blocked (Swin-style) windows
    idx = torch.arange(12)
    assert torch.equal(natten_axis(12, 4, 4, 1, False), idx[:, None] // 4 == idx[None, :] // 4)
    # every query attends exactly kernel_size keys, with or without dilation
    assert (natten_axis(13, 4, 2, 3, False).sum(1) == 4).all()


def test_neighborhood_block_mask_blocked_windows_are_dense_blocks():
    mask = neighborhood_block_mask(TokenLayout(TokenGrid((16, 16)), tile=(4, 4)), kernel_size=8, stride=8)
    assert not mask.partial.any()
    assert mask.token_mask is None  # no predicate: the kernels run their plain full-block walk
    assert mask.density() == pytest.approx(4 / 16)


def test_neighborhood_block_mask_accepts_grid_and_real_sizes():
    grid = TokenGrid((30, 48, 80), extra_after=256)
    mask = neighborhood_block_mask(TokenLayout(grid, tile=(2, 8, 8)), kernel_size=(18, 24, 24), stride=(16, 8, 8))
    assert mask.num_q_blocks == 902 and not mask.partial.any() and mask.token_mask is None
    assert 0.08 < mask.density() < 0.11
    deep = neighborhood_block_mask(TokenLayout(grid, tile=(4, 8, 8)), kernel_size=(18, 24, 24))
    assert deep.num_q_blocks == 8 * 6 * 10 + 1 and deep.partial.any() and deep.token_mask is not None
    raster = neighborhood_block_mask(TokenGrid((9, 10)), kernel_size=3, block_size=32)
    assert raster.block_q == 32 and raster.q_len == 90


def test_neighborhood_block_mask_long_1d_axis():
    # per-axis counts are closed-form at block edges: a 32K-token axis needs no 32K x 32K matrix (8.6 GB before)
    layout = TokenLayout(TokenGrid((32768,)), tile=(128,))
    blocked = neighborhood_block_mask(layout, kernel_size=2048, stride=2048)
    assert blocked.indices.numel() == 256 * 16 and not blocked.partial.any()
    sliding = neighborhood_block_mask(layout, kernel_size=2047)
    counts = sliding.row_counts.flatten()
    assert counts.min() == 16 and counts.max() == 17  # 2047 keys span 16 blocks at the borders, 17 inside
    assert bool(sliding.partial.any())


def test_neighborhood_block_mask_rejects_bad_arguments():
    layout = TokenLayout(TokenGrid((8, 8)), tile=(4, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_block_mask(layout, kernel_size=(9, 3))
    with pytest.raises(ValueError, match="dilation"):
        neighborhood_block_mask(layout, kernel_size=3, dilation=3)
    with pytest.raises(ValueError, match="stride"):
        neighborhood_block_mask(layout, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_block_mask(layout, kernel_size=(3, 3, 3))
    with pytest.raises(TypeError, match="causal"):
        neighborhood_block_mask(layout, kernel_size=3, causal=1)
    with pytest.raises(ValueError, match="block_size"):
        neighborhood_block_mask(layout, kernel_size=3, block_size=32)
    with pytest.raises(ValueError, match="block_size"):
        neighborhood_block_mask(TokenGrid((8, 8)), kernel_size=3, block_size=0)
    with pytest.raises(TypeError, match="layout"):
        neighborhood_block_mask((8, 8), kernel_size=3)
