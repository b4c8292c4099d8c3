"""Triton SwiGLU kernels (interpreter on CPU, native on GPU) against a float64 formula: output and input gradient,
fp32/fp16 (bf16 on the GPU), hidden widths that are and are not powers of two, odd row counts, strided rows, empty
input and torch.compile."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.ops import swiglu


def _brute(x: torch.Tensor) -> torch.Tensor:
    """``a / (1 + exp(−a)) · b`` with ``a`` the first half of the last dim, written out (no torch SiLU)."""
    hidden = x.shape[-1] // 2
    a, b = x[..., :hidden], x[..., hidden:]
    return a / (1 + torch.exp(-a)) * b


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    """float64 CPU ``x``, its values spread over [-8, 8] so SiLU's saturated tails are exercised."""
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(x64: torch.Tensor, x: torch.Tensor, tol=None) -> None:
    """Output and gradient of ``swiglu(x, backend="triton")`` (``x`` a leaf) against ``_brute`` on ``x64``."""
    leaf64 = x64.clone().requires_grad_()
    ref = _brute(leaf64)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ref_dx,) = torch.autograd.grad(ref, leaf64, grad_out.to(ref.device))
    out = swiglu(x, backend="triton")
    assert out.dtype == x.dtype and out.is_contiguous()
    (dx,) = torch.autograd.grad(out, x, grad_out.to(x.device, x.dtype))
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close("out", ref, out.to(ref.device), tol=tol)
    assert_close("dx", ref_dx, dx.to(ref.device), tol=tol)


@pytest.mark.parametrize("hidden", [8, 24, 64, 512], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_swiglu_matches_float64(kernel_device, poison_empty, dtype, hidden):
    """3 x 7 = 21 rows: not a multiple of the row block; H = 24 leaves masked columns in its 32-wide tile."""
    x64 = _inputs(3, 7, 2 * hidden)
    _check(x64, x64.to(kernel_device, dtype).requires_grad_())


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_swiglu_strided_rows(kernel_device, poison_empty, transpose):
    """Rows of a wider buffer (row stride 72 for 2H = 48, unit last stride; read as strided rows), and the same
    transposed (leading dims that cannot merge, copied first)."""
    wide = _inputs(5, 3, 72).to(kernel_device, torch.float32)
    x = wide[..., 8:56]
    x = (x.transpose(0, 1) if transpose else x).detach().requires_grad_()
    assert x.stride(-1) == 1 and 72 in x.stride()
    _check(x.detach().cpu().double(), x)


def test_swiglu_strided_last_dim(kernel_device):
    """A last dim with stride 2 is copied to unit stride before the kernel reads it."""
    x64 = _inputs(3, 32)
    x = torch.stack([x64, -x64], dim=-1).to(kernel_device, torch.float32)[..., 0].detach().requires_grad_()
    assert x.stride(-1) == 2
    _check(x64, x)


def test_swiglu_wide_rows_split_over_column_tiles(kernel_device):
    """H = 1040 > the 1024-column tile: two column programs per row block, the second mostly masked."""
    x64 = _inputs(3, 2080)
    _check(x64, x64.to(kernel_device, torch.float32).requires_grad_())


def test_swiglu_empty(kernel_device):
    x = torch.zeros(0, 3, 16, device=kernel_device, requires_grad=True)
    out = swiglu(x, backend="triton")
    assert out.shape == (0, 3, 8)
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert dx.shape == x.shape


def test_swiglu_traces_with_compile_fullgraph(kernel_device):
    x64 = _inputs(2, 5, 32)
    x = x64.to(kernel_device, torch.float32).requires_grad_()
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    fn = torch.compile(lambda t: swiglu(t, backend="triton") * 2, fullgraph=True, backend=backend)
    out = fn(x)
    (dx,) = torch.autograd.grad(out.sum(), x)
    leaf64 = x64.clone().requires_grad_()
    ref = 2 * _brute(leaf64)
    (ref_dx,) = torch.autograd.grad(ref.sum(), leaf64)
    assert_close("out", ref, out.detach().cpu())
    assert_close("dx", ref_dx, dx.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows,hidden",
    [(64 * 4096, 512), (256 * 196, 1024), (1001, 1040)],
    ids=["vig_tiny-1024-B64", "vig_small-224-B256", "odd-rows-H1040"],
)
def test_swiglu_gpu_bf16(rows, hidden):
    """The MLP gating of vig_tiny (SwiGLU width 512) at 1024 px batch 64 (262K rows) and of vig_small (width 1024) at
    224 px batch 256, bf16 against float64."""
    x64 = _inputs(rows, 2 * hidden).cuda()
    _check(x64, x64.bfloat16().requires_grad_())
