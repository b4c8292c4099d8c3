"""SwiGLU gating of ViG's MLP (``SiLU(a) ⊙ b`` over the two halves of the fused first projection's output): our
one-pass Triton kernel against the eager timm ``GluMlp`` glue it replaced (chunk, SiLU, product; the op's reference,
the baseline of each group) and ``torch.compile`` of that glue.

Memory-bound, so every row carries ``bytes``, the minimum HBM traffic in rows x H elements: forward reads x (2)
and writes y (1), 3 in all; forward+backward adds dy (1) and x (2) read and dx (2) written, 8 in all.

    python tools/bench.py attention --cases swiglu --mode both --dtype bf16 --out docs/benchmarks/swiglu_h100
"""

import torch

from tools.bench_cases._common import BenchCase, timed
from visionattn.ops import swiglu, swiglu_reference

__all__ = ["cases"]

#: (label, rows, H): vig_tiny at 1024 px batch 64 (the profiled inference; 64 x 4096 tokens, width 512) and
#: vig_small at 224 px batch 256 (256 x 196 tokens, width 1024).
SHAPES = [
    ("vig_tiny-1024 B64 rows262144 H512", 64 * 4096, 512),
    ("vig_small-224 B256 rows50176 H1024", 256 * 196, 1024),
]
CPU_SHAPES = [("tiny rows20 H24", 20, 24)]
#: Tensors of rows x H elements that must move through HBM per call.
_TENSORS = {"fwd": 3, "fwd+bwd": 8}


def _make(fn, rows: int, hidden: int, mode: str, args):
    """``BenchCase.make`` of one row: a seeded ``(rows, 2H)`` input, requiring grad for ``"fwd+bwd"``."""

    def make():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, 2 * hidden, generator=gen).to(args.device, args.dtype).requires_grad_(mode != "fwd")
        return timed(fn, (x,), mode)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    elt = torch.finfo(args.dtype).bits // 8
    peers = {"ours": lambda x: swiglu(x, backend="triton"), "eager-glue": swiglu_reference}
    if on_gpu:
        peers["compiled-glue"] = torch.compile(swiglu_reference, dynamic=False)
    rows_out = []
    for label, rows, hidden in SHAPES if on_gpu else CPU_SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in peers.items():
                bytes_moved = _TENSORS[mode] * rows * hidden * elt
                make = _make(fn, rows, hidden, mode, args)
                rows_out.append(BenchCase(label, impl, mode, make, bytes=bytes_moved, baseline=impl == "eager-glue"))
    return rows_out
