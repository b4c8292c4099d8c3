"""The routed-attention kernels' tiling: the autotuner's pruned configs and the tiles they give (the kernels'
numerics are tested through the op, tests/ops/test_routed.py)."""

import pytest

from visionattn.kernels import routed


@pytest.mark.parametrize("region,topk", [(1, 16), (4, 16), (6, 4), (16, 4), (64, 1), (100, 16)])
def test_routed_prune_keeps_distinct_tiles_of_at_least_16_rows(region, topk):
    r_pad = routed.next_pow2(region)
    kept = routed._prune(routed._CONFIGS, {"REGIONS": 49}, R_PAD=r_pad, TOPK=topk, HEAD_DIM=32, HEAD_DIM_V=32)
    variants = set()
    for config in kept:
        tiles = {"R_PAD": r_pad, "TOPK": topk, **config.kwargs}
        for name, heuristic in routed._TILES.items():
            tiles[name] = heuristic(tiles)
        rows, cols = tiles["G"] * r_pad, tiles["G"] * tiles["KB"] * r_pad
        assert rows >= 16 and cols >= rows and tiles["KB"] <= routed.next_pow2(topk)
        variants.add((tiles["G"], tiles["KB"], config.num_warps, config.num_stages))
    assert len(variants) == len(kept) >= 1
