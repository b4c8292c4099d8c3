"""visionattn's GluMlp: a drop-in for timm's (constructor, parameters, state dict) that equals timm's output and
gradients, fuses only the SwiGLU gate-first configuration, and whose Triton path matches the reference."""

import pytest
import timm.layers
import torch
from torch import nn

from tests._numerics import assert_close
from visionattn.nn import GluMlp

_SWIGLU = dict(act_layer=nn.SiLU, bias=False, gate_last=False)


def _pair(rng, **kwargs):
    """(ours, timm's) with the same random weights, loaded through the state dict."""
    theirs = timm.layers.GluMlp(16, 48, **kwargs)
    for p in theirs.parameters():
        with torch.no_grad():
            p.normal_(generator=rng)
    ours = GluMlp(16, 48, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    return ours, theirs


@pytest.mark.parametrize(
    "kwargs",
    [_SWIGLU, dict(_SWIGLU, bias=True, norm_layer=nn.LayerNorm), {}, dict(act_layer=nn.SiLU)],
    ids=["swiglu", "swiglu-bias-norm", "timm-default", "gate-last"],
)
def test_glu_mlp_equals_timm(rng, kwargs):
    ours, theirs = _pair(rng, **kwargs)
    assert ours.fused == (kwargs.get("gate_last") is False)
    x = torch.randn(2, 5, 16, generator=rng)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)
    assert torch.equal(out, theirs(x_theirs))
    out.square().sum().backward()
    theirs(x_theirs).square().sum().backward()
    assert torch.equal(x_ours.grad, x_theirs.grad)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_glu_mlp_conv_defers_to_timm(rng):
    ours, theirs = _pair(rng, use_conv=True, **_SWIGLU)
    assert not ours.fused
    x = torch.randn(2, 16, 3, 3, generator=rng)
    assert torch.equal(ours(x), theirs(x))


def test_glu_mlp_triton_backend_matches_float64(rng, kernel_device):
    mlp = GluMlp(16, 48, backend="triton", device=kernel_device, **_SWIGLU)
    x = torch.randn(3, 7, 16, generator=rng)
    xk = x.to(kernel_device).requires_grad_()
    out = mlp(xk)
    (dx,) = torch.autograd.grad(out.sum(), xk)
    ref_mlp = GluMlp(16, 48, backend="reference", dtype=torch.float64, **_SWIGLU)
    ref_mlp.load_state_dict(mlp.state_dict())
    x64 = x.double().requires_grad_()
    ref = ref_mlp(x64)
    (ref_dx,) = torch.autograd.grad(ref.sum(), x64)
    assert_close("out", ref, out.detach().cpu())
    assert_close("dx", ref_dx, dx.cpu())
