"""Block-sparse attention (issue 3): ``block_sparse_attention`` against dense SDPA (flash and cuDNN backends) and
compiled FlexAttention with the identical block mask, at the issue's shapes.

Per shape, three kinds of mask: ``dense`` (every block kept), ``random`` (about 92 % of 128 x 128 blocks dropped,
a different pattern per head) and ``nbhd`` (neighborhood attention in tile order; the HunyuanVideo rows use NATTEN's
window (18, 24, 24) and GNA stride (16, 8, 8)). ``flops`` are dense-equivalent, ``density`` is the fraction of
(query, key) pairs a mask needs, so "fraction of ideal" is the speedup over cuDNN divided by ``1 / density``.
All tensors are ``(B, H, N, D)``; neighborhood rows run on tensors already in tile order (the kernel alone).

    python tools/bench.py attention --cases block_sparse --mode both --dtype bf16 --out docs/benchmarks/block_sparse_h100
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_cases._common import BenchCase, attention_flops, random_qkv
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


def _masks(label, heads, shape, extra, window, stride, device, block):
    """``[(group label, mask, density)]`` for one shape: dense and random masks on the raw ``N`` tokens, the
    neighborhood mask on the tile-order layout (its padding slots are part of its cost)."""
    grid = TokenGrid(shape, extra_before=extra)
    n = grid.num_tokens
    m = -(-n // block)
    dense = BlockMask.from_block_matrix(
        torch.ones(1, 1, m, m, dtype=torch.bool), q_len=n, kv_len=n, block_q=block, block_k=block
    )
    rand = _random_mask(heads, n, block, device)
    tile = _TILES[len(shape)] if block == 128 else tuple(min(4, s) for s in shape)
    layout = TokenLayout(grid, tile=tile)
    pairs = lambda w: math.prod(w) * math.prod(shape) + 2 * extra * n - extra * extra
    rows = [(f"{label} dense", dense.to(device), 1.0), (f"{label} random", rand, rand.density())]
    windows = [(window, stride)] + ([GNA_ROW[1:]] if label == GNA_ROW[0] else [])
    for w, st in windows:
        rows.append((f"{label} nbhd w{w} s{st}", neighborhood_block_mask(layout, w, st).to(device), pairs(w) / n**2))
    return rows


def _timed(fn, inputs, mode: str):
    """A no-argument callable: forward only, or forward + ``autograd.grad`` of every input."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    grad = torch.randn_like(fn(*inputs))
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    flex_attention = None
    if on_gpu:
        from torch.nn.attention.flex_attention import flex_attention

        flex_attention = torch.compile(flex_attention, dynamic=False)
    block = 128 if on_gpu else 16
    dense_peers = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if not on_gpu:
        dense_peers = {"sdpa-math": SDPBackend.MATH}
    baseline = next(iter(dense_peers))
    rows = []
    for label, batch, heads, dim, shape, extra, window, stride in SHAPES if on_gpu else CPU_SHAPES:
        n = math.prod(shape) + extra
        for group, mask, density in _masks(label, heads, shape, extra, window, stride, args.device, block):
            flex_mask = mask.to_flex() if flex_attention is not None else None
            for mode in ("fwd", "fwd+bwd"):
                if args.mode not in ("both", mode):
                    continue
                grad = mode != "fwd"
                raw = random_qkv(batch, heads, n, dim, device=args.device, dtype=args.dtype, requires_grad=grad)
                ours = raw
                if mask.q_len != n:  # neighborhood rows run on the tile-order (padded) sequence
                    ours = random_qkv(
                        batch, heads, mask.q_len, dim, device=args.device, dtype=args.dtype, requires_grad=grad
                    )
                common = dict(group=group, mode=mode, flops=attention_flops(batch, heads, n, n, dim, mode))
                peers = {"ours": (functools.partial(block_sparse_attention, block_mask=mask), ours)}
                peers.update({name: (_sdpa(backend), raw) for name, backend in dense_peers.items()})
                if flex_mask is not None:
                    peers["flex"] = (functools.partial(flex_attention, block_mask=flex_mask), ours)
                for impl, (fn, inputs) in peers.items():
                    rows.append(
                        BenchCase(
                            impl=impl,
                            fn=_timed(fn, inputs, mode),
                            baseline=impl == baseline,
                            density=1.0 if impl.startswith("sdpa") else density,
                            **common,
                        )
                    )
    return rows
