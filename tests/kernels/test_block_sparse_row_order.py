"""Longest-rows-first launch order of the block-sparse kernels (``kernels/row_order.py``).

The order only changes which program runs which row, so besides matching the float64 reference, the outputs and
gradients must equal those of the unordered launch (``VISIONATTN_BSA_ROW_ORDER=0``) bit for bit. Masks with very
uneven rows (empty rows, one full row), per-head and broadcast ``(Bm, Hm)``, and head groups that split the
(batch x head) programs unevenly (``GROUP_ROWS`` shrunk).
"""

import pytest
import torch

from tests.kernels.test_block_sparse import _check
from visionattn.kernels import block_sparse, row_order
from visionattn.layout import BlockMask
from visionattn.ops import block_sparse_attention
from visionattn.ops.block_sparse import _mask_launch_args


def _uneven_mask(gen, bm: int, hm: int, n: int, block: int) -> BlockMask:
    """Random blocks at densities that differ per row, rows and columns uneven for 3 or more blocks: in the first
    head row 0 is empty and column 0 holds at most the last row's block; in the last head the last column and the
    last row are full."""
    m = -(-n // block)
    density = torch.rand(bm, hm, m, 1, generator=gen)
    keep = torch.rand(bm, hm, m, m, generator=gen) < density
    keep[0, 0, :, 0] = False
    keep[-1, -1, :, -1] = True
    keep[0, 0, 0] = False
    keep[-1, -1, -1] = True
    return BlockMask.from_block_matrix(keep, q_len=n, kv_len=n, block_q=block, block_k=block)


def _expected_order(counts: torch.Tensor, group: int) -> torch.Tensor:
    """Brute force per mask batch: (head group, count descending, head, row) of every row, as ``h * M + m``."""
    bm, hm, m = counts.shape
    out = torch.empty(bm, hm * m, dtype=torch.long)
    for b in range(bm):
        rows = [(h // group, -int(counts[b, h, r]), h, r) for h in range(hm) for r in range(m)]
        out[b] = torch.tensor([h * m + r for *_, h, r in sorted(rows)])
    return out


@pytest.mark.parametrize("bm,hm,group_rows", [(1, 5, 12), (2, 3, 512), (1, 1, 512)], ids=str)
def test_longest_rows_first_is_a_sorted_permutation(monkeypatch, rng, bm, hm, group_rows):
    monkeypatch.setattr(row_order, "GROUP_ROWS", group_rows)
    mask = _uneven_mask(rng, bm, hm, 64, 16)
    order = row_order.longest_rows_first(mask.indptr)
    counts = mask.row_counts
    m = counts.shape[-1]
    assert order.dtype == torch.int32 and order.shape == mask.indptr.shape
    flat = order[..., :m].flatten(1).long()
    assert torch.equal(flat.sort(1).values, torch.arange(hm * m).expand(bm, -1))
    assert torch.equal(flat, _expected_order(counts, row_order.order_group(m, hm)))


def test_longest_rows_first_skips_even_rows(rng):
    dense = BlockMask.from_block_matrix(torch.ones(1, 2, 3, 3, dtype=torch.bool), q_len=48, kv_len=48, block_q=16,
                                        block_k=16)  # fmt: skip
    assert row_order.longest_rows_first(dense.indptr) is None
    topk = BlockMask._from_row_topk(torch.randint(0, 4, (1, 2, 4, 1), generator=rng), q_len=64, kv_len=64,
                                    block_q=16, block_k=16)  # fmt: skip
    _, rows, key_major = _mask_launch_args(topk, needs_grad=True)
    assert rows[3] is None and key_major[3] is None  # top-k masks: neither order, no host sync


def test_order_args_forms_and_switch(monkeypatch, rng):
    per_head, shared = _uneven_mask(rng, 1, 3, 64, 16), _uneven_mask(rng, 1, 1, 64, 16)
    for mask, form, group in ((per_head, row_order.ORDER_TABLE, 1), (shared, row_order.ORDER_SHARED, 6)):
        order = row_order.longest_rows_first(mask.indptr)
        assert row_order.order_args(order, mask.indptr, 6) == (order, group, form)
    monkeypatch.setenv(row_order.ROW_ORDER_ENV, "0")
    assert row_order.order_args(order, shared.indptr, 6) == (shared.indptr, 1, row_order.ORDER_NONE)


def _run(q, k, v, mask):
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    return out, lse, *torch.autograd.grad((out.float().sum() + lse.where(lse.isfinite(), 0).sum()), (q, k, v))


@pytest.mark.parametrize(
    "batch,heads,mask_bh,n,block,group_rows",
    [
        (1, 5, (1, 5), 48, 16, 9),  # per-head masks, head groups of 3 and 2
        (2, 2, (1, 2), 38, 16, 512),  # heads per mask, batch broadcast, ragged last block
        (2, 2, (2, 1), 48, 16, 512),  # batch per mask, heads broadcast: rows sorted per mask batch
        (2, 2, (1, 1), 48, 16, 6),  # one mask: groups of 2 programs share each row
        (1, 3, (1, 1), 80, 32, 6),  # sub-tiles (32-token blocks in 16-row tiles), groups of 2 and 1
    ],
    ids=str,
)
def test_ordered_kernels_match_reference_and_unordered(monkeypatch, kernel_device, poison_empty, rng, batch, heads,
                                                       mask_bh, n, block, group_rows):  # fmt: skip
    monkeypatch.setattr(row_order, "GROUP_ROWS", group_rows)
    mask = _uneven_mask(rng, *mask_bh, n, block)
    _, rows, key_major = _mask_launch_args(mask.to(kernel_device), needs_grad=True)
    assert rows[3] is not None and key_major[3] is not None
    _check(mask, kernel_device, torch.float32, rng, batch=batch, heads=heads, d=16, dv=16)
    mask = mask.to(kernel_device)
    q, k, v = (torch.randn(batch, heads, n, 16, generator=rng).to(kernel_device).requires_grad_() for _ in range(3))
    ordered = _run(q, k, v, mask)
    monkeypatch.setenv(row_order.ROW_ORDER_ENV, "0")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ordered, _run(q, k, v, mask)):
        assert torch.equal(a, b), name


def test_ordered_tma_forward(monkeypatch, kernel_device, poison_empty, rng):
    monkeypatch.setenv(block_sparse.TMA_ENV, "1")
    monkeypatch.setattr(row_order, "GROUP_ROWS", 8)
    _check(_uneven_mask(rng, 1, 3, 64, 16), kernel_device, torch.float16, rng, batch=2, heads=3, bnhd=True)


# ---------------------------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("mask_bh", [(1, 8), (1, 1)], ids=str)
def test_ordered_kernels_gpu(monkeypatch, rng, tma, mask_bh):
    """bf16, d128, 128-token blocks, N 4096 (32 rows per head: head groups of 16): against the reference and the
    unordered launch."""
    monkeypatch.setenv(block_sparse.TMA_ENV, tma)
    mask = _uneven_mask(rng, *mask_bh, 4096, 128)
    _check(mask, "cuda", torch.bfloat16, rng, batch=2, heads=8, d=128, dv=128)
    mask = mask.to("cuda")
    q, k, v = (torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    ordered = _run(q, k, v, mask)
    monkeypatch.setenv(row_order.ROW_ORDER_ENV, "0")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ordered, _run(q, k, v, mask)):
        assert torch.equal(a, b), name
