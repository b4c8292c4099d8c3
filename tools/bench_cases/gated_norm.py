"""ViG's locality injection (per-head RMSNorms of the attention output and the conv features, sigmoid gate mix,
optional SiLU): our one-pass Triton kernel against the eager PyTorch glue it replaced in ``GatedLinearAttention2d``
(the op's reference, the baseline of each group) and ``torch.compile`` of that glue.

The op is memory-bound, so every row carries ``bytes``: the minimum HBM traffic, o, local and the gate logits read
and y written forward (4 tensors of rows x Dv); forward+backward adds dy, o, local, gate logits read and their three
gradients written (11 tensors in all). The norm weights are negligible.

    python tools/bench.py attention --cases gated_norm --mode both --dtype bf16 --out docs/benchmarks/gated_norm_h100
"""

import torch

from tools.bench_cases._common import BenchCase, timed
from visionattn.ops import gated_norm, gated_norm_reference

__all__ = ["cases"]

#: (label, B, N, H, Dv, SiLU): ViG-T at 1024 px batch 64 (the profiled inference, 786K rows of 64), ViG-S at 224 px.
SHAPES = [
    ("vig_tiny-1024 B64 N4096 H3 Dv64 silu", 64, 4096, 3, 64, True),
    ("vig_small-224 B256 N196 H6 Dv64", 256, 196, 6, 64, False),
]
CPU_SHAPES = [("tiny B1 N10 H2 Dv16 silu", 1, 10, 2, 16, True)]
#: Tensors of rows x Dv that must move through HBM per call.
_TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 11}


def _row(fn, shape_args: tuple, mode: str, args):
    """``BenchCase.make`` of one row: fresh o, local, gate logits in the module's layout and unit-ish norm weights."""
    batch, tokens, heads, dv, silu = shape_args

    def make():
        gen = torch.Generator().manual_seed(0)
        grad = mode != "fwd"
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(args.device, args.dtype).requires_grad_(grad)
        # local and the gate logits are (B, N, C) activations viewed per head, as in the module
        o, local, gate_logits = (
            rand(batch, tokens, heads, dv),
            rand(batch, tokens, heads * dv),
            rand(batch, tokens, heads * dv),
        )
        w_o, w_l = (torch.ones(dv, device=args.device, dtype=args.dtype).requires_grad_(grad) for _ in range(2))

        def call(o, local, gate_logits, w_o, w_l):
            per_head = lambda t: t.unflatten(-1, (heads, dv))
            return fn(o, per_head(local), per_head(gate_logits), w_o, w_l, eps=1e-6, silu=silu)

        return timed(call, (o, local, gate_logits, w_o, w_l), mode)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    peers = {
        "ours": lambda *t, **kw: gated_norm(*t, **kw, backend="triton"),
        "eager-glue": gated_norm_reference,
    }
    if on_gpu:
        peers["compiled-glue"] = torch.compile(gated_norm_reference, dynamic=False)
    rows = []
    for label, batch, tokens, heads, dv, silu in SHAPES if on_gpu else CPU_SHAPES:
        elements = batch * tokens * heads * dv * (torch.finfo(args.dtype).bits // 8)
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in peers.items():
                make = _row(fn, (batch, tokens, heads, dv, silu), mode, args)
                rows.append(
                    BenchCase(
                        group=label,
                        impl=impl,
                        mode=mode,
                        make=make,
                        bytes=_TENSORS_MOVED[mode] * elements,
                        baseline=impl == "eager-glue",
                    )
                )
    return rows
