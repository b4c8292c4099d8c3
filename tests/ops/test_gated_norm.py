"""gated_norm op: the reference against a float64 brute-force formula and against the eager module code it replaced
(bit for bit), backend selection, and every validation error; the same for the plain rms_norm."""

import pytest
import torch
from timm.layers import RmsNorm

from tests._numerics import assert_close
from tests.kernels.test_gated_norm import _brute, _inputs
from visionattn.ops import gated_norm, gated_norm_reference, rms_norm


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_gated_norm_reference_matches_brute_force(silu):
    leaves = [t.requires_grad_() for t in _inputs(2, 5, 3, 16)]
    out = gated_norm_reference(*leaves, eps=1e-5, silu=silu)
    ref = _brute(*leaves, silu, eps=1e-5)
    assert_close("out", ref, out)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, r, g in zip(
        ("do", "dlocal", "dgate_logits", "dweight_o", "dweight_local"),
        torch.autograd.grad(ref, leaves, grad_out),
        torch.autograd.grad(out, leaves, grad_out),
    ):
        assert_close(name, r, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_norm_reference_is_the_eager_module_code(dtype):
    """What GatedLinearAttention2d computed before the fusion: timm RmsNorm modules, sigmoid, mix, SiLU module."""
    o, local, g, w_o, w_l = (t.to(dtype) for t in _inputs(2, 3, 2, 32))
    norm_attn, norm_local = RmsNorm(32, eps=1e-6, dtype=dtype), RmsNorm(32, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm_attn.weight.copy_(w_o)
        norm_local.weight.copy_(w_l)
    gate = torch.sigmoid(g)
    eager = torch.nn.SiLU()((norm_attn(o) * gate + norm_local(local) * (1 - gate)).flatten(2))
    out = gated_norm(o, local, g, norm_attn.weight, norm_local.weight, eps=1e-6, silu=True, backend="reference")
    assert torch.equal(out.flatten(2), eager)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_gated_norm_cpu_default_and_torch_are_the_reference(backend):
    """Automatic selection never picks the interpreter on CPU; "torch" names the same PyTorch function."""
    inputs = [t.float() for t in _inputs(1, 3, 2, 16)]
    expected = gated_norm_reference(*inputs, eps=1e-6, silu=True)
    assert torch.equal(gated_norm(*inputs, silu=True, backend=backend), expected)


def test_gated_norm_reference_backend_takes_float64_and_any_head_dim():
    inputs = _inputs(1, 2, 1, 300)
    assert_close("out", _brute(*inputs, False), gated_norm(*inputs, backend="reference"))


def test_gated_norm_triton_rejects_unsupported_input(kernel_device):
    o, local, g, w_o, w_l = (t.to(kernel_device) for t in _inputs(1, 2, 1, 16))
    with pytest.raises(NotImplementedError, match="o.dtype"):
        gated_norm(o, local, g, w_o.float(), w_l.float(), backend="triton")
    with pytest.raises(NotImplementedError, match="weight_local.dtype"):
        gated_norm(o.float(), local.float(), g.float(), w_o.float(), w_l, backend="triton")
    wide = [t.float() for t in _inputs(1, 2, 1, 512)]
    with pytest.raises(NotImplementedError, match="head dim"):
        gated_norm(*(t.to(kernel_device) for t in wide), backend="triton")


def test_gated_norm_rejects_bad_arguments():
    o, local, g, w_o, w_l = _inputs(1, 3, 2, 8)
    with pytest.raises(TypeError, match="o must be a torch.Tensor"):
        gated_norm(o.tolist(), local, g, w_o, w_l)
    with pytest.raises(ValueError, match="o must have 4 dims"):
        gated_norm(o[0], local, g, w_o, w_l)
    with pytest.raises(TypeError, match="o.dtype"):
        gated_norm(o.long(), local, g, w_o, w_l)
    with pytest.raises(ValueError, match="local must have the shape of o"):
        gated_norm(o, local[:, :2], g, w_o, w_l)
    with pytest.raises(TypeError, match="local must have the dtype of o"):
        gated_norm(o, local.float(), g, w_o, w_l)
    with pytest.raises(ValueError, match="local must be on the device of o"):
        gated_norm(o, local.to("meta"), g, w_o, w_l)
    with pytest.raises(ValueError, match="gate_logits must have the shape of o"):
        gated_norm(o, local, g[..., :4], w_o, w_l)
    with pytest.raises(ValueError, match="weight_o must have 1 dims"):
        gated_norm(o, local, g, w_o[None], w_l)
    with pytest.raises(ValueError, match="weight_local must have one entry per channel of o"):
        gated_norm(o, local, g, w_o, w_l[:4])
    with pytest.raises(ValueError, match="weight_o must be on the device of o"):
        gated_norm(o, local, g, w_o.to("meta"), w_l)
    with pytest.raises(ValueError, match="eps"):
        gated_norm(o, local, g, w_o, w_l, eps=0.0)
    with pytest.raises(TypeError, match="eps"):
        gated_norm(o, local, g, w_o, w_l, eps="1e-6")
    with pytest.raises(TypeError, match="silu"):
        gated_norm(o, local, g, w_o, w_l, silu=1)
    with pytest.raises(ValueError, match="backend"):
        gated_norm(o, local, g, w_o, w_l, backend="cuda")


def test_rms_norm_reference_is_timm_rms_norm():
    x = torch.randn(2, 3, 4, 48, generator=torch.Generator().manual_seed(0)).bfloat16()
    timm_norm = RmsNorm(48, eps=1e-6, dtype=torch.bfloat16)
    with torch.no_grad():
        timm_norm.weight.normal_(1, 0.5, generator=torch.Generator().manual_seed(1))
    for backend in (None, "reference", "torch"):
        assert torch.equal(rms_norm(x, timm_norm.weight, eps=1e-6, backend=backend), timm_norm(x))


def test_rms_norm_rejects_bad_arguments(kernel_device):
    x, w = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rms_norm(x.tolist(), w)
    with pytest.raises(ValueError, match="x must have at least 1 dim"):
        rms_norm(torch.tensor(1.0), w)
    with pytest.raises(TypeError, match="x.dtype"):
        rms_norm(x.long(), w)
    with pytest.raises(ValueError, match="weight must have one entry per channel of x"):
        rms_norm(x, w[:4])
    with pytest.raises(ValueError, match="weight must be on the device of x"):
        rms_norm(x, w.to("meta"))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, backend="apex")
    wide = torch.randn(2, 1025, device=kernel_device)
    with pytest.raises(NotImplementedError, match="channels"):
        rms_norm(wide, torch.ones(1025, device=kernel_device), backend="triton")
    with pytest.raises(NotImplementedError, match="x.dtype"):
        rms_norm(x.double().to(kernel_device), w.double().to(kernel_device), backend="triton")
