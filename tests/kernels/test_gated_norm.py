"""Triton fused RMSNorm gate mix (interpreter on CPU, native on GPU) against a float64 brute-force formula: output and
every gradient, with and without SiLU, odd row counts, strided inputs, Dv not a power of two, torch.compile; and
the plain RMSNorm kernel of the same file."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.ops import gated_norm, rms_norm

_NAMES = ("do", "dlocal", "dgate_logits", "dweight_o", "dweight_local")
_EPS = 1e-6


def _brute(o, local, g, w_o, w_l, silu, eps=_EPS):
    """ViG's locality injection written out: per-row rsqrt(mean(x²) + eps), sigmoid mix, optional x·σ(x)."""
    rms = lambda x, w: x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w
    s = 1 / (1 + torch.exp(-g))
    m = s * rms(o, w_o) + (1 - s) * rms(local, w_l)
    return m / (1 + torch.exp(-m)) if silu else m


def _inputs(batch, tokens, heads, dv, *, seed=0, o_heads_first=False):
    """float64 CPU leaves (o, local, gate_logits, weight_o, weight_local); ``o_heads_first`` stores o as
    (B, H, N, Dv) memory viewed as (B, N, H, Dv), the layout of the attention output."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    o = rand(batch, heads, tokens, dv).transpose(1, 2) if o_heads_first else rand(batch, tokens, heads, dv)
    # a row scale spread over two decades, so rstd differs strongly from row to row
    local = rand(batch, tokens, heads, dv) * torch.exp(2 * rand(batch, tokens, heads, 1))
    gate_logits = 2 * rand(batch, tokens, heads, dv)
    weights = [1 + 0.5 * rand(dv), 1 + 0.5 * rand(dv)]
    return [o, local, gate_logits, *weights]


def _to(inputs, device, dtype):
    """Leaves requiring grad on ``device`` in ``dtype``, keeping the heads-first storage of a transposed view."""

    def move(t):
        if t.ndim == 4 and t.stride(1) < t.stride(2):
            return t.transpose(1, 2).to(device=device, dtype=dtype).transpose(1, 2).detach().requires_grad_()
        return t.to(device=device, dtype=dtype).detach().requires_grad_()

    return [move(t) for t in inputs]


def _check(inputs, silu, device, dtype, tol=None, leaves=None):
    """Output and gradients against ``_brute`` on ``inputs``; ``leaves``: the kernel's inputs, if not ``inputs`` moved
    to ``device`` and ``dtype``."""
    leaves64 = [t.clone().requires_grad_() for t in inputs]
    ref = _brute(*leaves64, silu)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out)
    leaves = _to(inputs, device, dtype) if leaves is None else leaves
    out = gated_norm(*leaves, eps=_EPS, silu=silu, backend="triton")
    assert out.dtype == dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, leaves, grad_out.to(device, dtype))
    assert_close("out", ref, out.cpu(), tol=tol)
    for name, r, g in zip(_NAMES, ref_grads, grads):
        assert g.dtype == dtype
        assert_close(name, r, g.cpu(), tol=tol)


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("dv", [16, 32, 64], ids=lambda d: f"Dv{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gated_norm_matches_float64(kernel_device, poison_empty, dtype, dv, silu):
    """B2-N7-H3: 42 rows, not a multiple of the row block, and more row blocks than backward programs."""
    _check(_inputs(2, 7, 3, dv), silu, kernel_device, dtype)


@pytest.mark.parametrize("dv", [24, 8], ids=lambda d: f"Dv{d}")
def test_gated_norm_odd_head_dim_and_strided_o(kernel_device, poison_empty, dv):
    """Dv not a power of two (masked tile lanes) and o in the (B, H, N, Dv) storage of the attention output."""
    _check(_inputs(1, 5, 2, dv, o_heads_first=True), True, kernel_device, torch.float32)


def test_gated_norm_non_unit_last_stride(kernel_device):
    """Inputs and a weight whose channels are strided (every other element) are copied, not misread."""
    inputs = _inputs(1, 3, 2, 32)
    wide = lambda t: torch.stack([t, -t], dim=-1).to(kernel_device, torch.float32)
    leaves = [wide(t)[..., 0].detach().requires_grad_() for t in inputs]
    assert all(t.stride(-1) == 2 for t in leaves)
    _check(inputs, False, kernel_device, torch.float32, leaves=leaves)


def test_gated_norm_mixed_weight_dtype(kernel_device, rng):
    """fp16 activations with fp32 weights (the autocast case): weight gradients come back in fp32."""
    o, local, g, w_o, w_l = _to(_inputs(2, 3, 2, 16), kernel_device, torch.float16)
    w_o32, w_l32 = (w.detach().float().requires_grad_() for w in (w_o, w_l))
    out = gated_norm(o, local, g, w_o32, w_l32, backend="triton")
    assert out.dtype == torch.float16
    dw_o, dw_l = torch.autograd.grad(out.float().sum(), [w_o32, w_l32])
    assert dw_o.dtype == dw_l.dtype == torch.float32
    ref = _brute(*(t.detach().double().cpu() for t in (o, local, g, w_o32, w_l32)), False)
    assert_close("out", ref, out.cpu())


def test_gated_norm_backward_is_deterministic(kernel_device):
    inputs = _to(_inputs(3, 5, 2, 16), kernel_device, torch.float32)
    grad_out = torch.randn(3, 5, 2, 16, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    runs = [torch.autograd.grad(gated_norm(*inputs, silu=True, backend="triton"), inputs, grad_out) for _ in range(2)]
    for name, first, second in zip(_NAMES, *runs):
        assert torch.equal(first, second), name


def test_gated_norm_empty_rows(kernel_device):
    o, local, g, w_o, w_l = _to(_inputs(2, 0, 3, 16), kernel_device, torch.float32)
    out = gated_norm(o, local, g, w_o, w_l, backend="triton")
    assert out.shape == (2, 0, 3, 16)
    dw_o, dw_l = torch.autograd.grad(out.sum(), [w_o, w_l])
    assert not dw_o.any() and not dw_l.any()


def test_gated_norm_traces_with_compile_fullgraph(kernel_device):
    inputs = _to(_inputs(1, 4, 2, 16), kernel_device, torch.float32)
    fn = lambda *t: gated_norm(*t, silu=True, backend="triton")
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    out = torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref = _brute(*(t.detach().double().cpu() for t in inputs), True)
    assert_close("out", ref, out.detach().cpu())
    assert all(g.shape == t.shape for g, t in zip(grads, inputs))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,tokens",
    [(64, 4096), (256, 196)],
    ids=["vig_tiny-1024-B64", "vig_tiny-224-B256"],
)
def test_gated_norm_gpu_vig_tiny_bf16(batch, tokens):
    """vig_tiny (C=192, H=3, Dv=64) at 1024 px batch 64 (786K rows) and 224 px batch 256, bf16 against float64 on
    the GPU."""
    inputs = [t.cuda() for t in _inputs(batch, tokens, 3, 64)]
    _check(inputs, True, torch.device("cuda"), torch.bfloat16)


def _rms_brute(x, w, eps=_EPS):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 3, 5, 192), torch.float32), ((37, 48), torch.float16), ((3, 7, 24), torch.float32)],
    ids=lambda v: str(v),
)
def test_rms_norm_matches_float64(kernel_device, poison_empty, shape, dtype):
    """C = 192 (ViG-T, a padded tile), 48, 24; row counts 30, 37, 21 cross row blocks and backward programs."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.exp(
        torch.randn(*shape[:-1], 1, generator=gen)
    )
    w64 = 1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    leaves64 = [x64.requires_grad_(), w64.requires_grad_()]
    ref = _rms_brute(*leaves64)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out)
    x, w = (t.detach().to(kernel_device, dtype).requires_grad_() for t in leaves64)
    out = rms_norm(x, w, backend="triton")
    grads = torch.autograd.grad(out, [x, w], grad_out.to(kernel_device, dtype))
    assert_close("out", ref, out.cpu())
    for name, r, g in zip(("dx", "dweight"), ref_grads, grads):
        assert_close(name, r, g.cpu())


def test_rms_norm_strided_rows_and_compile(kernel_device):
    """Rows with a stride (a channel slice of a wider tensor) under torch.compile(fullgraph=True)."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 5, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(32, generator=gen, dtype=torch.float64)
    x = wide.to(kernel_device, torch.float32)[..., :32]
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    fn = torch.compile(lambda x, w: rms_norm(x, w, backend="triton"), fullgraph=True, backend=backend)
    out = fn(x, w.to(kernel_device, torch.float32))
    assert_close("out", _rms_brute(wide[..., :32], w), out.cpu())


@pytest.mark.gpu
def test_rms_norm_gpu_vig_tiny_bf16():
    """vig_tiny's pre-norm at 1024 px batch 64: 262K rows of C = 192, bf16 against float64 on the GPU (the Triton
    backend named: with a gradient the automatic choice is ``F.rms_norm``)."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(64, 64, 64, 192, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    w64 = (1 + 0.5 * torch.randn(192, generator=gen, dtype=torch.float64)).cuda().requires_grad_()
    ref = _rms_brute(x64, w64)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x64, w64], grad_out)
    x, w = (t.detach().bfloat16().requires_grad_() for t in (x64, w64))
    out = rms_norm(x, w, backend="triton")
    grads = torch.autograd.grad(out, [x, w], grad_out.bfloat16())
    assert_close("out", ref, out)
    for name, r, g in zip(("dx", "dweight"), ref_grads, grads):
        assert_close(name, r, g)
