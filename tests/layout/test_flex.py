import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from visionattn.layout import (
    TokenGrid,
    TokenLayout,
    circular_window_block_mask,
    neighborhood_block_mask,
    radial_block_mask,
    topk_routing_block_mask,
)
from visionattn.layout.flex import to_flex_block_mask


def _flex_token_mask(flex, q_len: int, kv_len: int) -> torch.Tensor:
    """Token-level pattern FlexAttention computes: full blocks allowed, partial blocks through ``mask_mod``."""
    bq, bk = flex.BLOCK_SIZE

    def blocks(counts, indices):
        listed = torch.arange(indices.shape[-1]) < counts[..., None]
        matrix = torch.zeros(*indices.shape, dtype=torch.bool).scatter_(-1, indices.long(), listed)
        return matrix.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :q_len, :kv_len]

    partial = blocks(flex.kv_num_blocks, flex.kv_indices)
    full = blocks(flex.full_kv_num_blocks, flex.full_kv_indices)
    if flex.mask_mod is not None and partial.any():
        exact = create_mask(flex.mask_mod, None, None, q_len, kv_len, device="cpu")
        partial = partial & exact
    return full | partial


@pytest.mark.parametrize(
    "build",
    [
        lambda: neighborhood_block_mask(
            TokenLayout(TokenGrid((7, 9), extra_before=3), tile=(4, 4)), (3, 4), stride=(1, 2), dilation=(2, 1)
        ),
        lambda: neighborhood_block_mask(TokenGrid((5, 6, 7), extra_after=2), (2, 3, 3), causal=(True, False, False)),
        lambda: circular_window_block_mask(TokenLayout(TokenGrid((12, 12), extra_before=5), tile=(4, 4)), 3.5),
        lambda: radial_block_mask(6, 100, block_size=32, extra_tokens=10),
        lambda: topk_routing_block_mask(
            torch.randn(2, 3, 96, 8), torch.randn(2, 3, 96, 8), TokenLayout(TokenGrid((7, 9)), tile=(4, 4)), 2
        ),
    ],
    ids=["neighborhood-tile", "neighborhood-raster", "circular", "radial", "routing"],
)
def test_to_flex_block_mask_matches_to_dense(build):
    mask = build()
    flex = mask.to_flex()
    assert flex.BLOCK_SIZE == (mask.block_q, mask.block_k)
    assert torch.equal(flex.to_dense().bool(), mask.to_block_matrix()[0])
    assert torch.equal(_flex_token_mask(flex, mask.q_len, mask.kv_len), mask.to_dense())


def test_to_flex_block_mask_rejects_foreign_predicates():
    from visionattn.layout import BlockMask

    keep = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    mask = BlockMask.from_block_matrix(
        keep, partial=keep, q_len=32, kv_len=32, block_q=16, block_k=16, token_mask=lambda q, k: q >= k
    )
    with pytest.raises(NotImplementedError, match="token_mask"):
        to_flex_block_mask(mask)


@pytest.mark.gpu
def test_to_flex_block_mask_flex_attention_matches_block_sparse_reference():
    from torch.nn.attention.flex_attention import flex_attention

    from visionattn.ops import block_sparse_attention

    layout = TokenLayout(TokenGrid((30, 48, 80), extra_after=256), tile=(2, 8, 8))
    mask = neighborhood_block_mask(layout, (18, 24, 24)).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 64, device="cuda", generator=gen) for _ in range(3))
    out_flex = torch.compile(flex_attention)(q, k, v, block_mask=mask.to_flex())
    out = block_sparse_attention(q, k, v, mask, backend="triton")
    valid = layout.valid("cuda")
    err = (out_flex - out)[:, :, valid].norm() / out[:, :, valid].norm()
    assert err < 1e-3
