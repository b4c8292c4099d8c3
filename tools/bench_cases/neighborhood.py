"""Neighborhood attention (issue 2): ``neighborhood_attention`` against FlexAttention with the identical mask and dense
SDPA, at the FLUX-4K and HunyuanVideo layouts of NATTEN's GNA profiler docs.

Rows: ``ours`` is the whole op (tile permutation in and out, cached mask, Triton block-sparse kernel); ``ours-kernel``
is ``block_sparse_attention`` alone on tile-ordered tensors; ``flex`` is compiled ``flex_attention`` on the same
tile-ordered tensors with ``BlockMask.to_flex()``; ``sdpa`` (dense, the baseline) attends everything. ``density`` is
the exact fraction of (query, key) pairs a neighborhood needs, so "fraction of ideal" compares with ``1 / density``.
Forward only, in a group of their own (``<shape> permutation``): ``ours-permute`` times the op's four tile-order
permutations alone (q, k, v into tile order, a tile-ordered tensor back) with ``gather_tokens``, against
``ours-permute-index-select`` (the baseline: ``index_select`` as the op ran them before), with the bytes they move.

    python tools/bench.py attention --cases neighborhood --mode both --dtype bf16 --out docs/benchmarks/neighborhood_h100
"""

import functools
import math

import torch.nn.functional as F

from tools.bench_cases._common import BenchCase, attention_flops, compiled_flex_attention, random_qkv, timed
from visionattn.layout import TokenGrid, TokenLayout, neighborhood_block_mask
from visionattn.layout.neighborhood import _check_neighborhood_args
from visionattn.ops import block_sparse_attention, default_neighborhood_tile, gather_tokens, neighborhood_attention
from visionattn.ops.neighborhood import _plan

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


def _shape_masks(grid: TokenGrid, shape, kernel, stride, device):
    """Cached builder of one shape's ``(layout, mask, flex mask or None)``; block masks are small: kept once built."""

    @functools.cache
    def build():
        layout = TokenLayout(grid, tile=default_neighborhood_tile(shape))
        mask = neighborhood_block_mask(layout, kernel, stride).to(device)
        return layout, mask, mask.to_flex() if mask.device.type == "cuda" else None

    return build


def _peer(impl: str, grid: TokenGrid, kernel, stride, mask, flex_mask):
    """The callable of ``impl``, and whether it takes tile-ordered tensors."""
    if impl == "ours":
        return functools.partial(neighborhood_attention, grid=grid, kernel_size=kernel, stride=stride), False
    if impl == "ours-kernel":
        return functools.partial(block_sparse_attention, block_mask=mask), True
    if impl == "flex":
        return functools.partial(compiled_flex_attention(), block_mask=flex_mask), True
    return F.scaled_dot_product_attention, False


def _row(impl: str, grid: TokenGrid, kernel, stride, masks, shape_args: tuple, mode: str, args):
    """``BenchCase.make`` of one row: fresh q, k, v (in tile order for the kernel-level rows)."""
    batch, heads, n, dim = shape_args

    def make():
        layout, mask, flex_mask = masks()
        fn, tiled = _peer(impl, grid, kernel, stride, mask, flex_mask)
        grad = mode != "fwd"
        inputs = random_qkv(batch, heads, n, dim, device=args.device, dtype=args.dtype, requires_grad=grad)
        if tiled:
            inputs = [layout.to_layout(t.detach()).requires_grad_(grad) for t in inputs]
        return timed(fn, inputs, mode)

    return make


def _permutation_row(impl: str, grid: TokenGrid, kernel, stride, shape_args: tuple, args):
    """``BenchCase.make`` of a permutation row: the plan ``neighborhood_attention`` caches, fresh q, k, v."""
    batch, heads, n, dim = shape_args

    def make():
        canonical = _check_neighborhood_args(grid, kernel, stride, 1, False)
        plan = _plan(grid, 0, canonical, default_neighborhood_tile(grid.shape), args.device)
        q, k, v = random_qkv(batch, heads, n, dim, device=args.device, dtype=args.dtype)
        if impl == "ours-permute":
            maps = [(plan.q_index, plan.out_slot), (plan.kv_index, plan.kv_slot), (plan.kv_index, plan.kv_slot)]
            gather = functools.partial(gather_tokens, dim=2, check_index=False)  # as the op calls it
            into = lambda: [gather(t, *m) for t, m in zip((q, k, v), maps)]
            return lambda: gather(into()[0], plan.out_slot, plan.q_index)
        q_index, kv_index, out_slot = (i.clamp_min(0).long() for i in (plan.q_index, plan.kv_index, plan.out_slot))
        into = lambda: [t.index_select(2, i) for t, i in zip((q, k, v), (q_index, kv_index, kv_index))]
        return lambda: into()[0].index_select(2, out_slot)

    return make


def _permutation_bytes(grid: TokenGrid, shape_args: tuple, element_size: int) -> float:
    """Rows read and written by the four permutations (padding slots written, not read), in bytes."""
    batch, heads, n, dim = shape_args
    slots = TokenLayout(grid, tile=default_neighborhood_tile(grid.shape)).num_tokens
    return float(batch * heads * dim * element_size * 4 * (n + slots))


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    impls = ("ours", "ours-kernel", "sdpa") + (("flex",) if on_gpu else ())
    rows = []
    for label, batch, heads, dim, shape, kernel, stride in SHAPES if on_gpu else CPU_SHAPES:
        grid = TokenGrid(shape)
        masks = _shape_masks(grid, shape, kernel, stride, args.device)
        density = math.prod(kernel) / grid.num_tokens
        n = grid.num_tokens
        for mode in ("fwd", "fwd+bwd"):
            common = dict(group=label, mode=mode, flops=attention_flops(batch, heads, n, n, dim, mode), density=density)
            for impl in impls:
                make = _row(impl, grid, kernel, stride, masks, (batch, heads, n, dim), mode, args)
                rows.append(BenchCase(impl=impl, make=make, baseline=impl == "sdpa", **common))
        shape_args = (batch, heads, n, dim)
        moved = _permutation_bytes(grid, shape_args, args.dtype.itemsize)
        for impl in ("ours-permute", "ours-permute-index-select"):
            make = _permutation_row(impl, grid, kernel, stride, shape_args, args)
            baseline = impl == "ours-permute-index-select"
            group = f"{label} permutation"
            rows.append(BenchCase(group=group, impl=impl, mode="fwd", make=make, bytes=moved, baseline=baseline))
    return rows
