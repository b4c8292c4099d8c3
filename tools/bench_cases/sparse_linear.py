"""Sparse-linear attention (issue 6): the fused SLA kernel against our block-sparse kernel alone on the same critical
blocks, dense SDPA (flash and cuDNN backends) and compiled FlexAttention with the same critical-block mask.

Shapes follow SLA's kernel benchmark (thu-ml/SLA ``evaluate/bench_kernel.py``: B2 H16 N32760 d128, query blocks of
128 and key blocks of 64) plus Wan2.1-1.3B at 480p (B1 H12 N32760 d128), at 5 % and 10 % kept blocks. Rows:
``ours-sla`` is ``sparse_linear_attention`` on a precomputed critical mask (the kernel alone, as SLA times it);
``ours-sla+select`` adds the block selection (pooling, top-k, CSR build); ``ours-block-sparse`` is the sparse part
alone (``block_sparse_attention``, same mask), so ``ours-sla`` over it is the cost of the linear branch. ``flops``
are dense-equivalent (SLA's "effective" FLOP/s), ``density`` is the kept block fraction.

    python tools/bench.py attention --cases sparse_linear --mode both --dtype bf16 --out docs/benchmarks/sparse_linear_h100
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_cases._common import BenchCase, attention_flops, random_qkv
from visionattn.layout import topk_ratio_block_mask
from visionattn.ops import block_sparse_attention, sparse_linear_attention

__all__ = ["cases"]

#: (label, B, H, N, D)
SHAPES = [
    ("SLA-bench B2 H16 N32760 d128", 2, 16, 32760, 128),
    ("Wan2.1-1.3B-480p B1 H12 N32760 d128", 1, 12, 32760, 128),
]
CPU_SHAPES = [("tiny B1 H1 N320 d16", 1, 1, 320, 16)]
#: Kept fractions of key blocks (95 % and 90 % sparsity).
TOPK_RATIOS = (0.05, 0.10)


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
    block_q, block_k = (128, 64) if on_gpu else (32, 16)
    dense_peers = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    if not on_gpu:
        dense_peers = {"sdpa-math": SDPBackend.MATH}
    baseline = next(iter(dense_peers))
    rows = []
    for label, batch, heads, n, dim in SHAPES if on_gpu else CPU_SHAPES:
        gen = torch.Generator().manual_seed(1)
        # in the activation dtype, as SLA runs proj_l under autocast (an fp32 weight would make F.linear fp32)
        proj_weight = (torch.randn(dim, dim, generator=gen) / dim**0.5).to(args.device, args.dtype)
        for mode in ("fwd", "fwd+bwd"):
            if args.mode not in ("both", mode):
                continue
            grad = mode != "fwd"
            q, k, v = random_qkv(batch, heads, n, dim, device=args.device, dtype=args.dtype, requires_grad=grad)
            weight = proj_weight.clone().requires_grad_(grad)
            for ratio in TOPK_RATIOS:
                mask = topk_ratio_block_mask(q, k, block_q, block_k, ratio)
                density = mask.density()
                sla = dict(feature_map="softmax")
                peers = {
                    "ours-sla": functools.partial(sparse_linear_attention, proj_weight=weight, block_mask=mask, **sla),
                    "ours-sla+select": functools.partial(
                        sparse_linear_attention,
                        proj_weight=weight,
                        topk_ratio=ratio,
                        block_q=block_q,
                        block_k=block_k,
                        **sla,
                    ),
                    "ours-block-sparse": functools.partial(block_sparse_attention, block_mask=mask),
                }
                peers.update({name: _sdpa(backend) for name, backend in dense_peers.items()})
                if flex_attention is not None:
                    peers["flex"] = functools.partial(flex_attention, block_mask=mask.to_flex())
                common = dict(
                    group=f"{label} topk {ratio:.0%}",
                    mode=mode,
                    flops=attention_flops(batch, heads, n, n, dim, mode),
                )
                for impl, fn in peers.items():
                    rows.append(
                        BenchCase(
                            impl=impl,
                            fn=_timed(fn, (q, k, v), mode),
                            baseline=impl == baseline,
                            density=1.0 if impl.startswith("sdpa") else density,
                            note=f"blocks {block_q}x{block_k}" if impl.startswith(("ours", "flex")) else "",
                            **common,
                        )
                    )
    return rows
