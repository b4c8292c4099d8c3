"""Block-sparse flash attention kernels (forward and dQ/dK/dV) against the float64 reference.

On CPU these run under the Triton interpreter at tiny sizes (fp32 with ieee dots, fp16); on the H100 the
``gpu`` tests run real sizes in fp16/bf16.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton

from tests._numerics import assert_close
from visionattn.layout import (
    BlockMask,
    CircularWindow,
    NeighborhoodWindow,
    TokenGrid,
    TokenLayout,
    circular_window_block_mask,
    neighborhood_block_mask,
)
from visionattn.ops import block_sparse_attention


def _mask_from_predicate(pred, n: int, block: int, heads: int = 1, drop: float = 0.0, gen=None) -> BlockMask:
    """Brute-force BlockMask of an exact predicate: a block is kept if any pair is allowed, partial unless all are.

    With ``drop`` > 0, head ``h > 0`` also loses that fraction of its blocks (per-head masks).
    """
    idx = torch.arange(n)
    pad = -n % block
    dense = F.pad(pred(idx[:, None], idx[None, :]), (0, pad, 0, pad))
    inside = F.pad(torch.ones(n, n, dtype=torch.bool), (0, pad, 0, pad))
    mb = (n + pad) // block
    tiles = lambda x: x.view(mb, block, mb, block).transpose(1, 2)
    keep = tiles(dense).any(-1).any(-1)
    full = (tiles(dense) | ~tiles(inside)).all(-1).all(-1)
    mask = BlockMask.from_block_matrix(
        keep[None, None],
        partial=(keep & ~full)[None, None],
        q_len=n,
        kv_len=n,
        block_q=block,
        block_k=block,
        token_mask=pred,
    )
    return _per_head(mask, heads, drop, gen)


def _per_head(mask: BlockMask, heads: int, drop: float, gen) -> BlockMask:
    """``mask`` repeated over ``heads``, heads after the first losing a random ``drop`` fraction of their blocks."""
    keep, partial = (x.expand(1, heads, *x.shape[2:]).clone() for x in mask.to_block_matrix())
    keep[:, 1:] &= (torch.rand(keep[:, 1:].shape, generator=gen) >= drop).to(keep.device)
    return BlockMask.from_block_matrix(
        keep,
        partial=partial,
        q_len=mask.q_len,
        kv_len=mask.kv_len,
        block_q=mask.block_q,
        block_k=mask.block_k,
        token_mask=mask.token_mask,
    )


def _random_mask(gen, heads, q_len, kv_len, bq, bk, p=0.5) -> BlockMask:
    mq, mk = -(-q_len // bq), -(-kv_len // bk)
    keep = torch.rand(1, heads, mq, mk, generator=gen) < p
    keep[0, 0, 0] = False  # an empty row: output 0, lse -inf
    return BlockMask.from_block_matrix(keep, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk)


def _triton_with_lse(q, k, v, mask):
    return block_sparse_attention(q, k, v, mask, return_lse=True, backend="triton")


def _check(mask, device, dtype, gen, *, batch=1, heads=2, d=32, dv=16, bnhd=False, check_lse=True, run=None):
    """Forward (out, lse) and dq/dk/dv (with a random dlse) of the kernel vs the float64 reference.

    ``run(q, k, v, mask)`` replaces the op call (a compiled one); it must return ``(out, lse)``.
    """

    def make(n, dim):
        x = (
            torch.randn(batch, n, heads, dim, generator=gen)
            if bnhd
            else torch.randn(batch, heads, n, dim, generator=gen)
        )
        x = x.to(device=device, dtype=dtype)
        return (x.transpose(1, 2) if bnhd else x).requires_grad_(True)

    q, k, v = make(mask.q_len, d), make(mask.kv_len, d), make(mask.kv_len, dv)
    mask = mask.to(device)
    out, lse = (run or _triton_with_lse)(q, k, v, mask)
    if bnhd:
        assert out.transpose(1, 2).is_contiguous()
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention(*ref_in, mask, return_lse=True, backend="reference")
    assert_close("out", ref_out, out, dtype=dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close("lse", ref_lse[finite], lse[finite], dtype=torch.float32 if dtype == torch.float32 else dtype)
    do = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(device).where(finite, 0) if check_lse else None
    outs, grads = ([out, lse], [do, dlse]) if check_lse else ([out], [do])
    got = torch.autograd.grad(outs, (q, k, v), grads)
    ref_outs = [ref_out, ref_lse.where(finite, 0)] if check_lse else [ref_out]
    ref_grads = [g.double() if g is not None else None for g in grads]
    ref = torch.autograd.grad(ref_outs, ref_in, ref_grads)
    for name, r, g in zip(("dq", "dk", "dv"), ref, got):
        assert_close(name, r, g, dtype=dtype)


@pytest.mark.parametrize(
    "heads,q_len,kv_len,bq,bk,d,dv",
    [
        (2, 70, 45, 16, 16, 32, 16),
        (1, 40, 64, 32, 16, 16, 32),
        (2, 37, 37, 7, 12, 16, 16),
        (1, 50, 70, 24, 40, 16, 16),
        (1, 300, 290, 150, 140, 16, 16),
        (1, 40, 33, 16, 16, 40, 24),
        (1, 32, 32, 16, 16, 72, 16),
    ],  # blocks above 128 tokens: walked in sub-tiles; head dims 40 (SD 1.5) and 72 (PixArt) padded to tiles
    ids=lambda x: str(x),
)
def test_block_sparse_kernel_random_masks(kernel_device, poison_empty, rng, heads, q_len, kv_len, bq, bk, d, dv):
    _check(_random_mask(rng, heads, q_len, kv_len, bq, bk), kernel_device, torch.float32, rng, d=d, dv=dv)


def test_block_sparse_kernel_fp16_broadcast_mask_bnhd(kernel_device, poison_empty, rng):
    mask = _random_mask(rng, 1, 48, 48, 16, 16, p=0.7)
    _check(mask, kernel_device, torch.float16, rng, batch=2, heads=2, bnhd=True)


@pytest.mark.parametrize(
    "grid,tile,kernel,stride,dilation,causal",
    [
        ((37,), (16,), (7,), (2,), (2,), (False,)),
        ((30,), (16,), (5,), (1,), (1,), (True,)),
        ((7, 9), (4, 4), (3, 5), (1, 2), (2, 1), (False, False)),
        ((4, 6), (2, 2), (3, 3), (1, 1), (1, 1), (False, True)),
        ((6, 6), (3, 3), (3, 5), (3, 1), (1, 1), (False, False)),
        ((2, 4, 6), (2, 2, 4), (2, 3, 3), (1, 1, 2), (1, 1, 1), (True, False, False)),
    ],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-axis"])
def test_block_sparse_kernel_neighborhood(
    monkeypatch, kernel_device, poison_empty, rng, grid, tile, kernel, stride, dilation, causal, packed
):
    """Both encodings of a neighborhood: one packed word (every case here fits) and, forced, the per-axis tables."""
    if not packed:
        monkeypatch.setattr(NeighborhoodWindow, "packed_kernel_tables", lambda self, device: None)
    layout = TokenLayout(TokenGrid(grid, extra_before=3 if len(grid) < 3 else 0, extra_after=2), tile=tile)
    pred = NeighborhoodWindow(layout, kernel, stride, dilation, causal)
    assert (pred.packed_kernel_tables("cpu") is not None) == packed
    heads = 2 if len(grid) == 1 else 1  # per-head masks on the cheap 1D cases (interpreter time)
    mask = _mask_from_predicate(pred, layout.num_tokens, math.prod(tile), heads=heads, drop=0.3, gen=rng)
    assert bool(mask.partial.any())
    _check(mask, kernel_device, torch.float32, rng, heads=heads, d=16)


def test_block_sparse_kernel_circular_raster_fp16(kernel_device, poison_empty, rng):
    layout = TokenLayout(TokenGrid((6, 8), extra_after=3))
    mask = _mask_from_predicate(CircularWindow(layout, 2.5), layout.num_tokens, 16)
    _check(mask, kernel_device, torch.float16, rng, heads=1, check_lse=False)


def test_block_sparse_kernel_matches_across_dtypes(kernel_device, rng, kernel_dtypes):
    layout = TokenLayout(TokenGrid((8, 8)), tile=(4, 4))
    mask = _mask_from_predicate(NeighborhoodWindow(layout, (5, 5), (1, 1), (1, 1), (False, False)), 64, 16)
    for dtype in kernel_dtypes:
        _check(mask, kernel_device, dtype, rng, heads=1, d=32, dv=32)


def test_block_sparse_kernel_traces_with_compile_and_counts_flops(kernel_device, rng):
    from torch.utils.flop_counter import FlopCounterMode

    mask = _random_mask(rng, 1, 32, 32, 16, 16, p=1.0).to(kernel_device)
    # compiled out, lse and the gradients of q, k, v (through out and lse) vs the float64 reference
    compiled = torch.compile(_triton_with_lse, fullgraph=True, backend="aot_eager")
    _check(mask, kernel_device, torch.float32, rng, d=16, run=compiled)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=rng).to(kernel_device).requires_grad_(True) for _ in range(3))
    fn = lambda q, k, v: block_sparse_attention(q, k, v, mask, backend="triton")
    with FlopCounterMode(display=False) as counter:
        fn(q, k, v).sum().backward()
    kept_pairs = 2 * 16 * 16 * 2  # 2 kept blocks of 16 x 16 (row 0 is emptied), 2 heads
    assert counter.get_total_flops() == 2 * kept_pairs * (16 + 16) + 2 * kept_pairs * (3 * 16 + 2 * 16)


def test_block_sparse_transpose_csr_matches_block_mask(rng):
    from visionattn.kernels.block_sparse_bwd import transpose_csr

    keep = torch.rand(2, 3, 7, 5, generator=rng) < 0.4
    partial = torch.rand(2, 3, 7, 5, generator=rng) < 0.5
    mask = BlockMask.from_block_matrix(
        keep, partial=partial, q_len=70, kv_len=45, block_q=10, block_k=9, token_mask=lambda q, k: q >= k
    )
    expected = mask.transpose()
    got = transpose_csr(mask.indptr, mask.indices, mask.partial, mask.num_kv_blocks)
    for name, ref, out in zip(
        ("indptr", "indices", "partial"), (expected.indptr, expected.indices, expected.partial), got
    ):
        assert torch.equal(ref, out), name


def test_block_sparse_full_blocks_first_keeps_each_row(rng):
    from visionattn.kernels.block_sparse_bwd import full_blocks_first

    keep = torch.rand(2, 3, 7, 5, generator=rng) < 0.6
    partial = torch.rand(2, 3, 7, 5, generator=rng) < 0.5
    mask = BlockMask.from_block_matrix(
        keep, partial=partial, q_len=70, kv_len=45, block_q=10, block_k=9, token_mask=lambda q, k: q >= k
    )
    indices, split = full_blocks_first(mask.indptr, mask.indices, mask.partial)
    assert split.shape == mask.indptr.shape and split.dtype == torch.int32
    flat_keep, flat_partial = keep.flatten(0, 2), (partial & keep).flatten(0, 2)
    for row, (start, end) in enumerate(zip(mask.indptr.flatten()[:-1].tolist(), mask.indptr.flatten()[1:].tolist())):
        if row % (mask.num_q_blocks + 1) == mask.num_q_blocks:  # the row-end entry of each (b, h)
            continue
        row_id = row - row // (mask.num_q_blocks + 1)
        cut = int(split.flatten()[row])
        full, part = indices[start:cut].tolist(), indices[cut:end].tolist()
        assert full == sorted(full) and part == sorted(part)  # stable: each group stays sorted
        assert full == torch.nonzero(flat_keep[row_id] & ~flat_partial[row_id]).flatten().tolist()
        assert part == torch.nonzero(flat_partial[row_id]).flatten().tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_kernel_gpu_random_and_dense(rng, d, dtype):
    for p in (1.0, 0.1):
        mask = _random_mask(rng, 4, 4096, 4096, 128, 128, p=p)
        _check(mask, "cuda", dtype, rng, batch=2, heads=4, d=d, dv=d)
    # BiFormer at 256 px with 7 x 7 regions: 1369-token logical blocks
    _check(_random_mask(rng, 2, 9583, 9583, 1369, 1369, p=0.3), "cuda", dtype, rng, heads=2, d=d, dv=d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_kernel_gpu_neighborhood_3d(rng, dtype):
    layout = TokenLayout(TokenGrid((6, 30, 44), extra_before=77), tile=(2, 8, 8))
    mask = neighborhood_block_mask(layout, (3, 9, 11), (1, 2, 1), (1, 1, 2), (True, False, False))
    mask = _per_head(mask, 2, 0.2, rng)
    _check(mask, "cuda", dtype, rng, heads=2, d=128, dv=128, bnhd=True)


@pytest.mark.gpu
def test_block_sparse_kernel_gpu_circular_2d_with_text(rng):
    layout = TokenLayout(TokenGrid((72, 90), extra_before=77), tile=(8, 16))
    mask = circular_window_block_mask(layout, 16)
    _check(mask, "cuda", torch.bfloat16, rng, heads=3, d=64, dv=64)


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(5))
def test_block_sparse_kernel_gpu_every_config(monkeypatch, rng, config):
    """Each autotune config of the three attention kernels on its own (autotune would hide a broken one); the forward
    on its pointer path (the TMA path's configs: test_block_sparse_tma.py)."""
    from visionattn.kernels import _launch, block_sparse, block_sparse_bwd

    monkeypatch.setenv(block_sparse.TMA_ENV, "0")
    monkeypatch.setattr(_launch, "_RESOLVED", {})  # launch() would replay an earlier test's config

    kernels = [
        (block_sparse._block_sparse_fwd_kernel, block_sparse._FWD_CONFIGS),
        (block_sparse_bwd._block_sparse_bwd_kernel_dq, block_sparse_bwd._BWD_CONFIGS),
        (block_sparse_bwd._block_sparse_bwd_kernel_dkdv, block_sparse_bwd._BWD_CONFIGS),
    ]
    for kernel, configs in kernels:
        monkeypatch.setattr(kernel, "configs", [configs[config % len(configs)]])
    layout = TokenLayout(TokenGrid((5, 21, 27), extra_after=13), tile=(2, 8, 8))
    mask = neighborhood_block_mask(layout, (3, 7, 9), (1, 1, 2), (1, 2, 1), (False, False, True))
    mask = _per_head(mask, 2, 0.3, rng)
    cases = [(mask, torch.bfloat16, d, d) for d in (64, 128)]
    cases.append((_random_mask(rng, 2, 1000, 700, 100, 49), torch.float16, 96, 32))
    ran = 0
    for case_mask, dtype, d, dv in cases:
        try:
            _check(case_mask, "cuda", dtype, rng, heads=2, d=d, dv=dv)
            ran += 1
        except triton.runtime.errors.OutOfResources:
            # a config too large for this head dim's shared memory: the autotuner skips it, so it never runs
            assert config > 0, "the first config (the one VISIONATTN_AUTOTUNE=0 pins) must fit every shape"
    assert ran >= 2


@pytest.mark.gpu
def test_block_sparse_kernel_gpu_compile_fullgraph(rng):
    mask = _random_mask(rng, 1, 2048, 2048, 64, 64, p=0.3)
    fn = lambda q, k, v, mask: block_sparse_attention(q, k, v, mask, return_lse=True)
    _check(mask, "cuda", torch.bfloat16, rng, batch=2, heads=4, d=64, dv=64, run=torch.compile(fn, fullgraph=True))
