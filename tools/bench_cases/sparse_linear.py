"""Sparse-linear attention (issue 6): the fused SLA kernel against our block-sparse kernel alone on the same critical
blocks, dense SDPA (flash and cuDNN backends) and compiled FlexAttention with the same critical-block mask.

Shapes follow SLA's kernel benchmark (thu-ml/SLA ``evaluate/bench_kernel.py``: B2 H16 N32760 d128, query blocks of
128 and key blocks of 64) plus Wan2.1-1.3B at 480p (B1 H12 N32760 d128), at 5 % and 10 % kept blocks. Rows:
``ours-sla`` is ``sparse_linear_attention`` on a precomputed critical mask (the kernel alone, as SLA times it);
``ours-sla+select`` adds the block selection (pooling, top-k, CSR build); ``ours-block-sparse`` is the sparse part
alone (``block_sparse_attention``, same mask), so ``ours-sla`` over it is the cost of the linear branch. ``flops``
are dense-equivalent (SLA's "effective" FLOP/s), ``density`` is the kept block fraction. Forward only, the selection
alone: ``ours-select`` as ``sparse_linear_attention`` runs it (block means from the fused pooling kernel on CUDA),
``ours-select-torch`` with the layout's PyTorch pooling (``topk_ratio_block_mask``); their ``bytes`` are the
pooling's minimum traffic, q read once and k twice.

    python tools/bench.py attention --cases sparse_linear --mode both --dtype bf16 --out docs/benchmarks/sparse_linear_h100
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_cases._common import BenchCase, attention_flops, compiled_flex_attention, random_qkv, timed
from visionattn.layout import topk_ratio_block_mask
from visionattn.ops import block_sparse_attention, sparse_linear_attention
from visionattn.ops.sparse_linear import _select_blocks

__all__ = ["cases"]

#: (label, B, H, N, D)
SHAPES = [
    ("SLA-bench B2 H16 N32760 d128", 2, 16, 32760, 128),
    ("Wan2.1-1.3B-480p B1 H12 N32760 d128", 1, 12, 32760, 128),
]
CPU_SHAPES = [("tiny B1 H1 N320 d16", 1, 1, 320, 16)]
#: Kept fractions of key blocks (95 % and 90 % sparsity).
TOPK_RATIOS = (0.05, 0.10)


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _critical_mask(shape_args: tuple, blocks: tuple[int, int], ratio: float, device, dtype):
    """Cached builder of one group's ``(critical-block mask, flex mask or None)``, selected on the rows' q, k (the
    same seeded values every row draws); the mask is small and kept, q and k are not."""
    batch, heads, n, dim = shape_args

    @functools.cache
    def build():
        q, k, _ = random_qkv(batch, heads, n, dim, device=device, dtype=dtype)
        mask = topk_ratio_block_mask(q, k, *blocks, ratio)
        return mask, mask.to_flex() if mask.device.type == "cuda" else None

    return build


def _peer(impl: str, weight, mask, flex_mask, blocks: tuple[int, int], ratio: float, dense_peers: dict):
    """The callable of ``impl`` on ``(q, k, v)``."""
    sla = dict(feature_map="softmax", proj_weight=weight)
    if impl == "ours-sla":
        return functools.partial(sparse_linear_attention, block_mask=mask, **sla)
    if impl == "ours-sla+select":
        return functools.partial(sparse_linear_attention, topk_ratio=ratio, block_q=blocks[0], block_k=blocks[1], **sla)
    if impl == "ours-select":
        return lambda q, k, v: _select_blocks(q, k, ratio, 0.0, *blocks)
    if impl == "ours-select-torch":
        return lambda q, k, v: topk_ratio_block_mask(q, k, *blocks, ratio)
    if impl == "ours-block-sparse":
        return functools.partial(block_sparse_attention, block_mask=mask)
    if impl == "flex":
        return functools.partial(compiled_flex_attention(), block_mask=flex_mask)
    return _sdpa(dense_peers[impl])


def _row(impl: str, masks, shape_args: tuple, blocks, ratio: float, dense_peers: dict, mode: str, args):
    """``BenchCase.make`` of one row: fresh q, k, v and projection weight (requiring grad in fwd+bwd rows, as a trained layer's does)."""
    batch, heads, n, dim = shape_args

    def make():
        grad = mode != "fwd"
        q, k, v = random_qkv(batch, heads, n, dim, device=args.device, dtype=args.dtype, requires_grad=grad)
        gen = torch.Generator().manual_seed(1)
        # in the activation dtype, as SLA runs proj_l under autocast (an fp32 weight would make F.linear fp32)
        weight = (torch.randn(dim, dim, generator=gen) / dim**0.5).to(args.device, args.dtype).requires_grad_(grad)
        mask, flex_mask = masks()
        fn = _peer(impl, weight, mask, flex_mask, blocks, ratio, dense_peers)
        return timed(fn, (q, k, v), mode)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    blocks = (128, 64) if on_gpu else (32, 16)
    dense_peers = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    if not on_gpu:
        dense_peers = {"sdpa-math": SDPBackend.MATH}
    baseline = next(iter(dense_peers))
    impls = ("ours-sla", "ours-sla+select", "ours-block-sparse", *dense_peers) + (("flex",) if on_gpu else ())
    selection = ("ours-select", "ours-select-torch")
    rows = []
    for label, batch, heads, n, dim in SHAPES if on_gpu else CPU_SHAPES:
        shape_args = (batch, heads, n, dim)
        masks = {ratio: _critical_mask(shape_args, blocks, ratio, args.device, args.dtype) for ratio in TOPK_RATIOS}
        for mode in ("fwd", "fwd+bwd"):
            for ratio in TOPK_RATIOS:
                density = lambda m=masks[ratio]: m()[0].density()
                common = dict(
                    group=f"{label} topk {ratio:.0%}",
                    mode=mode,
                    flops=attention_flops(batch, heads, n, n, dim, mode),
                )
                for impl in impls:
                    rows.append(
                        BenchCase(
                            impl=impl,
                            make=_row(impl, masks[ratio], shape_args, blocks, ratio, dense_peers, mode, args),
                            baseline=impl == baseline,
                            density=1.0 if impl.startswith("sdpa") else density,
                            note=f"blocks {blocks[0]}x{blocks[1]}" if impl.startswith(("ours", "flex")) else "",
                            **common,
                        )
                    )
                for impl in selection if mode == "fwd" else ():
                    rows.append(
                        BenchCase(
                            group=common["group"],
                            impl=impl,
                            mode=mode,
                            make=_row(impl, masks[ratio], shape_args, blocks, ratio, dense_peers, mode, args),
                            bytes=3 * batch * heads * n * dim * args.dtype.itemsize,
                            note=f"selection only, blocks {blocks[0]}x{blocks[1]}",
                        )
                    )
    return rows
