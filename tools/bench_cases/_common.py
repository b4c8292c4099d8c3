"""What a benchmark case is, and small helpers shared by the case modules.

A case module ``tools/bench_cases/<name>.py`` defines ``cases(args) -> list[BenchCase]``. ``args`` carries at least
``device`` ("cuda" or "cpu"), ``dtype`` (torch dtype) and ``mode`` ("fwd", "fwd+bwd" or "both"). On CPU a module
returns tiny shapes so the benchmark runs end to end; on CUDA it returns the issue's real shapes.

``cases`` must be cheap: it describes rows, it allocates nothing large and runs nothing. Each row's ``make`` builds
its inputs (and model) only when ``tools/bench.py`` is about to time it, and the runner drops them after the row, so
one row's tensors are alive at a time and rows removed by ``--filter``/``--impl``/``--mode`` cost nothing.
"""

import contextlib
import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BenchCase",
    "LatestOnly",
    "attention_flops",
    "compiled_flex_attention",
    "image_batch",
    "model_step",
    "random_qkv",
    "timed",
]


@dataclass
class BenchCase:
    """One timed row, described without allocating anything.

    Args:
        group: rows that belong in one comparison, e.g. the shape label ``"FLUX-2048 B1 H24 N16896 d128"``.
        impl: who computes it, e.g. ``"ours"``, ``"sdpa-cudnn"``, ``"flex"``, ``"fla"``, ``"naive"``.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        make: zero-argument factory, called right before the row's warm-up: it allocates the inputs (builds the
            model) and returns the callable to time (no arguments; for ``"fwd+bwd"`` it runs forward and backward).
        flops: dense-equivalent FLOPs of one call (so TFLOP/s compare implementations at equal work), or None.
        density: fraction of the dense work actually required (1.0 dense), or None; or a zero-argument callable
            returning it, evaluated after ``make`` (for masks whose density is known only once built).
        bytes: bytes that must move through HBM at minimum (for memory-bound ops), or None.
        baseline: True for the row speedups are measured against within ``group`` and ``mode``.
        items: images (or samples) processed per call, for models: the report adds items/s.
        note: free text shown in the table (e.g. "tile 2x8x8", "OOM skipped").
    """

    group: str
    impl: str
    mode: str
    make: Callable[[], Callable[[], object]]
    flops: float | None = None
    density: float | Callable[[], float | None] | None = None
    bytes: float | None = None
    baseline: bool = False
    items: int | None = None
    note: str = ""


class LatestOnly:
    """``build(*key)`` memoised for the most recent key only: a new key drops the previous value before building.

    For objects several rows of one group share but that are too large to keep for every group at once (a
    diffusion transformer): rows run group by group, so each group builds its object once.
    """

    def __init__(self, build: Callable[..., object]):
        self._build, self._key, self._value = build, None, None

    def __call__(self, *key: Hashable) -> object:
        if key != self._key:
            self._key = self._value = None  # free the previous group's object before allocating the next
            self._value, self._key = self._build(*key), key
        return self._value


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, created once per process (compilation itself happens on first call)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def timed(fn: Callable, inputs, mode: str) -> Callable[[], object]:
    """A no-argument callable: ``fn(*inputs)``, or for ``"fwd+bwd"`` that plus ``autograd.grad`` of the output with
    respect to every input that requires grad (no ``.grad`` accumulation; unused inputs allowed). The upstream
    gradient is drawn on the first call, so building the callable runs nothing."""
    inputs = tuple(inputs)
    if mode == "fwd":
        return lambda: fn(*inputs)
    wrt = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    upstream = []

    def step():
        out = fn(*inputs)
        if not upstream:
            upstream.append(torch.randn_like(out))
        return torch.autograd.grad(out, wrt, upstream[0], allow_unused=True)

    return step


def model_step(model, images, labels, mode: str, context: Callable = contextlib.nullcontext) -> Callable[[], object]:
    """A no-argument callable: inference under ``torch.no_grad`` (``"fwd"``), or one forward + backward of the
    cross-entropy loss under bf16 autocast (``"fwd+bwd"``, gradients cleared after). ``context()`` wraps the
    forward (e.g. a swap of the attention computation)."""
    if mode == "fwd":

        def run():
            with torch.no_grad(), context():
                return model(images)

        return run

    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16), context():
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def image_batch(
    batch: int, img: int, *, device, dtype: torch.dtype, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(B, 3, img, img)`` normal images and ``(B,)`` ImageNet labels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img, img, generator=gen).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), generator=gen).to(device)


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
