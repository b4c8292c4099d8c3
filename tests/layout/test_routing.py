import itertools

import pytest
import torch

from visionattn.layout import TokenGrid, TokenLayout, topk_ratio_block_mask, topk_routing_block_mask


def _region_tokens(grid: TokenGrid, tile) -> list[list[int]]:
    """Raster indices of the real tokens of every tile (row-major tiles), straight from grid coordinates."""
    tiles_per_axis = [-(-s // t) for s, t in zip(grid.shape, tile)]
    regions = []
    for tile_idx in itertools.product(*(range(n) for n in tiles_per_axis)):
        members = []
        for coord in itertools.product(*(range(s) for s in grid.shape)):
            if all(c // t == i for c, t, i in zip(coord, tile, tile_idx)):
                flat = 0
                for c, s in zip(coord, grid.shape):
                    flat = flat * s + c
                members.append(grid.extra_before + flat)
        regions.append(members)
    return regions


def _topk_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: -float(scores[row, j]))
        keep[row, order[:count]] = True
    return keep


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
@pytest.mark.parametrize(
    "shape,tile,before,topk",
    [
        ((8, 8), (4, 4), 0, 2),
        ((7, 9), (4, 4), 0, 3),
        ((7, 9), (2, 4), 2, 1),
        ((4, 6, 5), (2, 2, 4), 0, 4),
        ((6, 6), (3, 3), 0, -1),
    ],
    ids=lambda v: str(v),
)
def test_topk_routing_block_mask_matches_brute_force(rng, shape, tile, before, topk, per_head):
    grid = TokenGrid(shape, extra_before=before)
    layout = TokenLayout(grid, tile=tile)
    b, h, c = 2, 3, 8
    lead = (b, h) if per_head else (b,)
    q_raster = torch.randn(*lead, grid.num_tokens, c, generator=rng, dtype=torch.float64)
    k_raster = torch.randn(*lead, grid.num_tokens, c, generator=rng, dtype=torch.float64)
    mask = topk_routing_block_mask(layout.to_layout(q_raster), layout.to_layout(k_raster), layout, topk)

    regions = _region_tokens(grid, tile)
    n_regions, first = len(regions), layout.grid_offset // layout.block_size
    keep, partial = mask.to_block_matrix()
    assert keep.shape[:2] == ((b, h) if per_head else (b, 1))
    for bi, hi in itertools.product(range(b), range(h if per_head else 1)):
        qs, ks = (x[bi, hi] if per_head else x[bi] for x in (q_raster, k_raster))
        q_r = torch.stack([qs[r].mean(0) for r in regions])
        k_r = torch.stack([ks[r].mean(0) for r in regions])
        count = n_regions if topk == -1 else topk
        expected = _topk_rows(q_r @ k_r.T, count)
        assert torch.equal(keep[bi, hi, first : first + n_regions, first : first + n_regions], expected)
        assert keep[bi, hi, :first].all() and keep[bi, hi, :, :first].all()
    # partial exactly where a kept key tile holds padding; to_dense never allows padding keys
    dense = mask.to_dense()
    assert not dense[..., ~layout.valid()].any()
    assert torch.equal(partial.any(2).any(1).any(0), keep.any(2).any(1).any(0) & _tile_has_padding(layout))


def _tile_has_padding(layout: TokenLayout) -> torch.Tensor:
    return ~layout.valid().view(-1, layout.block_size).all(-1)


def test_topk_routing_block_mask_rejects_bad_arguments():
    layout = TokenLayout(TokenGrid((8, 8)), tile=(4, 4))
    x = torch.randn(1, 64, 8)
    with pytest.raises(ValueError, match="layout"):
        topk_routing_block_mask(x, x, TokenLayout(TokenGrid((8, 8))), 2)
    with pytest.raises(ValueError, match="topk"):
        topk_routing_block_mask(x, x, layout, 0)
    with pytest.raises(ValueError, match="q and k"):
        topk_routing_block_mask(x, x[:, :60], layout, 2)
    with pytest.raises(TypeError, match="q"):
        topk_routing_block_mask(x.long(), x, layout, 2)


@pytest.mark.parametrize(
    "nq,nk,bq,bk,ratio",
    [(70, 45, 16, 8, 0.3), (128, 128, 64, 64, 0.5), (64, 100, 32, 16, 1.0), (64, 64, 16, 16, 0.1)],
    ids=lambda v: str(v),
)
def test_topk_ratio_block_mask_matches_brute_force(rng, nq, nk, bq, bk, ratio):
    b, h, d = 2, 2, 8
    q = torch.randn(b, h, nq, d, generator=rng, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=rng, dtype=torch.float64)
    mask, scores = topk_ratio_block_mask(q, k, bq, bk, ratio, return_scores=True)
    mq, mk = -(-nq // bq), -(-nk // bk)
    count = min(mk, int(ratio * mk))
    keep = mask.to_block_matrix()[0]
    assert (keep.sum(-1) == count).all()
    for bi, hi in itertools.product(range(b), range(h)):
        centred = k[bi, hi] - k[bi, hi].mean(0)
        q_p = torch.stack([q[bi, hi, i * bq : (i + 1) * bq].mean(0) for i in range(mq)])
        k_p = torch.stack([centred[j * bk : (j + 1) * bk].mean(0) for j in range(mk)])
        expected = q_p @ k_p.T
        torch.testing.assert_close(scores[bi, hi], expected)
        assert torch.equal(keep[bi, hi], _topk_rows(expected, count))


def test_topk_ratio_block_mask_takes_given_pooled_blocks(rng):
    """``pooled`` replaces the pooling: its own block means give the same mask and scores, other ones decide."""
    q = torch.randn(2, 3, 70, 8, generator=rng)
    k = torch.randn(2, 3, 45, 8, generator=rng)
    mask, scores = topk_ratio_block_mask(q, k, 16, 8, 0.4, return_scores=True)
    pooled = (q.unflatten(2, (-1, 10)).mean(3)[:, :, :5], k.unflatten(2, (-1, 5)).mean(3)[:, :, :6])
    given, given_scores = topk_ratio_block_mask(q, k, 16, 8, 0.4, return_scores=True, pooled=pooled)
    torch.testing.assert_close(given_scores, pooled[0] @ pooled[1].transpose(-1, -2))
    keep = given.to_block_matrix()[0]
    assert torch.equal(keep, torch.zeros_like(keep).scatter_(-1, given_scores.topk(2, dim=-1).indices, True))
    centred = k - k.mean(2, keepdim=True)
    means = lambda x, b: torch.stack([x[:, :, s : s + b].mean(2) for s in range(0, x.shape[2], b)], dim=2)
    same, same_scores = topk_ratio_block_mask(
        q, k, 16, 8, 0.4, return_scores=True, pooled=(means(q, 16), means(centred, 8))
    )
    torch.testing.assert_close(same_scores, scores)
    assert torch.equal(same.to_dense(), mask.to_dense())


def test_topk_ratio_block_mask_rejects_bad_arguments():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="ratio"):
        topk_ratio_block_mask(q, q, 16, 16, 1.5)
    with pytest.raises(ValueError, match="block_k"):
        topk_ratio_block_mask(q, q, 16, 0, 0.5)
    with pytest.raises(ValueError, match="q and k"):
        topk_ratio_block_mask(q, q[:, :1], 16, 16, 0.5)
    pooled = (q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="pooled"):
        topk_ratio_block_mask(q, q, 16, 32, 0.5, pooled=pooled)
    with pytest.raises(TypeError, match="pooled"):
        topk_ratio_block_mask(q, q, 16, 16, 0.5, pooled=list(pooled))
