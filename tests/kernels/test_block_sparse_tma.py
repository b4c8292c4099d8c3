"""The block-sparse forward's TMA path (``VISIONATTN_BSA_TMA=1``): q, k, v, out through rank-4 tensor descriptors.

On CPU the interpreter emulates the descriptors (per-axis bounds: rows past a head's ``N`` read as zero, stores past
it are dropped), so these tests check the path's index logic, fp16 only; the ``gpu`` tests run it at real sizes on
the H100 in fp16/bf16. Every kernel test disables the pointer kernel, so a silent fallback fails.
"""

import math

import pytest
import torch
import triton

from tests._numerics import assert_close
from tests.kernels.test_block_sparse import _check, _mask_from_predicate, _per_head, _random_mask
from visionattn.kernels import block_sparse
from visionattn.layout import BlockMask, NeighborhoodWindow, TokenGrid, TokenLayout, neighborhood_block_mask
from visionattn.ops import block_sparse_attention
from visionattn.ops.block_sparse import block_sparse_attention_gathered


class _Spy:
    """Stands in for an autotuned kernel: records its name per launch, then launches it (or fails: ``kernel=None``)."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls, self.kernel = name, calls, getattr(block_sparse, name)

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]

    def __getattr__(self, attr):  # .configs, read by the launcher
        return getattr(self.kernel, attr)


@pytest.fixture
def tma_only(monkeypatch):
    """TMA on, and the forward's pointer kernel replaced by one that fails if launched."""
    monkeypatch.setenv(block_sparse.TMA_ENV, "1")
    spy = _Spy("_block_sparse_fwd_kernel", [])
    spy.kernel = None
    monkeypatch.setattr(block_sparse, spy.name, spy)


@pytest.mark.parametrize("bnhd", [False, True], ids=["bhnd", "bnhd"])
@pytest.mark.parametrize(
    "q_len,kv_len,block,p,d,dv",
    [(70, 45, 16, 0.6, 32, 16), (40, 40, 32, 1.0, 16, 32)],  # ragged ends, Nq != Nk, empty row; dense, sub-tiles
    ids=str,
)
def test_tma_forward_random_and_dense(tma_only, kernel_device, poison_empty, rng, bnhd, q_len, kv_len, block, p, d, dv):
    mask = _random_mask(rng, 2, q_len, kv_len, block, block, p=p)
    _check(mask, kernel_device, torch.float16, rng, batch=2, heads=2, d=d, dv=dv, bnhd=bnhd)


def test_tma_forward_neighborhood_with_global_tokens(tma_only, kernel_device, poison_empty, rng):
    layout = TokenLayout(TokenGrid((7, 9), extra_before=3, extra_after=2), tile=(4, 4))
    pred = NeighborhoodWindow(layout, (3, 5), (1, 2), (2, 1), (False, False))
    mask = _mask_from_predicate(pred, layout.num_tokens, math.prod(layout.tile), heads=2, drop=0.3, gen=rng)
    assert bool(mask.partial.any())
    _check(mask, kernel_device, torch.float16, rng, heads=2, d=16, dv=16, bnhd=True)


def test_tma_forward_lazy_rescale_with_growing_row_maxima(tma_only, kernel_device, poison_empty, rng):
    """Key norms grow along the sequence, so every query tile's running max grows by more than the slack (2^8) at
    every key block: the interpreter's TMA config rescales lazily (the other tests cover the stale-max steps), and
    out, lse and the gradients through lse must still match."""
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask = BlockMask.from_block_matrix(keep, q_len=64, kv_len=64, block_q=16, block_k=16)
    q = torch.randn(1, 1, 64, 16, generator=rng)
    k = torch.randn(1, 1, 64, 16, generator=rng) * torch.linspace(0.2, 9.0, 64)[:, None]
    v = torch.randn(1, 1, 64, 16, generator=rng)
    q, k, v = (t.to(kernel_device, torch.float16).requires_grad_(True) for t in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, mask.to(kernel_device), return_lse=True, backend="triton")
    ref_in = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention(*ref_in, mask, return_lse=True, backend="reference")
    scores2 = ref_in[0][0, 0] @ ref_in[1][0, 0].T * 16**-0.5 / math.log(2)  # log2 units, as the kernel's
    growth = scores2.view(64, 4, 16).amax(-1).cummax(1).values.diff(dim=1)  # per row, after each key block
    assert bool((growth > 8).view(4, 16, 3).any(1).all())  # every 16-row query tile rescales at every step
    assert_close("out", ref_out, out.cpu(), dtype=torch.float16)
    assert_close("lse", ref_lse, lse.cpu(), dtype=torch.float16)
    got = torch.autograd.grad(lse.sum(), (q, k))
    for name, r, g in zip(("dq", "dk"), torch.autograd.grad(ref_lse.sum(), ref_in[:2]), got):
        assert_close(name, r, g.cpu(), dtype=torch.float16)


def _qkvo(shape=(1, 2, 40, 32), dtype=torch.float16, bnhd=False):
    b, h, n, d = shape
    x = torch.zeros(b, n, h, d, dtype=dtype).transpose(1, 2) if bnhd else torch.zeros(shape, dtype=dtype)
    return x, x, x, x


def test_tma_descriptors_describe_both_layouts():
    q, k, v, out = _qkvo(bnhd=True)
    descs = block_sparse.tma_descriptors(q, k, v, out, 16, 16)
    assert descs is not None
    assert descs[0].shape == [1, 2, 40, 32]
    assert descs[0].strides == [2 * 40 * 32, 32, 2 * 32, 1]  # batch of 1: its contiguous stride
    q, k, v, out = _qkvo(shape=(2, 3, 40, 32))
    assert block_sparse.tma_descriptors(q, k, v, out, 16, 16)[1].strides == [3 * 40 * 32, 40 * 32, 32, 1]


def test_tma_descriptors_fall_back_where_tma_cannot_run():
    """fp32, blocks a TMA tile would cross (7, 24 against 16-row interpreter tiles), a base or row stride that is
    not a multiple of 16 bytes, a strided last axis: None (the pointer path)."""
    q, k, v, out = _qkvo()
    assert block_sparse.tma_descriptors(*_qkvo(dtype=torch.float32), 16, 16) is None
    assert block_sparse.tma_descriptors(q, k, v, out, 7, 16) is None
    assert block_sparse.tma_descriptors(q, k, v, out, 16, 24) is None
    shifted = torch.zeros(2 * 40 * 32 + 1, dtype=torch.float16)[1:].view(1, 2, 40, 32)
    assert block_sparse.tma_descriptors(shifted, k, v, out, 16, 16) is None
    narrow = torch.zeros(1, 2, 40, 36, dtype=torch.float16)  # 72-byte rows
    assert block_sparse.tma_descriptors(narrow, narrow, narrow, narrow, 16, 16) is None
    strided = torch.zeros(1, 2, 40, 64, dtype=torch.float16)[..., ::2]
    assert block_sparse.tma_descriptors(strided, k, v, out, 16, 16) is None


def test_tma_switch_and_gathered_path_use_pointers(monkeypatch, kernel_device, rng):
    """``VISIONATTN_BSA_TMA`` unset: TMA from 128-wide head-dim tiles, else pointers; ``1``: the TMA kernel, except
    with row maps (gathered); ``0``: pointers."""
    calls = []
    for name in ("_block_sparse_fwd_kernel", "_block_sparse_fwd_tma_kernel"):
        monkeypatch.setattr(block_sparse, name, _Spy(name, calls))
    mask = _random_mask(rng, 1, 32, 32, 16, 16, p=1.0).to(kernel_device)
    q = torch.randn(1, 1, 32, 16, generator=rng).to(kernel_device, torch.float16)
    monkeypatch.delenv(block_sparse.TMA_ENV, raising=False)
    block_sparse_attention(q, q, q, mask, backend="triton")
    monkeypatch.setenv(block_sparse.TMA_ENV, "1")
    block_sparse_attention(q, q, q, mask, backend="triton")
    rows = torch.arange(32, dtype=torch.int32, device=kernel_device)
    block_sparse_attention_gathered(q, q, q, rows, rows, mask, scale=0.25)
    assert calls == ["_block_sparse_fwd_kernel", "_block_sparse_fwd_tma_kernel", "_block_sparse_fwd_kernel"]
    # unset, the head dim decides (TMA from 128-wide tiles, where the H100 measured it faster); "0" forces pointers
    calls.clear()
    wide = torch.randn(1, 1, 32, 128, generator=rng).to(kernel_device, torch.float16)
    monkeypatch.delenv(block_sparse.TMA_ENV, raising=False)
    block_sparse_attention(wide, wide, wide, mask, backend="triton")
    monkeypatch.setenv(block_sparse.TMA_ENV, "0")
    block_sparse_attention(wide, wide, wide, mask, backend="triton")
    assert calls == ["_block_sparse_fwd_tma_kernel", "_block_sparse_fwd_kernel"]


# ---------------------------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bnhd", [False, True], ids=["bhnd", "bnhd"])
@pytest.mark.parametrize("d", [64, 128])
def test_tma_gpu_dense_and_sparse(tma_only, rng, dtype, bnhd, d):
    for n, p in ((4096, 1.0), (4000, 1.0), (4096, 0.1)):  # dense, dense with a ragged last block, 90 % sparse
        _check(_random_mask(rng, 4, n, n, 128, 128, p=p), "cuda", dtype, rng, batch=2, heads=4, d=d, dv=d, bnhd=bnhd)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_gpu_neighborhood_3d_with_text(tma_only, rng, dtype):
    layout = TokenLayout(TokenGrid((6, 30, 44), extra_before=77), tile=(2, 8, 8))
    mask = neighborhood_block_mask(layout, (3, 9, 11), (1, 2, 1), (1, 1, 2), (True, False, False))
    for bnhd in (False, True):
        _check(_per_head(mask, 2, 0.2, rng), "cuda", dtype, rng, heads=2, d=128, dv=128, bnhd=bnhd)


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(block_sparse._FWD_TMA_CONFIGS)))
def test_tma_gpu_every_config(tma_only, monkeypatch, rng, config):
    """Each TMA config on its own (autotuning would hide a broken one): ragged 3D neighborhood at D 64/128, head dim
    72 padded to a 128 tile (TMA zero-fills the columns), blocks of 64."""
    monkeypatch.setattr(block_sparse._block_sparse_fwd_tma_kernel, "configs", [block_sparse._FWD_TMA_CONFIGS[config]])
    layout = TokenLayout(TokenGrid((5, 21, 27), extra_after=13), tile=(2, 8, 8))
    mask = _per_head(
        neighborhood_block_mask(layout, (3, 7, 9), (1, 1, 2), (1, 2, 1), (False, False, True)), 2, 0.3, rng
    )
    cases = [(mask, torch.bfloat16, d, d) for d in (64, 128)]
    cases += [(_random_mask(rng, 2, 1000, 700, 64, 64), torch.float16, 72, 72)]
    ran = 0
    for case_mask, dtype, d, dv in cases:
        try:
            _check(case_mask, "cuda", dtype, rng, heads=2, d=d, dv=dv, bnhd=d == 64)
            ran += 1
        except triton.runtime.errors.OutOfResources:
            assert config > 0, "the first TMA config (the one VISIONATTN_AUTOTUNE=0 pins) must fit every shape"
    assert ran >= 2
