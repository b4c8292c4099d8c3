"""visionattn's RmsNorm: a drop-in for timm's (parameters, init, state dict, output of the reference backend) whose
Triton backend matches a float64 formula."""

import pytest
import timm.layers
import torch

from tests._numerics import assert_close
from visionattn.nn import RmsNorm


def test_rms_norm_is_a_timm_rms_norm_drop_in(rng):
    ours, theirs = RmsNorm(24, eps=1e-5, backend="reference"), timm.layers.RmsNorm(24, eps=1e-5)
    assert torch.equal(ours.weight, theirs.weight)
    with torch.no_grad():
        theirs.weight.normal_(generator=rng)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 7, 24, generator=rng)
    assert torch.equal(ours(x), theirs(x))


def test_rms_norm_triton_backend_matches_float64(rng, kernel_device):
    norm = RmsNorm(48, backend="triton", device=kernel_device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48, generator=rng))
    x = torch.randn(3, 5, 48, generator=rng)
    xk = x.to(kernel_device).requires_grad_()
    out = norm(xk)
    x64 = x.double().requires_grad_()
    w64 = norm.weight.detach().double().cpu()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64
    assert_close("out", ref, out.cpu())
    (dx,) = torch.autograd.grad(out.sum(), xk)
    (ref_dx,) = torch.autograd.grad(ref.sum(), x64)
    assert_close("dx", ref_dx, dx.cpu(), tol=1e-4)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_rms_norm_meta_init(backend):
    norm = RmsNorm(16, backend=backend, device="meta")
    assert norm.weight.is_meta and norm(torch.empty(2, 16, device="meta")).shape == (2, 16)
