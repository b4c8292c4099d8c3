"""Neighborhood attention (issue 2): ``neighborhood_attention`` against FlexAttention with the identical mask and dense
SDPA, at the FLUX-4K and HunyuanVideo layouts of NATTEN's GNA profiler docs.

Rows: ``ours`` is the whole op (tile permutation in and out, cached mask, Triton block-sparse kernel); ``ours-kernel``
is ``block_sparse_attention`` alone on tile-ordered tensors; ``flex`` is compiled ``flex_attention`` on the same
tile-ordered tensors with ``BlockMask.to_flex()``; ``sdpa`` (dense, the baseline) attends everything. ``density`` is
the exact fraction of (query, key) pairs a neighborhood needs, so "fraction of ideal" compares with ``1 / density``.

    python tools/bench.py attention --cases neighborhood --mode both --dtype bf16 --out docs/benchmarks/neighborhood_h100
"""

import functools
import math

import torch
import torch.nn.functional as F

from tools.bench_cases._common import BenchCase, attention_flops, random_qkv
from visionattn.layout import TokenGrid, TokenLayout, neighborhood_block_mask
from visionattn.ops import block_sparse_attention, default_neighborhood_tile, neighborhood_attention

__all__ = ["cases"]

#: (label, B, H, D, grid shape, kernel_size, stride)
SHAPES = [
    ("FLUX-4K (256,256) w(80,80) B1 H24 d128", 1, 24, 128, (256, 256), (80, 80), (1, 1)),
    ("FLUX-4K (256,256) w(80,80) s(16,16) B1 H24 d128", 1, 24, 128, (256, 256), (80, 80), (16, 16)),
    ("HunyuanVideo (30,48,80) w(18,24,24) B1 H24 d128", 1, 24, 128, (30, 48, 80), (18, 24, 24), (1, 1, 1)),
    ("HunyuanVideo (30,48,80) w(18,24,24) s(16,8,8) B1 H24 d128", 1, 24, 128, (30, 48, 80), (18, 24, 24), (16, 8, 8)),
    ("1D 32K w2048 s2048 B1 H24 d128", 1, 24, 128, (32768,), (2048,), (2048,)),
]
CPU_SHAPES = [("tiny (8,12) w(3,5) B1 H2 d16", 1, 2, 16, (8, 12), (3, 5), (1, 1))]


def _timed(fn, inputs, mode: str):
    """A no-argument callable: forward only, or forward + ``autograd.grad`` of every input."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    grad = torch.randn_like(fn(*inputs))
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    flex_attention = None
    if on_gpu:
        from torch.nn.attention.flex_attention import flex_attention

        flex_attention = torch.compile(flex_attention, dynamic=False)
    rows = []
    for label, batch, heads, dim, shape, kernel, stride in SHAPES if on_gpu else CPU_SHAPES:
        grid = TokenGrid(shape)
        layout = TokenLayout(grid, tile=default_neighborhood_tile(shape))
        mask = neighborhood_block_mask(layout, kernel, stride).to(args.device)
        flex_mask = mask.to_flex() if flex_attention is not None else None
        density = math.prod(kernel) / grid.num_tokens
        n = grid.num_tokens
        for mode in ("fwd", "fwd+bwd"):
            grad = mode != "fwd"
            q, k, v = random_qkv(batch, heads, n, dim, device=args.device, dtype=args.dtype, requires_grad=grad)
            tiled = [layout.to_layout(t.detach()).requires_grad_(grad) for t in (q, k, v)]
            common = dict(group=label, mode=mode, flops=attention_flops(batch, heads, n, n, dim, mode), density=density)
            peers = {
                "ours": (
                    functools.partial(neighborhood_attention, grid=grid, kernel_size=kernel, stride=stride),
                    (q, k, v),
                ),
                "ours-kernel": (functools.partial(block_sparse_attention, block_mask=mask), tiled),
                "sdpa": (F.scaled_dot_product_attention, (q, k, v)),
            }
            if flex_mask is not None:
                peers["flex"] = (functools.partial(flex_attention, block_mask=flex_mask), tiled)
            for impl, (fn, inputs) in peers.items():
                rows.append(BenchCase(impl=impl, fn=_timed(fn, inputs, mode), baseline=impl == "sdpa", **common))
    return rows
