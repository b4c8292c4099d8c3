"""Triton LayerNorm (the ``CENTER`` variant of the row-norm kernel; interpreter on CPU, native on GPU) against a
float64 brute-force formula: output and the gradients of x, weight and bias, with and without a bias, C a power of
two or not, odd row counts, rows far from zero mean, strided rows, empty input, torch.compile."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.ops import layer_norm

_NAMES = ("dx", "dweight", "dbias")


def _ln_brute(x, w, b, eps):
    """``(x − mean) / sqrt(mean((x − mean)²) + eps) · w + b`` per row, written out."""
    centred = x - x.sum(-1, keepdim=True) / x.shape[-1]
    out = centred / torch.sqrt((centred * centred).sum(-1, keepdim=True) / x.shape[-1] + eps) * w
    return out if b is None else out + b


def _leaves(shape, *, bias=True, offset=0.0, seed=0):
    """float64 leaves (x, weight, bias or None): rows with scales over two decades, means around ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x = rand(*shape) * torch.exp(rand(*shape[:-1], 1)) + offset + rand(*shape[:-1], 1)
    channels = shape[-1]
    return [x, 1 + 0.5 * rand(channels), 0.5 * rand(channels) if bias else None]


def _check(leaves64, device, dtype, eps=1e-5, x=None, tol=None):
    """Output and gradients of ``layer_norm(backend="triton")`` against ``_ln_brute``; ``x``: the kernel's input if
    not the float64 x moved to ``device`` and ``dtype``."""
    # the float64 oracle sees the same rounded inputs (bf16 rounding of x is ~0.4 % of |x|, far more than that of
    # x - mean on rows with a small spread, and dx scales with 1 / std)
    leaves64 = [t if t is None else t.to(dtype).double().requires_grad_() for t in leaves64]
    ref = _ln_brute(*leaves64, eps)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(ref.device)
    present = [t for t in leaves64 if t is not None]
    ref_grads = torch.autograd.grad(ref, present, grad_out)
    leaves = [t if t is None else t.detach().to(device, dtype).requires_grad_() for t in leaves64]
    if x is not None:
        leaves[0] = x.requires_grad_()
    out = layer_norm(*leaves, eps=eps, backend="triton")
    assert out.dtype == dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(device, dtype))
    assert_close("out", ref, out.to(ref.device), tol=tol)
    for name, r, g in zip(_NAMES, ref_grads, grads):
        assert g.dtype == dtype
        assert_close(name, r, g.to(r.device), tol=tol)


@pytest.mark.parametrize(
    "shape,dtype,bias",
    [
        ((3, 7, 8), torch.float32, True),
        ((37, 24), torch.float16, True),
        ((2, 11, 64), torch.float32, False),
        ((2, 3, 5, 192), torch.float16, True),
        ((29, 192), torch.float32, True),
    ],
    ids=lambda v: str(v),
)
def test_layer_norm_matches_float64(kernel_device, poison_empty, shape, dtype, bias):
    """C = 8, 24 (padded tile), 64, 192 (padded); row counts 21, 37, 22, 30, 29 cross row blocks and programs."""
    _check(_leaves(shape, bias=bias), kernel_device, dtype)


def test_layer_norm_rows_far_from_zero_mean(kernel_device):
    """Rows centred at 100 with unit spread: the kernel subtracts the mean before squaring (no E[x²] − E[x]²)."""
    _check(_leaves((5, 3, 24), offset=100.0), kernel_device, torch.float32, tol=1e-4)


def test_layer_norm_strided_rows_and_compile(kernel_device):
    """Rows with a stride (a channel slice of a wider tensor) under torch.compile(fullgraph=True), gradients too."""
    wide64 = _leaves((2, 5, 40))[0]
    _, w64, b64 = _leaves((2, 5, 32), seed=3)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    fn = torch.compile(lambda x, w, b: layer_norm(x, w, b, backend="triton"), fullgraph=True, backend=backend)
    wide = wide64.to(kernel_device, torch.float32).requires_grad_()
    w, b = (t.to(kernel_device, torch.float32).requires_grad_() for t in (w64, b64))
    out = fn(wide[..., :32], w, b)
    leaves64 = [t.clone().requires_grad_() for t in (wide64, w64, b64)]
    ref = _ln_brute(leaves64[0][..., :32], *leaves64[1:], 1e-5)
    assert_close("out", ref, out.cpu())
    for name, r, g in zip(
        ("dwide", *_NAMES[1:]), torch.autograd.grad(ref.sum(), leaves64), torch.autograd.grad(out.sum(), [wide, w, b])
    ):
        assert_close(name, r, g.cpu())


def test_layer_norm_empty_rows(kernel_device):
    x = torch.empty(0, 3, 16, device=kernel_device, requires_grad=True)
    w, b = (torch.ones(16, device=kernel_device, requires_grad=True) for _ in range(2))
    out = layer_norm(x, w, b, backend="triton")
    dx, dw, db = torch.autograd.grad(out.sum(), [x, w, b])
    assert out.shape == x.shape and dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(16, device=kernel_device)) and torch.equal(db, dw)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(8, 65536, 64), (8, 16384, 128)], ids=["mavit_tiny-1024-stage1-B8", "agent_pvt_small-1024-stage2-B8"]
)
def test_layer_norm_gpu_bf16(shape):
    """MAViT-T stage 1 (C = 64) and Agent-PVT-S stage 2 (C = 128) at 1024 px, batch 8, bf16 against float64."""
    leaves64 = [t.cuda() for t in _leaves(shape, offset=1.0)]
    _check(leaves64, torch.device("cuda"), torch.bfloat16, eps=1e-6)


@pytest.mark.gpu
def test_layer_norm_gpu_channels_last_map_bf16():
    """The (B, H, W, C) view of a channels_last NCHW map (LayerNorm2d's path), bf16, against float64."""
    x64, w64, b64 = (t.cuda() for t in _leaves((4, 96, 96, 64)))
    x = x64.permute(0, 3, 1, 2).to(torch.bfloat16, memory_format=torch.channels_last).permute(0, 2, 3, 1)
    assert x.is_contiguous()
    _check([x64, w64, b64], torch.device("cuda"), torch.bfloat16, eps=1e-6, x=x.detach())
