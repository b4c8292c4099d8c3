"""What a benchmark case is, and small helpers shared by the case modules.

A case module ``tools/bench_cases/<name>.py`` defines ``cases(args) -> list[BenchCase]``. ``args`` carries at least
``device`` ("cuda" or "cpu"), ``dtype`` (torch dtype) and ``mode`` ("fwd", "fwd+bwd" or "both"). On CPU a module
returns tiny shapes so the benchmark runs end to end; on CUDA it returns the issue's real shapes.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["BenchCase", "attention_flops", "random_qkv"]


@dataclass
class BenchCase:
    """One timed callable.

    Args:
        group: rows that belong in one comparison, e.g. the shape label ``"FLUX-2048 B1 H24 N16896 d128"``.
        impl: who computes it, e.g. ``"ours"``, ``"sdpa-cudnn"``, ``"flex"``, ``"fla"``, ``"naive"``.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        fn: the callable to time (no arguments); for ``"fwd+bwd"`` it runs forward and backward.
        flops: dense-equivalent FLOPs of one call (so TFLOP/s compare implementations at equal work), or None.
        density: fraction of the dense work actually required (1.0 dense), or None.
        bytes: bytes that must move through HBM at minimum (for memory-bound ops), or None.
        baseline: True for the row speedups are measured against within ``group`` and ``mode``.
        setup: optional callable run once before timing (e.g. building a mask), not timed.
        items: images (or samples) processed per call, for models: the report adds items/s.
        note: free text shown in the table (e.g. "tile 2x8x8", "OOM skipped").
    """

    group: str
    impl: str
    mode: str
    fn: Callable[[], object]
    flops: float | None = None
    density: float | None = None
    bytes: float | None = None
    baseline: bool = False
    setup: Callable[[], object] | None = None
    items: int | None = None
    note: str = ""


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, mode: str) -> float:
    """Dense softmax-attention FLOPs: 4·B·H·Nq·Nk·D forward (QKᵀ and PV); backward is 2.5x forward (5 matmuls)."""
    fwd = 4.0 * batch * heads * q_len * kv_len * head_dim
    return fwd if mode == "fwd" else fwd * 3.5


def random_qkv(
    batch: int,
    heads: int,
    length: int,
    head_dim: int,
    *,
    device,
    dtype: torch.dtype,
    requires_grad: bool = False,
    value_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh ``(B, H, N, D)`` normal q, k, v (seeded), optionally requiring grad."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    make = lambda d: (
        torch.randn(batch, heads, length, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    )
    return make(head_dim), make(head_dim), make(value_dim or head_dim)
