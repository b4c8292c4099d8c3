"""Block-sparse attention (issue 3): ``block_sparse_attention`` against dense SDPA (flash and cuDNN backends) and
compiled FlexAttention with the identical block mask, at the issue's shapes.

Per shape, three kinds of mask: ``dense`` (every block kept), ``random`` (about 92 % of 128 x 128 blocks dropped,
a different pattern per head) and ``nbhd`` (neighborhood attention in tile order; the HunyuanVideo rows use NATTEN's
window (18, 24, 24) and GNA stride (16, 8, 8)). ``flops`` are dense-equivalent, ``density`` is the fraction of
(query, key) pairs a mask needs, so "fraction of ideal" is the speedup over cuDNN divided by ``1 / density``.
All tensors are ``(B, H, N, D)``; neighborhood rows run on tensors already in tile order (the kernel alone).
``ours-tma`` / ``ours-pointer`` are ``ours`` with the forward's TMA path forced on / off (``VISIONATTN_BSA_TMA``
set to 1 / 0 around each call; leave the variable unset so ``ours`` keeps the default, TMA from 128-wide head-dim
tiles): all in one run, ``--impl ours`` selects the three.

    python tools/bench.py attention --cases block_sparse --mode both --dtype bf16 --out docs/benchmarks/block_sparse_h100
"""

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_cases._common import BenchCase, attention_flops, compiled_flex_attention, random_qkv, timed
from visionattn.kernels.block_sparse import TMA_ENV
from visionattn.layout import BlockMask, TokenGrid, TokenLayout, neighborhood_block_mask
from visionattn.ops import block_sparse_attention

__all__ = ["cases"]

#: (label, B, H, D, grid shape, extra tokens before the grid, neighborhood window, stride)
SHAPES = [
    ("DeiT-T-1024 B8 H3 N4096 d64", 8, 3, 64, (64, 64), 0, (21, 21), (1, 1)),
    ("FLUX-2048 B1 H24 N16896 d128", 1, 24, 128, (128, 128), 512, (41, 41), (1, 1)),
    ("Wan2.1-480p B1 H12 (21,30,52) d128", 1, 12, 128, (21, 30, 52), 0, (5, 13, 13), (1, 1, 1)),
    ("HunyuanVideo B1 H24 (30,48,80) d128", 1, 24, 128, (30, 48, 80), 0, (18, 24, 24), (1, 1, 1)),
]
#: Extra HunyuanVideo row: GNA stride (16, 8, 8), where every kept block is fully allowed.
GNA_ROW = ("HunyuanVideo B1 H24 (30,48,80) d128", (18, 24, 24), (16, 8, 8))
CPU_SHAPES = [("tiny B1 H2 (6,8) d32", 1, 2, 32, (6, 8), 3, (3, 5), (1, 1))]
#: Kept fraction of the random block masks (92 % block sparsity).
RANDOM_DENSITY = 0.08
_TILES = {2: (8, 16), 3: (2, 8, 8)}


def _random_mask(heads: int, n: int, block: int, device) -> BlockMask:
    """Random block mask, ``RANDOM_DENSITY`` of the blocks per head, always keeping the diagonal block."""
    m = -(-n // block)
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(1, heads, m, m, generator=gen) < RANDOM_DENSITY
    keep |= torch.eye(m, dtype=torch.bool)
    return BlockMask.from_block_matrix(keep, q_len=n, kv_len=n, block_q=block, block_k=block).to(device)


def _mask_groups(label, heads, shape, extra, window, stride, device, block):
    """``[(group label, build, density)]`` for one shape, nothing built yet: ``build()`` (cached) returns the
    ``(BlockMask, flex BlockMask or None)`` pair. Dense and random masks are on the raw ``N`` tokens, the
    neighborhood mask on the tile-order layout (its padding slots are part of its cost)."""
    grid = TokenGrid(shape, extra_before=extra)
    n = grid.num_tokens
    m = -(-n // block)
    tile = _TILES[len(shape)] if block == 128 else tuple(min(4, s) for s in shape)
    pairs = lambda w: math.prod(w) * math.prod(shape) + 2 * extra * n - extra * extra
    dense = lambda: BlockMask.from_block_matrix(
        torch.ones(1, 1, m, m, dtype=torch.bool), q_len=n, kv_len=n, block_q=block, block_k=block
    ).to(device)
    nbhd = lambda w, st: neighborhood_block_mask(TokenLayout(grid, tile=tile), w, st).to(device)
    random = _cached_with_flex(functools.partial(_random_mask, heads, n, block, device))
    groups = [
        (f"{label} dense", _cached_with_flex(dense), 1.0),
        (f"{label} random", random, lambda: random()[0].density()),
    ]
    windows = [(window, stride)] + ([GNA_ROW[1:]] if label == GNA_ROW[0] else [])
    for w, st in windows:
        groups.append((f"{label} nbhd w{w} s{st}", _cached_with_flex(functools.partial(nbhd, w, st)), pairs(w) / n**2))
    return groups


def _cached_with_flex(build):
    """``build()`` memoised, paired with its FlexAttention mask on CUDA (block masks are small: kept once built)."""

    @functools.cache
    def masks():
        mask = build()
        return mask, mask.to_flex() if mask.device.type == "cuda" else None

    return masks


@contextlib.contextmanager
def _tma_switch(value: str):
    """``TMA_ENV`` set to ``value`` inside (the launcher reads it per call), restored after."""
    previous = os.environ.get(TMA_ENV)
    os.environ[TMA_ENV] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TMA_ENV]
        else:
            os.environ[TMA_ENV] = previous


def _ours_tma(mask, value: str):
    """``block_sparse_attention`` under ``mask`` with the forward's TMA path forced on (``"1"``) or off (``"0"``)."""

    def run(q, k, v):
        with _tma_switch(value):
            return block_sparse_attention(q, k, v, block_mask=mask)

    return run


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _row(masks, impl: str, peer, shape_args: tuple, mode: str, args):
    """``BenchCase.make`` of one row: the group's mask, then fresh q, k, v (tile-order length for ours and flex)."""
    batch, heads, n, dim = shape_args

    def make():
        mask, flex_mask = masks()
        length = n if impl.startswith("sdpa") else mask.q_len  # neighborhood rows: tile-order (padded) sequence
        grad = mode != "fwd"
        inputs = random_qkv(batch, heads, length, dim, device=args.device, dtype=args.dtype, requires_grad=grad)
        return timed(peer(mask, flex_mask), inputs, mode)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    block = 128 if on_gpu else 16
    dense_peers = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if not on_gpu:
        dense_peers = {"sdpa-math": SDPBackend.MATH}
    baseline = next(iter(dense_peers))
    peers = {
        "ours": lambda mask, _: functools.partial(block_sparse_attention, block_mask=mask),
        "ours-tma": lambda mask, _: _ours_tma(mask, "1"),
        "ours-pointer": lambda mask, _: _ours_tma(mask, "0"),
    }
    peers.update({name: lambda *_, b=backend: _sdpa(b) for name, backend in dense_peers.items()})
    if on_gpu:
        peers["flex"] = lambda _, flex_mask: functools.partial(compiled_flex_attention(), block_mask=flex_mask)
    rows = []
    for label, batch, heads, dim, shape, extra, window, stride in SHAPES if on_gpu else CPU_SHAPES:
        n = math.prod(shape) + extra
        for group, masks, density in _mask_groups(label, heads, shape, extra, window, stride, args.device, block):
            for mode in ("fwd", "fwd+bwd"):
                flops = attention_flops(batch, heads, n, n, dim, mode)
                for impl, peer in peers.items():
                    rows.append(
                        BenchCase(
                            group=group,
                            impl=impl,
                            mode=mode,
                            make=_row(masks, impl, peer, (batch, heads, n, dim), mode, args),
                            flops=flops,
                            baseline=impl == baseline,
                            density=1.0 if impl.startswith("sdpa") else density,
                        )
                    )
    return rows
