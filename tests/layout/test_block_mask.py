import pytest
import torch

from visionattn.layout import BlockMask, NeighborhoodWindow, TokenGrid, TokenLayout, neighborhood_block_mask


def _random_mask(gen, b=2, h=3, q_len=70, kv_len=45, bq=16, bk=8, p=0.4):
    mq, mk = -(-q_len // bq), -(-kv_len // bk)
    keep = torch.rand(b, h, mq, mk, generator=gen) < p
    keep[0, 0, 1] = False  # an empty row
    return keep, BlockMask.from_block_matrix(keep, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk)


def test_block_mask_csr_round_trip(rng):
    keep, mask = _random_mask(rng)
    back, partial = mask.to_block_matrix()
    assert torch.equal(back, keep) and not partial.any()
    assert mask.indices.dtype == torch.int32 and mask.indptr.dtype == torch.int32
    # rows are sorted and consecutive in (b, h, m) order
    flat = mask.indptr.flatten(0, 1)
    assert torch.equal(flat[1:, 0], flat[:-1, -1])
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            for m in range(keep.shape[2]):
                row = mask.indices[mask.indptr[b, h, m] : mask.indptr[b, h, m + 1]]
                assert torch.equal(row.long(), keep[b, h, m].nonzero().squeeze(-1))


def test_block_mask_dense_density_and_transpose(rng):
    keep, mask = _random_mask(rng)
    dense = mask.to_dense()
    assert dense.shape == (2, 3, 70, 45)
    expected = keep.repeat_interleave(16, 2).repeat_interleave(8, 3)[..., :70, :45]
    assert torch.equal(dense, expected)
    assert mask.density() == pytest.approx(keep.float().mean().item())
    assert torch.equal(mask.transpose().to_dense(), dense.transpose(-1, -2))
    assert mask.transpose() is mask.transpose()  # cached


def test_block_mask_partial_blocks_apply_predicate():
    layout = TokenLayout(TokenGrid((12,), extra_before=2), tile=(4,))
    pred = NeighborhoodWindow(layout, (3,), (1,), (1,), (False,))
    n = layout.num_tokens
    m = n // 4
    keep = torch.ones(1, 1, m, m, dtype=torch.bool)
    mask = BlockMask.from_block_matrix(
        keep, partial=keep.clone(), q_len=n, kv_len=n, block_q=4, block_k=4, token_mask=pred
    )
    idx = torch.arange(n)
    assert torch.equal(mask.to_dense()[0, 0], pred(idx[:, None], idx[None, :]))
    assert torch.equal(mask.transpose().to_dense()[0, 0], mask.to_dense()[0, 0].T)


@pytest.mark.parametrize("chunk_pairs", [1, 1 << 24])
def test_block_mask_token_density_counts_pairs_without_the_dense_mask(rng, chunk_pairs):
    keep = torch.rand(2, 3, 5, 4, generator=rng) < 0.6
    partial = torch.rand(2, 3, 5, 4, generator=rng) < 0.5
    mask = BlockMask.from_block_matrix(
        keep, partial=partial, q_len=70, kv_len=45, block_q=16, block_k=12, token_mask=lambda q, k: (q + k) % 3 == 0
    )
    expected = mask.to_dense().double().mean().item()
    assert mask.token_density(chunk_pairs=chunk_pairs) == pytest.approx(expected, rel=1e-12)
    areas = mask.entry_areas()
    assert areas.shape == mask.indices.shape and int(areas.max()) <= 16 * 12
    layout = TokenLayout(TokenGrid((9, 7), extra_before=3), tile=(4, 4))
    nbhd = neighborhood_block_mask(layout, (3, 5))
    assert nbhd.token_density(chunk_pairs=chunk_pairs) == pytest.approx(nbhd.to_dense().double().mean().item())


def test_block_mask_getitem_and_repr(rng):
    keep, mask = _random_mask(rng)
    sub = mask[1, 0:2]
    assert sub.batch_heads == (1, 2)
    assert torch.equal(sub.to_block_matrix()[0], keep[1:2, 0:2])
    assert "density=" in repr(mask) and "blocks=(5, 6)" in repr(mask)


def test_block_mask_rejects_inconsistent_inputs():
    keep = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep must have"):
        BlockMask.from_block_matrix(keep, q_len=40, kv_len=8, block_q=8, block_k=8)
    with pytest.raises(ValueError, match="keep must be"):
        BlockMask.from_block_matrix(keep.int(), q_len=16, kv_len=16, block_q=8, block_k=8)
    with pytest.raises(ValueError, match="token_mask"):
        BlockMask.from_block_matrix(keep, partial=keep, q_len=16, kv_len=16, block_q=8, block_k=8)


def test_row_topk_masks_share_their_shape_constants(rng):
    """``_from_row_topk``'s ``indptr`` and ``partial`` depend only on the shape: made once per shape and device and
    reused (outside inference mode, so a backward may save them), never cached under a ``TorchDispatchMode`` (fake
    tensors), and equal to the offsets of the same mask built from its block matrix."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    cols = lambda mq: torch.rand(2, 3, mq, 6, generator=rng).argsort(-1)[..., :2]
    make = lambda c: BlockMask._from_row_topk(c, q_len=c.shape[2] * 4, kv_len=24, block_q=4, block_k=4)
    with torch.inference_mode():
        first = make(cols(5))
    second, other = make(cols(5)), make(cols(4))
    assert first.indptr is second.indptr and first.partial is second.partial
    assert not first.indptr.is_inference() and other.indptr is not first.indptr
    keep, _ = second.to_block_matrix()
    dense = BlockMask.from_block_matrix(keep, q_len=20, kv_len=24, block_q=4, block_k=4)
    assert torch.equal(second.indptr, dense.indptr) and torch.equal(second.indices, dense.indices)
    assert second._uniform_rows and not dense._uniform_rows
    with FakeTensorMode() as mode:
        fake = make(mode.from_tensor(cols(3)))
    assert isinstance(fake.indptr, FakeTensor)
    assert not isinstance(make(cols(3)).indptr, FakeTensor)
