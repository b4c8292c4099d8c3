"""The row gather kernel (``visionattn/kernels/row_gather.py``): bit-exact against ``index_select`` (a copy has no
rounding) on fresh random inputs, in both attention layouts, strided inputs, odd head dims and empty slots."""

import pytest
import torch

from visionattn.kernels import _launch, row_gather
from visionattn.kernels.row_gather import gather_rows


def _expected(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``index_select`` along ``dim`` with zero rows where ``index < 0``."""
    shape = [1] * x.ndim
    shape[dim] = -1
    picked = x.index_select(dim, index.clamp_min(0).long())
    return picked * (index >= 0).view(shape).to(x.dtype)


def _index(gen, num_tokens: int, num_slots: int, dtype, device) -> torch.Tensor:
    """A random partial permutation: ``num_slots`` slots, at least a fifth of them empty (-1), the rest distinct
    tokens."""
    filled = min(num_tokens, num_slots * 4 // 5)
    index = torch.full((num_slots,), -1, dtype=torch.long)
    index[torch.randperm(num_slots, generator=gen)[:filled]] = torch.randperm(num_tokens, generator=gen)[:filled]
    return index.to(device=device, dtype=dtype)


# (storage shape, dim of the storage, view: transpose(1, 2) of the storage or a slice, head dim)
CASES = [
    ((2, 3, 11, 16), 2, None),  # (B, H, N, D) contiguous
    ((2, 11, 3, 24), 1, None),  # (B, N, H, D) contiguous, token axis 1, odd head dim
    ((2, 11, 3, 40), 2, "transpose"),  # (B, N, H, D) storage seen as (B, H, N, D)
    ((2, 5, 11, 20), 2, "slice"),  # every other head, a sliced head dim: strided leading axes
    ((11, 16), 0, None),  # (N, D)
    ((2, 2, 3, 11, 16), 3, None),  # rank 5
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("shape,dim,view", CASES, ids=[f"{c[0]}-dim{c[1]}-{c[2]}" for c in CASES])
def test_gather_rows_matches_index_select(kernel_device, kernel_dtypes, poison_empty, shape, dim, view, index_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(kernel_device, kernel_dtypes[0])
    if view == "transpose":
        x = x.transpose(1, 2)
    elif view == "slice":
        x = x[:, ::2, :, 2:18]
    index = _index(gen, x.shape[dim], 13, index_dtype, kernel_device)
    out = gather_rows(x, index, dim)
    assert torch.equal(out, _expected(x, index, dim))
    order = lambda t: sorted(range(t.ndim), key=lambda i: (-t.stride(i), i))
    assert x.ndim > 4 or order(out) == order(x)  # stored in x's axis order


def test_gather_rows_empty_index_and_every_slot_empty(kernel_device):
    x = torch.randn(1, 2, 5, 16, device=kernel_device)
    assert gather_rows(x, torch.empty(0, dtype=torch.int32, device=kernel_device), 2).shape == (1, 2, 0, 16)
    out = gather_rows(x, torch.full((6,), -1, dtype=torch.int64, device=kernel_device), 2)
    assert out.shape == (1, 2, 6, 16) and not out.any()


def test_gather_rows_configs_prune_wide_rows():
    configs = row_gather._CONFIGS
    kept = row_gather._prune(configs, {}, BLOCK_D=256)
    assert kept and all(c.kwargs["BLOCK_ROWS"] * 256 <= row_gather._MAX_TILE for c in kept)
    assert row_gather._prune(configs, {"BLOCK_D": 128}) == configs
    assert row_gather._prune(configs, {}, BLOCK_D=1 << 20) == [min(configs, key=lambda c: c.kwargs["BLOCK_ROWS"])]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d", [128, 64, 72, 256])
@pytest.mark.parametrize("bnhd", [False, True], ids=["bhnd", "bnhd"])
def test_gather_rows_every_config_gpu(monkeypatch, dtype, d, bnhd):
    """Every autotune config (pinned one at a time) at a mid size; the tile permutation of a 3-D grid."""
    from visionattn.layout import TokenGrid, TokenLayout

    layout = TokenLayout(TokenGrid((6, 20, 33)), tile=(2, 8, 8))
    index = layout.source_index("cuda").to(torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = layout.grid.num_tokens
    x = torch.randn(2, n, 3, d, device="cuda", generator=gen).to(dtype)
    x = x.transpose(1, 2) if bnhd else x.transpose(1, 2).contiguous()
    expected = _expected(x, index, 2)
    for config in row_gather._prune(row_gather._CONFIGS, {}, BLOCK_D=max(16, 1 << (d - 1).bit_length())):
        monkeypatch.setattr(row_gather._row_gather_kernel, "configs", [config])
        monkeypatch.setattr(row_gather._row_gather_kernel, "cache", {})
        monkeypatch.setattr(_launch, "_RESOLVED", {})  # launch() would replay the previous config
        assert torch.equal(gather_rows(x, index, 2), expected), config


@pytest.mark.gpu
def test_gather_rows_hunyuan_video_size_gpu():
    """The HunyuanVideo layout (grid 30 x 48 x 80, H24 d128, bf16: 276 MB per tensor), both directions."""
    from visionattn.layout import TokenGrid, TokenLayout

    layout = TokenLayout(TokenGrid((30, 48, 80)), tile=(2, 8, 8))
    source = layout.source_index("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 24, layout.grid.num_tokens, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    tiles = gather_rows(x, source.to(torch.int32), 2)
    assert torch.equal(tiles, _expected(x, source, 2))
    slots = torch.nonzero(source >= 0).squeeze(-1)
    back = slots[torch.argsort(source[slots])]
    assert torch.equal(gather_rows(tiles, back, 2), x)
